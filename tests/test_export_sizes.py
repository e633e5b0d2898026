"""benchmarks/export_sizes.py in its quick mode on a tiny BERT: it trains through the pipeline, measures
the adapter the run saved, and both PEFT exports reproduce the LoRA² logits."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest

from .conftest import REPO
from .test_glue import tiny_model_dir  # noqa: F401 - fixture

_spec = importlib.util.spec_from_file_location("benchmarks_export_sizes", REPO / "benchmarks" / "export_sizes.py")
export_sizes = importlib.util.module_from_spec(_spec)
sys.modules["benchmarks_export_sizes"] = export_sizes
_spec.loader.exec_module(export_sizes)


def test_quick_run_measures_the_pipelines_adapter(tmp_path, tiny_model_dir, glue_dir):  # noqa: F811
    export_sizes.main(["--quick", "--model", tiny_model_dir, "--data-dir", str(glue_dir),
                       "--results", str(tmp_path / "results"), "--keep", str(tmp_path / "work")])
    res = json.loads((tmp_path / "results" / "export_sizes.json").read_text())
    assert (tmp_path / "work" / "run" / "results.json").is_file()  # the pipeline's own run
    assert res["lora2"]["files"] == {p.name: p.stat().st_size for p in (tmp_path / "work" / "run" / "adapter").iterdir()}
    matrices = res["setup"]["matrices"]
    assert sum(res["ranks"]["exact_rank_histogram"].values()) == matrices
    for key in ("peft_rank_k", "peft_exact_rank"):
        assert res[key]["max_abs_logit_diff"] < 1e-4
    assert res["peft_exact_rank"]["bytes"] <= res["peft_rank_k"]["bytes"]
    assert "# Export sizes" in (tmp_path / "results" / "export_sizes.md").read_text()
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "work" / "run" / "adapter" / "lora2_adapter.safetensors")
    factors = {k: v.numel() for k, v in saved.items() if k.rsplit(".", 1)[-1] in ("p_outer", "p_inner", "lam",
                                                                                    "q_inner", "q_outer")}
    masks = sum(v.numel() for k, v in saved.items() if k.endswith(".mask"))
    assert (res["lora2"]["lora_parameters"], res["lora2"]["mask_entries"]) == (sum(factors.values()), masks)
    assert res["lora2"]["lora_parameters"] + masks + res["lora2"]["head_parameters"] == sum(
        v.numel() for v in saved.values())


def test_help(capsys):
    with pytest.raises(SystemExit) as done:
        export_sizes.main(["--help"])
    assert done.value.code == 0 and "usage" in capsys.readouterr().out.lower()
