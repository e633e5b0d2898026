"""benchmarks/speed.py in its quick mode on a tiny BERT: every part runs, ratios are finite and positive,
and the pipeline-vs-bare report has its keys. No timing target is asserted: the test machine is shared."""

from __future__ import annotations

import importlib.util
import json
import math
import sys

import pytest
import torch

from .conftest import REPO
from .test_glue import tiny_model_dir  # noqa: F401 - fixture

_spec = importlib.util.spec_from_file_location("benchmarks_speed", REPO / "benchmarks" / "speed.py")
speed = importlib.util.module_from_spec(_spec)
sys.modules["benchmarks_speed"] = speed
_spec.loader.exec_module(speed)  # puts benchmarks/ on sys.path for its speed_* modules
import speed_parts  # noqa: E402
import speed_setup  # noqa: E402
import speed_timing  # noqa: E402

from lora2.config import DEFAULT_TARGET_MODULES  # noqa: E402


def finite_positive(x: float) -> bool:
    return isinstance(x, float) and math.isfinite(x) and x > 0


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory, tiny_model_dir, glue_dir):  # noqa: F811
    out = tmp_path_factory.mktemp("speed")
    threads = torch.get_num_threads()  # main() sets one thread; later tests in the session keep theirs
    assert speed.main(["--quick", "--models", "tiny", "--repeats", "1", "--skip", "memory", "--pipeline-model",
                       tiny_model_dir, "--data-dir", str(glue_dir), "--out", str(out)]) == 0
    torch.set_num_threads(threads)
    return json.loads((out / "speed.json").read_text()), (out / "speed.md").read_text()


def test_every_method_is_built_by_the_pipeline_factory():
    for name in speed_setup.TRAIN_METHODS:
        method = speed_setup.wrap(name, speed_setup.build_tiny(), total_steps=10)
        assert method.trainable_parameters() > 0
        if name.startswith("lora2"):
            adapted = {n.split(".")[-1] for n in method.model.lora2_layers}
            assert adapted <= {t.split(".")[-1] for t in DEFAULT_TARGET_MODULES["bert"]}


def test_quick_run_tables_have_finite_positive_ratios(quick_run):
    results, md = quick_run
    tiny = results["models"]["tiny"]
    assert set(tiny["training"]) == set(speed_setup.QUICK_TRAIN)
    for method in tiny["training"]:
        for ref in ("lora_k", "floor"):
            assert finite_positive(speed_timing.paired(tiny["training"], method, ref, "step"))
    assert all(finite_positive(v["update_dt1_s"]) for k, v in tiny["allocator"].items() if k.startswith(("lora", "ada")))
    assert finite_positive(speed_timing.paired(tiny["inference"], "lora2_merged", "base", "forward"))
    assert all(math.isfinite(t["measured"]) and t["measured"] > 0 for t in results["targets"])
    assert "## Targets" in md and "### Training step" in md


def test_pipeline_against_bare_report(quick_run):
    results, md = quick_run
    pipe = results["pipeline"]
    assert set(pipe["methods"]) == {"lora2", "lora"}
    for entry in pipe["methods"].values():
        assert {"trainable", "steps", "rounds", "cpu", "wall", "setup_cpu_s", "met"} <= set(entry)
        for clock in ("cpu", "wall"):
            assert {"pipeline_steps_per_s", "bare_steps_per_s", "ratio"} <= set(entry[clock])
            assert all(finite_positive(entry[clock]["ratio"][k]) for k in ("median", "min", "max"))
        assert len(entry["rounds"]["pipeline"]) == len(entry["rounds"]["bare"]) == 1
    assert "The pipeline against a bare loop" in md and "pipeline ÷ bare" in md


def test_memory_child_measures_a_positive_peak():
    res = speed_parts.memory_child("tiny", "lora2", steps=1, quick=True)
    assert finite_positive(res["tensor_peak_over_base_mib"])


def test_help(capsys):
    with pytest.raises(SystemExit) as done:
        speed.main(["--help"])
    assert done.value.code == 0 and "usage" in capsys.readouterr().out.lower()
