"""Data-parallel training with torchrun (gloo, CPU): identical masks on every rank at every pruning
step, the single-process result with the same global batch, and files written by rank 0 only."""

from __future__ import annotations

import json
import os
import subprocess
import sys

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
    # masks were compared across ranks at every step past the warm-up (16 steps, t_init = 2)
    assert two["mask_sync_checks"] == 14
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


def test_diverging_masks_across_ranks_raise(monkeypatch):
    model = get_lora2_model(tiny_bert(), LoRA2Config(k=1, r=4, target_rank=1, target_modules=["query", "value"],
                                                     total_step=20, init_warmup=0, final_warmup=5, mask_interval=1))
    randomize_adapters(model)
    model.train()
    model(input_ids=torch.randint(0, 120, (2, 6)), labels=torch.tensor([0, 1])).loss.backward()

    def fake_all_gather(out, tensor):
        out[0].copy_(tensor)
        out[1].copy_(1 - tensor)  # the other rank pruned differently

    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 2)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 0)
    monkeypatch.setattr(torch.distributed, "all_gather", fake_all_gather)
    with pytest.raises(RuntimeError, match=r"masks differ between rank 0 and rank\(s\) \[1\] at step 1"):
        model.update_and_allocate(1)
