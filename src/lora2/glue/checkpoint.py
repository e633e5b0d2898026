"""Training-loop checkpoints for ``lora2 glue``: everything needed to continue a run identically.

A checkpoint directory holds the method's own state (``Method.state_dict()``: trainable tensors,
buffers, allocator statistics), optimizer / scheduler / RNG state, and the loop's counters (JSON).
This module knows no method's internals. The directory is written under a temporary name and renamed
into place, so a killed run leaves either a whole checkpoint or none. Loading uses
``torch.load(weights_only=True)``: no code can run from a checkpoint file.
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

from ..persistence import default_mode, read_json, write_json
from .methods import Method

STATE_NAME = "trainer_state.json"
METHOD_STATE_NAME = "method_state.pt"
OPTIMIZER_NAME = "optimizer.pt"
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def save_checkpoint(directory: Path, method: Method, optimizer: torch.optim.Optimizer, scheduler: Any,
                    loop_state: dict[str, Any], data_generator_state: torch.Tensor) -> Path:
    """Write ``directory`` atomically (temp dir + rename)."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        os.chmod(tmp, default_mode(directory=True))
        torch.save(method.state_dict(), tmp / METHOD_STATE_NAME)
        torch.save({
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "data_rng": data_generator_state,
            "numpy_rng": _numpy_state_to_torch(),
            "python_rng": random.getstate(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None,  # dropout on GPUs
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


def _safe_load(path: Path) -> Any:
    try:
        return torch.load(path, weights_only=True)
    except Exception as err:
        raise ValueError(f"{path} cannot be read safely ({err}); it may be corrupted.") from None


def load_checkpoint(directory: Path, method: Method, optimizer: torch.optim.Optimizer,
                    scheduler: Any) -> tuple[dict[str, Any], torch.Tensor]:
    """Restore everything ``save_checkpoint`` wrote; returns (loop state, data generator state)."""
    directory = Path(directory)
    if not (directory / STATE_NAME).is_file():
        raise FileNotFoundError(
            f"{directory} is not a complete lora2 checkpoint (no {STATE_NAME}); pass a checkpoint-N directory "
            "of an earlier run, or 'last'."
        )
    loop_state = read_json(directory / STATE_NAME)
    try:
        method.load_state_dict(_safe_load(directory / METHOD_STATE_NAME))
    except (KeyError, ValueError) as err:
        raise ValueError(f"{directory} does not fit this {method.name} run: {err}") from None
    other = _safe_load(directory / OPTIMIZER_NAME)
    optimizer.load_state_dict(other["optimizer"])
    scheduler.load_state_dict(other["scheduler"])
    torch.set_rng_state(other["torch_rng"])
    np.random.set_state(_numpy_state_from_torch(other["numpy_rng"]))
    random.setstate(other["python_rng"])
    if other.get("cuda_rng") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(other["cuda_rng"])
    return loop_state, other["data_rng"]


def prune_checkpoints(out_dir: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoint-N directories."""
    found = sorted((int(m.group(1)), p) for p in out_dir.glob("checkpoint-*") if (m := CHECKPOINT_RE.match(p.name)))
    for _, path in found[: max(0, len(found) - keep)]:
        shutil.rmtree(path, ignore_errors=True)
