"""Exact resume through the ``lora2 glue`` CLI: a run killed mid-way (in the pruning phase) and
resumed from its last checkpoint ends where the uninterrupted run ends."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from lora2.cli import main
from lora2.glue.args import GlueArgs
from lora2.glue.checkpoint import latest_checkpoint
from lora2.glue.run import run_glue

from .test_glue import tiny_model_dir  # noqa: F401 - fixture


def cli_args(out, model, glue_dir, method, *extra):
    return ["glue", "--task", "rte", "--method", method, "--model", model, "--data-dir", str(glue_dir),
            "--output-dir", str(out), "--max-steps", "14", "--batch-size", "8", "--max-length", "40",
            "--max-train-samples", "48", "--max-eval-samples", "24", "--eval-steps", "5", "--init-warmup", "2",
            "--final-warmup", "4", "--mask-interval", "1", "--save-steps", "4", "--dropout", "0.1", "--no-progress",
            "--adalora-init-r", "4", "--adalora-target-r", "2", *extra]


@pytest.mark.parametrize("method", ["lora2", "adalora"])
def test_killed_run_resumes_identically(method, tmp_path, tiny_model_dir, glue_dir):  # noqa: F811
    full_dir, cut_dir = tmp_path / "full", tmp_path / "cut"
    assert main(cli_args(full_dir, tiny_model_dir, glue_dir, method)) == 0

    parser_args = cli_args(cut_dir, tiny_model_dir, glue_dir, method)
    from lora2.cli import build_parser

    ns = build_parser().parse_args(parser_args)
    args = GlueArgs.from_flat({k: v for k, v in vars(ns).items() if k not in ("command", "func")})
    assert run_glue(args, stop_at_step=9) is None  # "killed" after step 9: checkpoint-8 is the newest
    assert latest_checkpoint(cut_dir).name == "checkpoint-8"
    assert not (cut_dir / "results.json").exists()
    assert main([*parser_args, "--resume-from-checkpoint", "last"]) == 0

    full = json.loads((full_dir / "results.json").read_text())
    resumed = json.loads((cut_dir / "results.json").read_text())
    assert resumed["active_ranks"] == full["active_ranks"]
    assert resumed["eval_history"] == full["eval_history"]
    assert resumed["final"] == pytest.approx(full["final"])
    name = "lora2_adapter.safetensors" if method == "lora2" else "adapter_model.safetensors"
    a, b = load_file(full_dir / "adapter" / name), load_file(cut_dir / "adapter" / name)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6)
    if method == "lora2":
        masks = [k for k in a if k.endswith(".mask")]
        assert masks and all(torch.equal(a[k], b[k]) for k in masks)
    log_steps = [json.loads(line)["step"] for line in (cut_dir / "train_log.jsonl").read_text().splitlines()]
    full_steps = [json.loads(line)["step"] for line in (full_dir / "train_log.jsonl").read_text().splitlines()]
    assert log_steps == full_steps  # no duplicated lines from the part after the checkpoint

    def losses(run_dir):
        lines = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
        return [(e["loss"], e["task_loss"]) for e in lines if "loss" in e]

    # the line after the resume averages the same steps (those before the checkpoint included)
    assert [v for pair in losses(cut_dir) for v in pair] == pytest.approx([v for pair in losses(full_dir) for v in pair],
                                                                          rel=1e-5)


def test_resume_with_other_options_is_refused(tmp_path, tiny_model_dir, glue_dir, capsys):  # noqa: F811
    out = tmp_path / "run"
    ns_args = cli_args(out, tiny_model_dir, glue_dir, "lora2")
    from lora2.cli import build_parser

    ns = build_parser().parse_args(ns_args)
    run_glue(GlueArgs.from_flat({k: v for k, v in vars(ns).items() if k not in ("command", "func")}), stop_at_step=5)
    changed = [a if a != "14" else "20" for a in ns_args]
    assert main([*changed, "--resume-from-checkpoint", "last"]) == 2
    assert "resume with the same options" in capsys.readouterr().err
    assert main([*ns_args, "--resume-from-checkpoint", str(tmp_path / "nothing")]) == 2
    # same step count, other learning rate or LoRA² option: continuing would train with the old ones
    assert main([*ns_args, "--learning-rate", "0.002", "--pq-form", "rank", "--resume-from-checkpoint", "last"]) == 2
    assert "written with other options (learning_rate, pq_form)" in capsys.readouterr().err
    fresh = [a if a != str(out) else str(tmp_path / "fresh") for a in ns_args]
    assert main([*fresh, "--resume-from-checkpoint", "last"]) == 2  # nothing to resume there
    assert not (tmp_path / "fresh").exists()  # and no empty run directory left behind


def test_an_adalora_checkpoint_from_before_its_regulariser_fix_is_refused(tmp_path, tiny_model_dir, glue_dir,  # noqa: F811
                                                                         capsys):
    """AdaLoRA once trained without γ·R: a checkpoint of such a run must not continue under the fixed objective."""
    from lora2.cli import build_parser
    from lora2.glue.checkpoint import METHOD_STATE_NAME

    out = tmp_path / "run"
    ns_args = cli_args(out, tiny_model_dir, glue_dir, "adalora")
    ns = build_parser().parse_args(ns_args)
    run_glue(GlueArgs.from_flat({k: v for k, v in vars(ns).items() if k not in ("command", "func")}), stop_at_step=5)
    path = latest_checkpoint(out) / METHOD_STATE_NAME
    state = torch.load(path, weights_only=True)
    assert state.pop("adalora_orth_reg_in_loss") is True
    torch.save(state, path)  # what the old code wrote
    assert main([*ns_args, "--resume-from-checkpoint", "last"]) == 2
    assert "trained without its orthogonality regulariser" in capsys.readouterr().err


def test_a_checkpoint_from_elsewhere_does_not_resume_into_a_directory_holding_another_run(tmp_path, tiny_model_dir,  # noqa: F811
                                                                                          glue_dir, capsys):
    from lora2.cli import build_parser

    finished = tmp_path / "a"
    assert main(cli_args(finished, tiny_model_dir, glue_dir, "lora2", "--learning-rate", "0.05")) == 0
    other = tmp_path / "b"
    ns = build_parser().parse_args(cli_args(other, tiny_model_dir, glue_dir, "lora2"))
    run_glue(GlueArgs.from_flat({k: v for k, v in vars(ns).items() if k not in ("command", "func")}), stop_at_step=9)
    before = (finished / "train_log.jsonl").read_text()
    assert main([*cli_args(finished, tiny_model_dir, glue_dir, "lora2"), "--resume-from-checkpoint",
                 str(latest_checkpoint(other))]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert (finished / "train_log.jsonl").read_text() == before  # the finished run's files are untouched
