"""Files on disk: adapters and allocator state as safetensors + JSON, written atomically.

Nothing is ever unpickled: tensors come from safetensors, metadata from JSON. Each file is
written to a temporary name in the same directory and renamed into place, so a killed
process leaves either the old file or the new one, never half of one. An adapter directory is
``lora2_adapter.safetensors`` plus ``lora2_config.json`` (config and metadata, written last).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import uuid
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .config import CONFIG_NAME, LoRA2Config
from .factors import FACTOR_NAMES
from .targets import shared_paths, tied_adapted, tied_outside

if TYPE_CHECKING:
    from torch import nn

    from .model import LoRA2Model

WEIGHTS_NAME = "lora2_adapter.safetensors"
ALLOCATOR_WEIGHTS_NAME = "lora2_allocator.safetensors"
ALLOCATOR_STATE_NAME = "lora2_allocator.json"


def _umask() -> int:
    """The process umask, read without changing it where the OS tells (Linux); setting it to read it back would
    briefly give another thread's new files mode 0666."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            return next(int(line.split()[1], 8) for line in fh if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError, IndexError):
        mask = os.umask(0o022)
        os.umask(mask)
        return mask


def default_mode(directory: bool = False) -> int:
    """The permissions ``open``/``mkdir`` would give under the current umask (mkstemp/mkdtemp give 0600/0700, which
    would leave a shared run directory readable by its writer alone)."""
    return (0o777 if directory else 0o666) & ~_umask()


def atomic_write(path: str | Path, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` then rename the result onto ``path`` (same filesystem)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, default_mode())  # after: a writer may replace the file rather than write into it
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


# -- adapter directories ----------------------------------------------------------------------
PEFT_CONFIG_NAME = "adapter_config.json"  # a PEFT adapter directory: its config, weights and key prefix
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


def adapter_state_dict(model: LoRA2Model) -> dict[str, torch.Tensor]:
    """Adapter tensors (and modules_to_save) keyed by their name in the *unwrapped* model."""
    state: dict[str, torch.Tensor] = {}
    for name, layer in model.lora2_layers.items():
        for pname in FACTOR_NAMES:
            state[f"{name}.{pname}"] = getattr(layer, pname)
    with model._modules_to_save_as_trained():  # inside disable_adapter() too: the trained values, never the originals
        for name in model.modules_to_save_names:
            for key, value in model.base_model.get_submodule(name).state_dict().items():
                state[f"{name}.{key}"] = value
    return state


def save_adapter(model: LoRA2Model, save_directory: str | Path) -> None:
    """Write the adapter directory; the base weights stay out, so a merged model is refused."""
    from . import __version__

    if any(layer.merged for layer in model.lora2_layers.values()):
        raise RuntimeError("save_pretrained() on a merged model: call unmerge() first so the base stays clean.")
    model.check_config_matches_layers()
    directory = Path(save_directory)
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(f"save_pretrained needs a directory, but {directory} is a file.")
    # Two files cannot be renamed at once: the config goes to a pending name first (named by an id the weights
    # carry too), then the weights, then the config into place. A kill between the renames leaves new weights
    # whose config read_adapter_meta finds in the pending file: the directory holds the old save or the new one.
    tensors = adapter_state_dict(model)
    meta = {
        "library": "lora2",
        "version": __version__,
        "config": model.lora2_config.to_dict(),
        "base_model_name_or_path": getattr(model.config, "_name_or_path", None) or None,
        "base_model_class": type(model.base_model).__name__,
        "adapted_modules": list(model.lora2_layers),
        "fan_in_fan_out": {name: layer.fan_in_fan_out for name, layer in model.lora2_layers.items()},
        # a layer one object registers under several parents runs at each path (a PEFT export cannot say that)
        "shared_paths": shared_paths(model.base_model, model.lora2_layers),
        "tied_adapted": tied_adapted(model.base_model, model.lora2_layers),
        "modules_to_save": model.modules_to_save_names,
        "modules_to_save_tied_outside": tied_outside(model.base_model, list(model.modules_to_save_names)),
        "rank_pattern": model.rank_pattern(),
        "allocator_step": model.allocator.step,
    }
    # The id is the content's hash: ranks that all save the same adapter into one directory write interchangeable
    # files, whatever the order of their renames.
    save_id = content_id(tensors, meta)
    pending = directory / f".{CONFIG_NAME}.{save_id}.{uuid.uuid4().hex[:8]}.tmp"  # one per writer; hidden
    write_json(pending, {**meta, "save_id": save_id})
    try:
        write_tensors(directory / WEIGHTS_NAME, tensors, metadata={"format": "pt", "library": "lora2", "save_id": save_id})
        os.replace(pending, directory / CONFIG_NAME)
    finally:
        pending.unlink(missing_ok=True)


def content_id(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> str:
    """SHA-256 (32 hex digits) over the tensors' names, dtypes, shapes and bytes and the metadata's JSON."""
    digest = hashlib.sha256(json.dumps(meta, sort_keys=True).encode())
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()[:32]


def _pending_configs(directory: Path, save_id: str) -> list[Path]:
    return sorted(directory.glob(f".{CONFIG_NAME}.{save_id}.*.tmp"))


def _weights_save_id(path: Path) -> str | None:
    """The save id in a weights file's header (None: older adapter, or not readable here — read_tensors says why)."""
    try:
        with safe_open(str(path), framework="pt") as fh:
            return (fh.metadata() or {}).get("save_id")
    except Exception:
        return None


def read_adapter_meta(directory: Path, peft_hint: str = "it needs no export") -> tuple[dict[str, Any], LoRA2Config]:
    """``lora2_config.json`` of an adapter directory, validated: (metadata, config). ``peft_hint``: what to say
    when the directory holds a PEFT adapter instead."""
    if not directory.exists():
        raise FileNotFoundError(f"Adapter directory {directory} does not exist; pass the directory "
                                "LoRA2Model.save_pretrained wrote.")
    if not directory.is_dir():
        raise ValueError(f"{directory} is a file; pass the adapter directory that contains {CONFIG_NAME} and {WEIGHTS_NAME}.")
    if not (directory / CONFIG_NAME).is_file():
        hint = (f" It holds a PEFT adapter (adapter_config.json): {peft_hint}."
                if (directory / PEFT_CONFIG_NAME).is_file() else "")
        raise FileNotFoundError(f"{directory} has no {CONFIG_NAME}, so it is not a LoRA² adapter directory "
                                f"(written by LoRA2Model.save_pretrained).{hint}")
    meta = read_json(directory / CONFIG_NAME)
    expected = meta.get("save_id") if isinstance(meta, dict) else None  # adapters saved before the check have none
    if expected is not None and (directory / WEIGHTS_NAME).is_file():
        found = _weights_save_id(directory / WEIGHTS_NAME)
        if found is not None and found != expected:
            pending = _pending_configs(directory, found)
            if not pending:
                raise ValueError(
                    f"{directory / WEIGHTS_NAME} and {directory / CONFIG_NAME} come from different saves (save_id "
                    f"{found} vs {expected}) and the weights' own config is gone: a save into this directory was "
                    "interrupted or the files were mixed by hand. Save the adapter again.")
            meta = read_json(pending[0])  # a save killed between its two renames: its config was complete
    if not isinstance(meta, dict) or meta.get("library") != "lora2" or "config" not in meta:
        raise ValueError(f"{directory / CONFIG_NAME} is not a LoRA² adapter config (no 'library': 'lora2' / 'config').")
    return meta, LoRA2Config.from_adapter_dict(meta["config"], meta.get("version"))


def read_adapter_tensors(directory: Path, meta: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The adapter's weights, checked to belong to ``meta`` (read_adapter_meta resolved an interrupted save)."""
    path = directory / WEIGHTS_NAME
    tensors = read_tensors(path)
    expected, found = meta.get("save_id"), _weights_save_id(path)
    if expected is not None and found is not None and found != expected:  # a file without an id: written by hand
        raise ValueError(f"{path} changed while the adapter was read (save_id {found} vs {expected}): another "
                         "process is saving into this directory. Load it again once that save is done.")
    return tensors


def load_adapter_state(model: LoRA2Model, tensors: Mapping[str, torch.Tensor], source: str = "adapter") -> None:
    """Copy saved tensors in, after checking names, shapes and dtypes against this base model."""
    expected = adapter_state_dict(model)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensor(s), e.g. {missing[:3]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected tensor(s), e.g. {unexpected[:3]}")
        raise ValueError(
            f"The {source} does not fit this base model ({'; '.join(parts)}). Load it onto the same architecture "
            "it was trained on, with the same target_modules and modules_to_save."
        )
    for key, target in expected.items():
        value = tensors[key]
        if tuple(value.shape) != tuple(target.shape):
            raise ValueError(
                f"Shape mismatch for {key}: the {source} has {tuple(value.shape)} but this base model needs "
                f"{tuple(target.shape)}. The adapter was trained on a base model of a different size "
                "(hidden size, FFN size, number of labels) or with different k/r."
            )
        if value.is_floating_point() != target.is_floating_point():  # an integer buffer of a modules_to_save part
            kind = "floating point" if target.is_floating_point() else f"an integer like {target.dtype}"
            raise ValueError(f"{key} in the {source} has dtype {value.dtype}; this model holds {kind} there.")
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise ValueError(f"{key} in the {source} holds NaN or inf values: the adapter was saved from a diverged "
                             "run and would turn every output into NaN. Use an earlier checkpoint.")
    merged = [layer for layer in model.lora2_layers.values() if layer.merged]
    with torch.no_grad():
        for layer in merged:  # take the old Δ out of the base weights before the factors change
            layer.unmerge()
        for key, target in expected.items():
            target.copy_(tensors[key].to(device=target.device, dtype=target.dtype))
        for layer in merged:
            layer.merge()


def load_adapter(cls: type[LoRA2Model], model: nn.Module, adapter_directory: str | Path,
                 is_trainable: bool = False, revision: str | None = None, token: str | bool | None = None) -> LoRA2Model:
    """Wrap a fresh base ``model`` as the saved config says and copy the saved tensors in. ``adapter_directory``
    may be a Hub repo id (downloaded, see ``lora2.hub``); ``revision`` and ``token`` go to the download."""
    from .hub import resolve_adapter_directory

    directory = resolve_adapter_directory(adapter_directory, revision, token)
    meta, config = read_adapter_meta(directory, peft_hint=(
        "load it with peft.PeftModel.from_pretrained(base, dir), or start a LoRA² adapter from it with "
        "lora2.init_from_peft_lora(get_lora2_model(base, config), dir)"))
    try:
        with warnings.catch_warnings():
            if not is_trainable:  # nothing trains: a tied modules_to_save part is only read
                warnings.filterwarnings("ignore", message="modules_to_save trains .* in place")
            wrapped = cls(model, config)
    except (ValueError, TypeError) as err:
        trained_on = meta.get("base_model_class")
        if trained_on and trained_on != type(model).__name__:
            raise ValueError(
                f"The adapter in {directory} was trained on a {trained_on}, not {type(model).__name__}: {err}"
            ) from err
        raise
    try:
        load_adapter_state(wrapped, read_adapter_tensors(directory, meta), source=f"adapter in {directory}")
    except Exception:
        wrapped.restore_base()  # give the caller its base model back unchanged
        raise
    trained_on = meta.get("base_model_class")
    if trained_on and trained_on != type(model).__name__:
        warnings.warn(f"The adapter in {directory} was trained on a {trained_on}; it is loaded onto a "
                      f"{type(model).__name__} because its tensors fit. Its task head may not mean the same here.",
                      UserWarning, stacklevel=3)
    if not is_trainable:
        for param in wrapped.parameters():
            param.requires_grad_(False)
        wrapped.eval()
    elif wrapped.allocator.prunes:
        alloc, active = wrapped.allocator, int(wrapped.allocator.masks().sum().item())
        if active <= alloc.b_target:
            # pruned to its target: a new schedule would start again from b0 and bring pruned values back
            alloc.frozen = True
        elif active < alloc.b0:
            warnings.warn(
                f"The adapter in {directory} stopped mid-schedule ({active} of {alloc.b0} singular values active, target "
                f"{alloc.b_target}): training it further starts a new schedule from {alloc.b0}, re-growing pruned values "
                "from the λ they were saved with (zero, or a small value the optimizer's momentum left). To continue "
                "its run, resume the checkpoint it was saved in (resume_from_checkpoint).",
                UserWarning, stacklevel=3)
    return wrapped
