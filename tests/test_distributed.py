"""Data-parallel training with torchrun (gloo, CPU): identical masks on every rank at every pruning
step, the single-process result with the same global batch, and files written by rank 0 only."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import pytest
import torch
from safetensors.torch import load_file

from lora2 import LoRA2Config, get_lora2_model

from .conftest import REPO, randomize_adapters, tiny_bert

SCRIPT = str(REPO / "examples" / "ddp_train.py")
COMMON = ["--steps", "16", "--max-length", "40", "--dropout", "0"]


def launch(prefix: list[str], out, per_device_batch: int, glue_dir) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LORA2_GLUE_DIR": str(glue_dir), "HF_HUB_OFFLINE": "1"}
    cmd = [*prefix, SCRIPT, *COMMON, "--per-device-batch", str(per_device_batch), "--output-dir", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((out / "summary.json").read_text())


def test_torchrun_two_processes_match_one_process(tmp_path, glue_dir):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517"]
    two = launch(torchrun, tmp_path / "two", 4, glue_dir)
    one = launch([sys.executable], tmp_path / "one", 8, glue_dir)
    assert two["world_size"] == 2 and one["world_size"] == 1
    # masks were compared across ranks at every mask step only (T = 16, t_init = 2, t_final = 5, Δt = 2:
    # steps 4, 6, 8, 10 and T − t_final = 11; the final phase kept that mask, so it needed no comparison)
    assert two["mask_sync_checks"] == 5
    assert two["active"] == one["active"] == 2 * 36
    assert two["lora2_writes_before_saving_per_rank"] == [0, 0]  # rank 1 never wrote a lora2 file
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["adapter", "summary.json"]
    a = load_file(tmp_path / "one" / "adapter" / "lora2_adapter.safetensors")
    b = load_file(tmp_path / "two" / "adapter" / "lora2_adapter.safetensors")
    for key in a:
        if key.endswith(".mask"):
            assert torch.equal(a[key], b[key]), key
        else:
            torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5)


def pruning_from_step_one():
    """A model whose first allocator step rebuilds the masks, with this step's gradients in place."""
    model = get_lora2_model(tiny_bert(), LoRA2Config(k=1, r=4, target_rank=1, target_modules=["query", "value"],
                                                     total_step=20, init_warmup=0, final_warmup=5, mask_interval=1))
    randomize_adapters(model)
    model.train()
    model(input_ids=torch.randint(0, 120, (2, 6)), labels=torch.tensor([0, 1])).loss.backward()
    return model


def test_diverging_masks_across_ranks_raise(monkeypatch):
    model = pruning_from_step_one()

    def fake_all_gather(out, tensor):
        out[0].copy_(tensor)
        out[1].copy_(1 - tensor)  # the other rank pruned differently

    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 2)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 0)
    monkeypatch.setattr(torch.distributed, "all_gather", fake_all_gather)
    with pytest.raises(RuntimeError, match=r"masks differ between rank 0 and rank\(s\) \[1\] at step 1"):
        model.update_and_allocate(1)


def test_ranks_training_separate_models_can_turn_the_mask_comparison_off(monkeypatch):
    """A sweep over one process group (or rank 0 training alone) has no partner for the all-gather."""
    model = pruning_from_step_one()
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 2)

    def no_partner(out, tensor):
        raise AssertionError("all_gather called although mask_sync is False")

    monkeypatch.setattr(torch.distributed, "all_gather", no_partner)
    model.mask_sync = False
    model.update_and_allocate(1)
    assert model.allocator.masks_recomputed and model.mask_sync_checks == 0


@pytest.mark.parametrize(("skipped", "expected"), [((), [6, 9, 12, 15, 18, 20]), ((15, 18, 20), [6, 9, 12, 21])])
def test_masks_are_compared_on_mask_steps_only(monkeypatch, skipped, expected):
    """One all-gather per step that rebuilt the masks: the Δt steps of the pruning phase, T − t_final, and
    the first final-phase step when it had to force bT; none in the warm-up, between mask steps or after."""
    model = get_lora2_model(tiny_bert(), LoRA2Config(k=1, r=4, target_rank=1, target_modules=["query", "value"],
                                                     total_step=30, init_warmup=5, final_warmup=10, mask_interval=3))
    randomize_adapters(model)
    model.train()
    model(input_ids=torch.randint(0, 120, (2, 6)), labels=torch.tensor([0, 1])).loss.backward()
    gathered: list[int] = []
    step = 0

    def fake_all_gather(out, tensor):
        gathered.append(step)
        for slot in out:
            slot.copy_(tensor)

    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 2)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 0)
    monkeypatch.setattr(torch.distributed, "all_gather", fake_all_gather)
    layer = next(iter(model.lora2_layers.values()))
    good_grad = layer.q_inner.grad.clone()
    for step in range(1, 31):
        # non-finite gradients (as after an fp16 overflow) can skip the last three mask steps, where b(t) is
        # already bT: nothing is rebuilt there, and step 21 must force bT onto step 12's mask
        layer.q_inner.grad.copy_(good_grad)
        if step in skipped:
            layer.q_inner.grad[0, 0] = float("nan")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            model.update_and_allocate(step)
    mask_steps = [s for s in range(1, 31) if model.allocator.is_mask_step(s)]
    assert mask_steps == [6, 9, 12, 15, 18, 20]
    assert model.allocator.budget(12) > model.allocator.b_target == model.allocator.budget(15)
    assert gathered == expected
    assert model.mask_sync_checks == len(expected)
    assert model.allocator.masks().sum().item() == model.allocator.b_target
