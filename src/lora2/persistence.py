"""Files on disk: adapters and allocator state as safetensors + JSON, written atomically.

Nothing is ever unpickled: tensors come from safetensors, metadata from JSON. Each file is
written to a temporary name in the same directory and renamed into place, so a killed
process leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

WEIGHTS_NAME = "lora2_adapter.safetensors"
ALLOCATOR_WEIGHTS_NAME = "lora2_allocator.safetensors"
ALLOCATOR_STATE_NAME = "lora2_allocator.json"


def atomic_write(path: str | Path, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` then rename the result onto ``path`` (same filesystem)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(path: str | Path, data: Any) -> None:
    text = json.dumps(data, indent=2, sort_keys=True) + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def read_json(path: str | Path) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"Missing file {path}.") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}); the file may be truncated or corrupted.") from None


def write_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    # safetensors refuses views and shared storage: store compact, independent copies.
    flat = {k: v.detach().contiguous().clone() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(flat, tmp, metadata=metadata))


def read_tensors(path: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Missing weights file {path}.")
    try:
        return load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(
            f"{path} is not a readable safetensors file ({err}); it may be truncated, corrupted, or not "
            "written by lora2. Only safetensors weights are accepted (no pickles)."
        ) from None


def save_allocator_state(directory: str | Path, state: dict[str, Any]) -> None:
    """Tensors to safetensors, the scalars to JSON (written last: it marks a complete save)."""
    directory = Path(directory)
    write_tensors(directory / ALLOCATOR_WEIGHTS_NAME, state["tensors"])
    meta = {k: v for k, v in state.items() if k != "tensors"}
    write_json(directory / ALLOCATOR_STATE_NAME, meta)


def load_allocator_state(directory: str | Path) -> dict[str, Any]:
    directory = Path(directory)
    meta = read_json(directory / ALLOCATOR_STATE_NAME)
    if not isinstance(meta, dict) or not {"step", "num_updates", "names"} <= set(meta):
        raise ValueError(f"{directory / ALLOCATOR_STATE_NAME} is not a LoRA² allocator state.")
    meta["tensors"] = read_tensors(directory / ALLOCATOR_WEIGHTS_NAME)
    return meta
