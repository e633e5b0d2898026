"""`LoRA2Model`: puts LoRA² layers into any `nn.Module`, freezes the rest, and owns the allocator.

The data path reads straight through: ``forward`` runs the wrapped model and adds γ·R to its
loss; ``update_and_allocate`` runs the allocator once per optimizer step; ``save_pretrained``
writes the adapter only; ``merge_and_unload`` returns the plain model with Δ folded in.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import logging
import re
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import __version__
from .allocator import RankAllocator
from .config import CONFIG_NAME, DEFAULT_TARGET_MODULES, LoRA2Config
from .layer import ADAPTER_PARAMETERS, FACTOR_NAMES, SUPPORTED_TYPES, LoRA2Layer
from .persistence import WEIGHTS_NAME, read_json, read_tensors, write_json, write_tensors
from .regularizer import orth_regularization

logger = logging.getLogger(__name__)

# Training forwards without one allocator call before we shout (generous: covers accumulation).
IDLE_FORWARDS_WARNING = 200


def _suffix_match(name: str, suffix: str) -> bool:
    return name == suffix or name.endswith("." + suffix)


def _matches(name: str, targets: list[str] | str) -> bool:
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(_suffix_match(name, t) for t in targets)


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


def _linear_names(model: nn.Module, limit: int = 8) -> str:
    names = [n for n, m in model.named_modules() if isinstance(m, SUPPORTED_TYPES)]
    short = sorted({n.split(".")[-1] if not n.split(".")[-1].isdigit() else n for n in names})
    shown = ", ".join(repr(s) for s in short[:limit])
    return shown + (", ..." if len(short) > limit else "") if shown else "(none: the model has no Linear/Conv1D layer)"


class _ForwardWithBaseSignature:
    """``LoRA2Model.forward`` advertises the wrapped model's signature, so tools that inspect it
    (🤗 Trainer's column filtering, pipelines) see ``input_ids``, ``labels``... and not ``*args``."""

    def __get__(self, obj: LoRA2Model | None, objtype: type | None = None) -> Any:
        if obj is None:  # class-level inspection (Trainer's find_labels): the common HF signature
            return _class_level_forward

        def forward(*args: Any, **kwargs: Any) -> Any:
            return obj._forward(*args, **kwargs)

        forward.__signature__ = obj._forward_signature  # type: ignore[attr-defined]
        forward.__doc__ = LoRA2Model._forward.__doc__
        return forward


def _class_level_forward(self: LoRA2Model, *args: Any, labels: Any = None, **kwargs: Any) -> Any:
    """Run the wrapped model; add γ·R to its loss whenever it computes one (SPEC §3)."""
    if labels is not None:
        kwargs["labels"] = labels
    return self._forward(*args, **kwargs)


class LoRA2Model(nn.Module):
    """A model with LoRA² adapters; attribute access falls through to the wrapped model."""

    forward = _ForwardWithBaseSignature()
    # The base loss is a per-micro-batch mean and γ·R is added per forward, so the 🤗 Trainer must average
    # over gradient accumulation itself (and not rescale by num_items_in_batch / world size).
    accepts_loss_kwargs = False

    def __init__(self, model: nn.Module, config: LoRA2Config) -> None:
        super().__init__()
        if isinstance(model, LoRA2Model):
            raise ValueError("This model already has LoRA² adapters; call merge_and_unload() before wrapping again.")
        config = copy.deepcopy(config)
        if config.target_modules is None:
            model_type = getattr(getattr(model, "config", None), "model_type", None)
            if model_type not in DEFAULT_TARGET_MODULES:
                raise ValueError(
                    f"No default target_modules for model type {model_type!r}: set LoRA2Config.target_modules "
                    f"to names of its linear layers, e.g. some of {_linear_names(model)}."
                )
            config.target_modules = list(DEFAULT_TARGET_MODULES[model_type])
        self.base_model = model
        self.lora2_config = config
        self._forward_signature = inspect.signature(model.forward)
        self.modules_to_save_names = self._find_modules_to_save()
        self.lora2_layers: dict[str, LoRA2Layer] = {}
        self._inject()
        self._freeze()
        self.allocator = RankAllocator(list(self.lora2_layers), list(self.lora2_layers.values()), config)
        if self.allocator.prunes and config.total_step is not None:
            config.check_schedule(config.total_step)
        self.last_orth_reg: torch.Tensor | None = None
        self._idle_forwards = 0
        self._unloaded = False
        self.mask_sync_checks = 0  # cross-rank mask comparisons done (data-parallel training)

    # -- surgery ------------------------------------------------------------------------------
    def _find_modules_to_save(self) -> list[str]:
        wanted = self.lora2_config.modules_to_save
        if not wanted:
            return []
        names = [n for n, _ in self.base_model.named_modules() if n and _matches(n, wanted)]
        # keep only outermost matches
        names = [n for n in names if not any(n != o and n.startswith(o + ".") for o in names)]
        missing = [w for w in wanted if not any(_suffix_match(n, w) for n in names)]
        if missing:
            top = sorted({n.split(".")[0] for n, _ in self.base_model.named_children()})
            raise ValueError(
                f"modules_to_save {missing} matched no module of {type(self.base_model).__name__}; "
                f"its top-level modules are {top}."
            )
        return names

    def _inject(self) -> None:
        cfg = self.lora2_config
        targets = cfg.target_modules
        assert targets is not None
        found: list[tuple[str, nn.Module]] = []
        for name, module in self.base_model.named_modules():
            if not name or not _matches(name, targets):
                continue
            if any(name == s or name.startswith(s + ".") for s in self.modules_to_save_names):
                continue  # trained in full already
            if not isinstance(module, SUPPORTED_TYPES):
                raise TypeError(
                    f"target_modules matched {name!r}, a {type(module).__name__}; LoRA² adapts only nn.Linear and "
                    "transformers' Conv1D. Use a more specific suffix (e.g. 'attention.output.dense')."
                )
            found.append((name, module))
        if not found:
            inside_saved = [n for n, _ in self.base_model.named_modules() if n and _matches(n, targets)]
            if inside_saved:
                raise ValueError(
                    f"target_modules={targets!r} only matched modules inside modules_to_save ({inside_saved[:3]}), "
                    "which are trained in full and never get an adapter. Target the backbone's linear layers."
                )
            raise ValueError(
                f"target_modules={targets!r} matched no module of {type(self.base_model).__name__}. "
                f"Its linear layers include {_linear_names(self.base_model)}."
            )
        if isinstance(targets, list):
            unused = [t for t in targets if not any(_suffix_match(n, t) for n, _ in found)]
            if unused:
                warnings.warn(f"target_modules entries {unused} matched no module and were ignored.", stacklevel=3)
        for name, module in found:
            layer = LoRA2Layer(module, cfg.k, cfg.r, cfg.alpha, cfg.dropout, cfg.init_std, cfg.init)
            _set_submodule(self.base_model, name, layer)
            self.lora2_layers[name] = layer

    def _freeze(self) -> None:
        for param in self.base_model.parameters():
            param.requires_grad_(False)
        for layer in self.lora2_layers.values():
            for pname in ADAPTER_PARAMETERS:
                getattr(layer, pname).requires_grad_(True)
        for name in self.modules_to_save_names:
            for param in self.base_model.get_submodule(name).parameters():
                param.requires_grad_(True)

    # -- pass-through ---------------------------------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    @property
    def config(self) -> Any:
        """The wrapped model's own config (what 🤗 Trainer and generate() expect); see ``lora2_config``."""
        return getattr(self.base_model, "config", None)

    def get_base_model(self) -> nn.Module:
        return self.base_model

    # -- forward and regulariser --------------------------------------------------------------
    def orth_regularization(self) -> torch.Tensor:
        """R of SPEC §3 (mean over adapted matrices of the enabled terms), not yet multiplied by γ."""
        return orth_regularization(self.lora2_layers.values(), self.lora2_config.orth_terms)

    def _forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run the wrapped model; in training mode add γ·R to its loss whenever it computes one (SPEC §3).

        Evaluation losses stay the task loss alone, comparable with other methods.
        """
        self._check_usable()
        if self.training and torch.is_grad_enabled():
            self._note_training_forward()
        outputs = self.base_model(*args, **kwargs)
        gamma = self.lora2_config.orth_reg_weight
        if gamma == 0 or not self.lora2_config.orth_terms or not self.training or self._adapters_disabled():
            return outputs
        if isinstance(outputs, Mapping) and outputs.get("loss") is not None:
            reg = self.orth_regularization()
            self.last_orth_reg = reg.detach()
            outputs["loss"] = outputs["loss"] + gamma * reg.to(outputs["loss"].dtype)
        elif isinstance(outputs, tuple) and "labels" in kwargs and kwargs["labels"] is not None:
            reg = self.orth_regularization()
            self.last_orth_reg = reg.detach()
            outputs = (outputs[0] + gamma * reg.to(outputs[0].dtype), *outputs[1:])
        return outputs

    def _note_training_forward(self) -> None:
        if not self.allocator.prunes or self.allocator.num_updates > 0:
            return
        self._idle_forwards += 1
        if self._idle_forwards == IDLE_FORWARDS_WARNING:
            msg = (
                f"LoRA² has run {IDLE_FORWARDS_WARNING} training forward passes but update_and_allocate() was never "
                "called: no singular value is being pruned, so this is silently a plain (unpruned) run. Call "
                "model.update_and_allocate(step) after optimizer.step(), or pass callbacks=[lora2.LoRA2Callback()] "
                "to the 🤗 Trainer (or use lora2.LoRA2Trainer)."
            )
            warnings.warn(msg, RuntimeWarning, stacklevel=3)
            logger.warning(msg)

    def update_and_allocate(self, step: int) -> int | None:
        """Update importance scores and prune to b(step). Call once per optimizer step, before zero_grad."""
        self._check_usable()
        if any(layer.merged for layer in self.lora2_layers.values()):
            raise RuntimeError("update_and_allocate() on a merged model: call unmerge() before training further.")
        mask_step = self.allocator.prunes and self.allocator.phase(step) != "warmup"
        budget = self.allocator.update_and_allocate(step)
        if mask_step and torch.distributed.is_available() and torch.distributed.is_initialized() \
                and torch.distributed.get_world_size() > 1:
            self._check_masks_agree_across_ranks(step)
        return budget

    def _check_masks_agree_across_ranks(self, step: int) -> None:
        """Data-parallel ranks see the same averaged gradients, so their masks must be identical."""
        dist = torch.distributed
        masks = self.allocator.masks()
        gathered = [torch.empty_like(masks) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, masks)
        differing = [rank for rank, other in enumerate(gathered) if not torch.equal(other, masks)]
        if differing:
            raise RuntimeError(
                f"LoRA² masks differ between rank {dist.get_rank()} and rank(s) {differing} at step {step}: the ranks "
                "saw different gradients. Wrap the model in DistributedDataParallel before training and call "
                "update_and_allocate on every rank after optimizer.step() (not inside no_sync())."
            )
        self.mask_sync_checks += 1

    def rank_pattern(self) -> dict[str, dict[str, int]]:
        """Per adapted matrix: active singular values and effective rank of Δ (≤ k)."""
        return self.allocator.rank_pattern()

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Run the base model alone (modules_to_save keep their trained weights); a merged model is
        unmerged for the duration and merged again afterwards."""
        previous = {n: (layer.disabled, layer.merged) for n, layer in self.lora2_layers.items()}
        for layer in self.lora2_layers.values():
            layer.unmerge()
            layer.disabled = True
        try:
            yield
        finally:
            for n, layer in self.lora2_layers.items():
                layer.disabled = previous[n][0]
                if previous[n][1]:
                    layer.merge()

    def _adapters_disabled(self) -> bool:
        return all(layer.disabled for layer in self.lora2_layers.values())

    # -- parameter counts ---------------------------------------------------------------------
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        params = list({id(p): p for p in self.parameters()}.values())
        return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)

    def num_adapter_parameters(self) -> int:
        """LoRA² parameters only (SPEC §1): Σ d_in·k + k·r + r + r·k + k·d_out, head excluded."""
        return sum(getattr(la, p).numel() for la in self.lora2_layers.values() for p in ADAPTER_PARAMETERS)

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(
            f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}"
            f" || LoRA² params: {self.num_adapter_parameters():,} in {len(self.lora2_layers)} matrices"
        )

    # -- merge --------------------------------------------------------------------------------
    def merge(self) -> None:
        """Fold s·Δ into every base weight (exact; undo with unmerge())."""
        self._check_usable()
        for layer in self.lora2_layers.values():
            layer.merge()

    def unmerge(self) -> None:
        self._check_usable()
        for layer in self.lora2_layers.values():
            layer.unmerge()

    def merge_and_unload(self) -> nn.Module:
        """Merge, remove every LoRA² layer, and return the plain wrapped model."""
        self._check_usable()
        self._warn_if_never_allocated("merge_and_unload")
        for name, layer in self.lora2_layers.items():
            layer.merge()
            weight = layer.base_layer.weight
            if not bool(torch.isfinite(weight).all()):
                raise FloatingPointError(f"Merging {name} produced NaN/inf weights; the adapter is broken.")
            _set_submodule(self.base_model, name, layer.base_layer)
        self._unloaded = True
        return self.base_model

    def _check_usable(self) -> None:
        if self._unloaded:
            raise RuntimeError("This LoRA2Model was unloaded by merge_and_unload(); use the model it returned.")

    def _warn_if_never_allocated(self, action: str) -> None:
        if self.allocator.prunes and int(self.allocator.masks().sum().item()) == self.allocator.b0:
            trained = any(bool(layer.lam.detach().abs().sum() > 0) for layer in self.lora2_layers.values())
            if trained:
                warnings.warn(
                    f"{action}: this adapter was trained but no singular value is pruned (update_and_allocate() never "
                    "ran past the warm-up) although target_rank/target_total_rank asks for pruning.",
                    RuntimeWarning,
                    stacklevel=3,
                )

    # -- persistence --------------------------------------------------------------------------
    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """Adapter tensors (and modules_to_save) keyed by their name in the *unwrapped* model."""
        state: dict[str, torch.Tensor] = {}
        for name, layer in self.lora2_layers.items():
            for pname in FACTOR_NAMES:
                state[f"{name}.{pname}"] = getattr(layer, pname)
        for name in self.modules_to_save_names:
            for key, value in self.base_model.get_submodule(name).state_dict().items():
                state[f"{name}.{key}"] = value
        return state

    def save_pretrained(self, save_directory: str | Path, **_: Any) -> None:
        """Write the adapter: ``lora2_adapter.safetensors`` and ``lora2_config.json`` (written last)."""
        self._check_usable()
        self._warn_if_never_allocated("save_pretrained")
        if any(layer.merged for layer in self.lora2_layers.values()):
            raise RuntimeError("save_pretrained() on a merged model: call unmerge() first so the base stays clean.")
        directory = Path(save_directory)
        if directory.exists() and not directory.is_dir():
            raise NotADirectoryError(f"save_pretrained needs a directory, but {directory} is a file.")
        write_tensors(directory / WEIGHTS_NAME, self.adapter_state_dict(), metadata={"format": "pt", "library": "lora2"})
        base_cfg = self.config
        write_json(directory / CONFIG_NAME, {
            "library": "lora2",
            "version": __version__,
            "config": self.lora2_config.to_dict(),
            "base_model_name_or_path": getattr(base_cfg, "_name_or_path", None) or None,
            "base_model_class": type(self.base_model).__name__,
            "adapted_modules": list(self.lora2_layers),
            "fan_in_fan_out": {name: layer.fan_in_fan_out for name, layer in self.lora2_layers.items()},
            "modules_to_save": self.modules_to_save_names,
            "rank_pattern": self.rank_pattern(),
            "allocator_step": self.allocator.step,
        })

    def load_adapter_state(self, tensors: Mapping[str, torch.Tensor], source: str = "adapter") -> None:
        """Copy saved tensors in, after checking names and shapes against this base model."""
        expected = self.adapter_state_dict()
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
            if not value.is_floating_point():
                raise ValueError(f"{key} in the {source} has dtype {value.dtype}; adapter tensors must be floating point.")
        with torch.no_grad():
            for key, target in expected.items():
                target.copy_(tensors[key].to(device=target.device, dtype=target.dtype))

    @classmethod
    def from_pretrained(
        cls, model: nn.Module, adapter_directory: str | Path, is_trainable: bool = False
    ) -> LoRA2Model:
        """Load an adapter written by ``save_pretrained`` onto a fresh base model."""
        directory = Path(adapter_directory)
        if not directory.is_dir():
            raise FileNotFoundError(f"Adapter directory {directory} does not exist.")
        meta = read_json(directory / CONFIG_NAME)
        if not isinstance(meta, dict) or meta.get("library") != "lora2" or "config" not in meta:
            raise ValueError(f"{directory / CONFIG_NAME} is not a LoRA² adapter config.")
        config = LoRA2Config.from_dict(meta["config"])
        try:
            wrapped = cls(model, config)
        except (ValueError, TypeError) as err:
            trained_on = meta.get("base_model_class")
            if trained_on and trained_on != type(model).__name__:
                raise ValueError(
                    f"The adapter in {directory} was trained on a {trained_on}, not {type(model).__name__}: {err}"
                ) from err
            raise
        wrapped.load_adapter_state(read_tensors(directory / WEIGHTS_NAME), source=f"adapter in {directory}")
        if not is_trainable:
            for param in wrapped.parameters():
                param.requires_grad_(False)
            wrapped.eval()
        return wrapped


def get_lora2_model(model: nn.Module, config: LoRA2Config) -> LoRA2Model:
    """Wrap ``model`` with LoRA² adapters as ``config`` describes (the PEFT-style entry point)."""
    if not isinstance(config, LoRA2Config):
        raise TypeError(f"get_lora2_model expects a lora2.LoRA2Config, got {type(config).__name__}.")
    return LoRA2Model(model, config)
