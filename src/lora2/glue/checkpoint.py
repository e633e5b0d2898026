"""Training-loop checkpoints for ``lora2 glue``: everything needed to continue a run identically.

A checkpoint directory holds the trainable tensors and buffers (safetensors), the LoRA² allocator
state (or PEFT AdaLoRA's importance statistics), optimizer / scheduler / RNG state, and the loop's
own counters (JSON). It is written under a temporary name and renamed into place, so a killed run
leaves either a whole checkpoint or none. Loading uses ``torch.load(weights_only=True)``: no code
can run from a checkpoint file.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..model import LoRA2Model
from ..persistence import (
    ALLOCATOR_STATE_NAME,
    load_allocator_state,
    read_json,
    read_tensors,
    save_allocator_state,
    write_json,
    write_tensors,
)

STATE_NAME = "trainer_state.json"
TENSORS_NAME = "model_state.safetensors"
OPTIMIZER_NAME = "optimizer.pt"
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """What training changes: trainable parameters and every buffer (masks, ranknum, ...)."""
    state = {n: p for n, p in model.named_parameters() if p.requires_grad}
    state.update(dict(model.named_buffers()))
    return state


def _adalora_allocator(model: nn.Module) -> Any:
    return getattr(getattr(model, "base_model", None), "rankallocator", None)


def save_checkpoint(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                    loop_state: dict[str, Any], data_generator_state: torch.Tensor) -> Path:
    """Write ``directory`` atomically (temp dir + rename)."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        write_tensors(tmp / TENSORS_NAME, model_state(model))
        extra: dict[str, Any] = {}
        if isinstance(model, LoRA2Model):
            save_allocator_state(tmp, model.allocator.state_dict())
        adalora = _adalora_allocator(model)
        if adalora is not None:
            extra["adalora"] = {name: dict(getattr(adalora, name)) for name in ("ipt", "exp_avg_ipt", "exp_avg_unc")}
            extra["adalora_rank_pattern"] = model.peft_config["default"].rank_pattern
        torch.save({
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "data_rng": data_generator_state,
            "numpy_rng": _numpy_state_to_torch(),
            "python_rng": random.getstate(),
            **extra,
        }, tmp / OPTIMIZER_NAME)
        write_json(tmp / STATE_NAME, loop_state)  # last: marks the checkpoint complete
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def _numpy_state_to_torch() -> dict[str, Any]:
    """NumPy's RNG state in types ``torch.load(weights_only=True)`` accepts."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached": float(cached)}


def _numpy_state_from_torch(state: dict[str, Any]) -> tuple:
    keys = state["keys"].numpy().astype(np.uint32)
    return (state["name"], keys, state["pos"], state["has_gauss"], state["cached"])


def latest_checkpoint(run_dir: Path) -> Path | None:
    steps = [(int(m.group(1)), p) for p in Path(run_dir).glob("checkpoint-*")
             if (m := CHECKPOINT_RE.match(p.name)) and (p / STATE_NAME).is_file()]
    return max(steps)[1] if steps else None


def load_checkpoint(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Any) -> tuple[dict[str, Any], torch.Tensor]:
    """Restore everything ``save_checkpoint`` wrote; returns (loop state, data generator state)."""
    directory = Path(directory)
    if not (directory / STATE_NAME).is_file():
        raise FileNotFoundError(
            f"{directory} is not a complete lora2 checkpoint (no {STATE_NAME}); pass a checkpoint-N directory "
            "of an earlier run, or 'last'."
        )
    loop_state = read_json(directory / STATE_NAME)
    tensors = read_tensors(directory / TENSORS_NAME)
    expected = model_state(model)
    if set(tensors) != set(expected):
        missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
        raise ValueError(f"{directory} was written for another model or method (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}).")
    with torch.no_grad():
        for name, target in expected.items():
            if tensors[name].shape != target.shape:
                raise ValueError(f"{directory}: {name} has shape {tuple(tensors[name].shape)}, "
                                 f"the model needs {tuple(target.shape)}.")
            target.copy_(tensors[name])
    try:
        other = torch.load(directory / OPTIMIZER_NAME, weights_only=True)
    except Exception as err:
        raise ValueError(f"{directory / OPTIMIZER_NAME} cannot be read safely ({err}); it may be corrupted.") from None
    optimizer.load_state_dict(other["optimizer"])
    scheduler.load_state_dict(other["scheduler"])
    torch.set_rng_state(other["torch_rng"])
    np.random.set_state(_numpy_state_from_torch(other["numpy_rng"]))
    random.setstate(other["python_rng"])
    if isinstance(model, LoRA2Model):
        if not (directory / ALLOCATOR_STATE_NAME).is_file():
            raise FileNotFoundError(f"{directory} has no LoRA² allocator state; it cannot continue identically.")
        model.allocator.load_state_dict(load_allocator_state(directory))
    adalora = _adalora_allocator(model)
    if adalora is not None and "adalora" in other:
        for name, values in other["adalora"].items():
            getattr(adalora, name).clear()
            getattr(adalora, name).update(values)
        model.peft_config["default"].rank_pattern = other["adalora_rank_pattern"]
    return loop_state, other["data_rng"]
