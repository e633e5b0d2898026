"""The one method factory: every fine-tuning method the pipeline, the benchmarks and the tests use,
built the same way (same base model, same target modules, task head always trainable).

Each method is a ``Method``: the wrapped model plus what the training loop needs from it (optimizer
groups, the per-step hook, saving, rank reports) and its own ``state_dict``/``load_state_dict``, so
checkpoint code never needs to know a method's internals. LoRA and AdaLoRA come from PEFT; the
baselines that are not the method (SoRA, BitFit, full, head-only) live in ``baselines``.
"""

from __future__ import annotations

import re
import statistics
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import LoRA2Config
from ..model import get_lora2_model
from ..persistence import write_tensors
from ..targets import ALL_LINEAR, all_linear, default_targets
from .args import METHODS, GlueArgs


class Method:
    """A model prepared for one fine-tuning method; the default behaviour is plain full-parameter state."""

    name = "method"
    initial_rank: int | None = None  # rank per matrix before any pruning (heatmap scale)
    heads: tuple[str, ...] = ()  # the task head's top-level module names (set by build_method)

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def trainable(self) -> list[nn.Parameter]:
        return list({id(p): p for p in self.model.parameters() if p.requires_grad}.values())

    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.trainable())

    def adapter_parameters(self) -> int:
        """Trainable parameters outside the task head: what the method itself adds or trains (0 for the floor).
        A parameter belongs to the head when a component of its name is a head module's (PEFT's
        ``classifier.modules_to_save.default.weight`` included)."""
        heads = set(self.heads)
        seen: dict[int, int] = {}
        for name, p in self.model.named_parameters():
            if p.requires_grad and not heads.intersection(name.split(".")):
                seen[id(p)] = p.numel()
        return sum(seen.values())

    def param_groups(self, lr: float, weight_decay: float) -> list[dict[str, Any]]:
        return [{"params": self.trainable(), "lr": lr, "weight_decay": weight_decay}]

    def after_step(self, step: int, lr: float) -> None:
        """Runs after ``optimizer.step()`` and before ``zero_grad()`` (allocation, proximal steps)."""

    def unclipped_loss(self) -> torch.Tensor | None:
        """A loss whose gradient is added after clipping (LoRA² with ``--orth-clip separate``: γ·R)."""
        return None

    def training_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The loss a training step minimises (the regulariser included where the method has one)."""
        return self.model(**batch).loss

    def task_loss(self, loss: float) -> float:
        """The task part of the last training loss (LoRA² and AdaLoRA add γ·R to it)."""
        return loss

    def active_pattern(self) -> dict[str, int] | None:
        """Active ranks per adapted matrix (cheap: counts only), or None for methods without ranks."""
        return None

    def effective_pattern(self) -> dict[str, int] | None:
        """rank(ΔW) per adapted matrix where it can be below the active count (LoRA²: at most k), else None."""
        return None

    def log_values(self) -> dict[str, float]:
        """Extra values for the training log (e.g. regulariser terms)."""
        return {}

    def deltas(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(ΔW, W0) of every adapted matrix; none for methods that adapt no matrix."""
        return iter(())

    @torch.no_grad()
    def update_norms(self) -> dict[str, float] | None:
        """Median and max over adapted matrices of ‖ΔW‖_F / ‖W0‖_F: how far the method moved the weights."""
        ratios = [float(d.float().norm() / w.float().norm()) for d, w in self.deltas()]
        if not ratios:
            return None
        return {"median": float(statistics.median(ratios)), "max": max(ratios)}

    def save(self, directory: Path) -> None:
        tensors = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        write_tensors(Path(directory) / "trainable.safetensors", tensors, metadata={"format": "pt"})

    def state_dict(self) -> dict[str, Any]:
        """What training changes: trainable parameters and every buffer, plus the method's own state."""
        tensors = {n: p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad}
        tensors.update({n: b.detach().clone() for n, b in self.model.named_buffers()})
        return {"tensors": tensors}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        tensors = state["tensors"]
        expected = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        expected.update(dict(self.model.named_buffers()))
        if set(tensors) != set(expected):
            missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
            raise ValueError(f"the state was written for another model or method (missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]}).")
        with torch.no_grad():
            for name, target in expected.items():
                if tensors[name].shape != target.shape:
                    raise ValueError(f"{name} has shape {tuple(tensors[name].shape)}, the model needs {tuple(target.shape)}.")
                target.copy_(tensors[name])


class LoRA2Method(Method):
    name = "lora2"

    def __init__(self, base: nn.Module, config: LoRA2Config, orth_clip: str = "shared") -> None:
        super().__init__(get_lora2_model(base, config))
        self.initial_rank = config.r
        self.model.regularizer_in_loss = orth_clip == "shared"

    def adapter_parameters(self) -> int:
        return self.model.num_adapter_parameters()  # u, U, λ, V, v (method.md §1); masks are buffers

    def unclipped_loss(self) -> torch.Tensor | None:
        return None if self.model.regularizer_in_loss else self.model.regularization_loss()

    def task_loss(self, loss: float) -> float:
        reg = self.model.last_orth_reg  # set by the step's forward (or regularization_loss with --orth-clip separate)
        return loss if reg is None else loss - self.model.lora2_config.orth_reg_weight * float(reg)

    def param_groups(self, lr: float, weight_decay: float) -> list[dict[str, Any]]:
        return self.model.optimizer_param_groups(lr, weight_decay)  # lam at lr · lam_lr_ratio

    def after_step(self, step: int, lr: float) -> None:
        self.model.update_and_allocate(step)

    def active_pattern(self) -> dict[str, int]:
        return self.model.active_pattern()

    def effective_pattern(self) -> dict[str, int]:
        return {name: v["effective_rank"] for name, v in self.model.rank_pattern().items()}

    def log_values(self) -> dict[str, float]:
        values = {}
        if self.model.last_orth_reg is not None:
            values["orth_reg"] = float(self.model.last_orth_reg)
        values.update({f"orth_{term}": value for term, value in self.model.last_orth_terms.items()})
        return values

    def deltas(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for layer in self.model.lora2_layers.values():
            yield layer.get_delta_weight(), layer.base_layer.weight

    def save(self, directory: Path) -> None:
        self.model.save_pretrained(directory)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "allocator": self.model.allocator.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.model.allocator.load_state_dict(state["allocator"])


class PeftMethod(Method):
    """PEFT LoRA (and the base of AdaLoRA): PEFT's own adapter files."""

    def __init__(self, name: str, model: nn.Module) -> None:
        super().__init__(model)
        self.name = name

    def save(self, directory: Path) -> None:
        self.model.save_pretrained(directory)

    def deltas(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for module in self.model.modules():
            if hasattr(module, "get_delta_weight") and hasattr(module, "get_base_layer") and "default" in getattr(
                    module, "lora_A", {}):
                yield module.get_delta_weight("default"), module.get_base_layer().weight


class _TaskLossRecorder:
    """Stands in for a transformers model's ``forward`` during one call and keeps the loss it returned, before
    PEFT's AdaLoraModel adds γ·R to that tensor in place (it calls ``model.forward`` directly: no hook fires)."""

    def __init__(self, module: nn.Module) -> None:
        self.module, self.loss = module, None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        output = type(self.module).forward(self.module, *args, **kwargs)
        loss = getattr(output, "loss", None)
        if isinstance(loss, torch.Tensor):
            self.loss = loss.detach().clone()
        return output


class AdaLoRAMethod(PeftMethod):
    """PEFT AdaLoRA; its rank allocator's importance statistics are part of the state.

    The training loss goes through ``AdaLoraModel.forward``, which adds the orthogonality regulariser γ·R: the
    plain ``PeftModel`` (kept so that a saved adapter reloads and evaluates with labels, peft#571) calls the
    transformers model directly and would train without it."""

    STATS = ("ipt", "exp_avg_ipt", "exp_avg_unc")

    def __init__(self, model: nn.Module, init_r: int) -> None:
        super().__init__("adalora", model)
        self.initial_rank = init_r
        self._task: torch.Tensor | None = None  # the transformers model's own loss in the last training forward

    def training_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        hf = self.model.get_base_model()
        if not self.model.peft_config["default"].orth_reg_weight:
            # γ = 0 adds nothing, and PEFT up to 0.18 refuses a zero weight inside AdaLoraModel.forward
            loss = hf(**batch).loss
            self._task = loss.detach().clone()
            return loss
        recorder = _TaskLossRecorder(hf)
        hf.forward = recorder  # for this call only: nothing stays on the module to copy, pickle or replicate
        try:
            loss = self.model.base_model(**batch).loss
        finally:
            del hf.forward
        self._task = recorder.loss
        return loss

    def task_loss(self, loss: float) -> float:
        return loss if self._task is None else float(self._task)

    def after_step(self, step: int, lr: float) -> None:
        self.model.base_model.update_and_allocate(step)

    def active_pattern(self) -> dict[str, int]:
        pattern = self.model.peft_config["default"].rank_pattern
        if not pattern:  # before the first allocation every triplet is active
            pattern = {n: [True] * self.initial_rank for n, m in self.model.named_modules() if hasattr(m, "lora_E")}
        return {re.sub(r"^base_model\.model\.|\.lora_E.*$", "", k): int(sum(v)) for k, v in pattern.items()}

    def _allocator(self) -> Any:
        return self.model.base_model.rankallocator

    def state_dict(self) -> dict[str, Any]:
        stats = {name: dict(getattr(self._allocator(), name)) for name in self.STATS}
        return {**super().state_dict(), "adalora": stats,
                "adalora_rank_pattern": self.model.peft_config["default"].rank_pattern,
                "adalora_orth_reg_in_loss": True}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state.get("adalora_orth_reg_in_loss"):
            raise ValueError("this AdaLoRA checkpoint was written by an older lora2 whose AdaLoRA trained without "
                             "its orthogonality regulariser; continuing it would mix two objectives in one run. "
                             "Start the run again (--overwrite-output-dir).")
        super().load_state_dict(state)
        for name, values in state["adalora"].items():
            getattr(self._allocator(), name).clear()
            getattr(self._allocator(), name).update(values)
        self.model.peft_config["default"].rank_pattern = state["adalora_rank_pattern"]


def head_modules(model: nn.Module) -> list[str]:
    """The task head: top-level children other than the pretrained backbone (e.g. ``classifier``)."""
    backbone = getattr(model, "base_model_prefix", None)
    heads = [n for n, m in model.named_children() if n != backbone and any(True for _ in m.parameters())]
    if not heads:
        raise ValueError(f"Could not find a task head next to the backbone {backbone!r} of {type(model).__name__}.")
    return heads


def resolve_targets(model: nn.Module, targets: list[str] | None) -> list[str]:
    """The adapted modules: the given suffixes (``all-linear``: every linear layer of the backbone, by full name,
    the same for every method), else the model type's "ALL" set (``config.DEFAULT_TARGET_MODULES``)."""
    if targets == [ALL_LINEAR]:
        return all_linear(model)
    if targets:
        return list(targets)
    try:
        return default_targets(model)
    except ValueError as err:  # name the pipeline's flag beside the config field
        raise ValueError(f"{err} Here: --target-modules with comma-separated names.") from None


def build_method(args: GlueArgs, base: nn.Module, total_steps: int) -> Method:
    """Wrap ``base`` for ``args.method``; ``total_steps`` drives the LoRA² and AdaLoRA budget schedules."""
    from .baselines import build_baseline

    if args.method not in METHODS:
        raise ValueError(f"Unknown method {args.method!r}; choose one of {list(METHODS)}.")
    heads = head_modules(base)
    targets = resolve_targets(base, args.targets())
    settings = args.lora2_settings(total_steps)
    if args.method == "lora2":
        config = LoRA2Config(**settings, target_modules=targets, modules_to_save=heads)
        if config.target_total_rank is None and config.resolved_target_rank < config.r:  # it prunes: say which flags
            try:
                config.check_schedule(total_steps, source="The run's optimizer steps (--max-steps or --epochs)")
            except ValueError as err:
                origin = ("as set" if "init_warmup" in args.lora2 else
                          f"15% of the run, at least --init-warmup-min {args.init_warmup_min}")
                raise ValueError(f"{err} Here --init-warmup is {config.init_warmup} ({origin}) and --final-warmup "
                                 f"{config.final_warmup}.") from None
        config.total_step = total_steps  # validated again when the model is wrapped
        method: Method = LoRA2Method(base, config, args.orth_clip)
    elif args.method in ("lora", "adalora"):
        method = _build_peft(args, base, settings, targets, heads, total_steps)
    else:
        method = build_baseline(args, base, settings, targets, heads)
    method.heads = tuple(heads)
    return method


def _build_peft(args: GlueArgs, base: nn.Module, settings: dict[str, Any], targets: list[str], heads: list[str],
                total_steps: int) -> Method:
    from peft import AdaLoraConfig, LoraConfig, get_peft_model

    if args.method == "lora":
        config = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=settings["dropout"],
                            target_modules=targets, modules_to_save=heads)
        return PeftMethod("lora", get_peft_model(base, config))
    if total_steps - settings["final_warmup"] < 2:
        raise ValueError(
            f"AdaLoRA needs at least one step before its final phase to gather importance, but {total_steps} steps "
            f"minus --final-warmup {settings['final_warmup']} leave {total_steps - settings['final_warmup']}: "
            "train longer or lower --final-warmup.")
    config = AdaLoraConfig(init_r=args.adalora_init_r, target_r=args.adalora_target_r, lora_alpha=args.adalora_alpha,
                           lora_dropout=settings["dropout"], tinit=settings["init_warmup"],
                           tfinal=settings["final_warmup"], deltaT=settings["mask_interval"], beta1=settings["beta1"],
                           beta2=settings["beta2"], orth_reg_weight=settings["orth_reg_weight"],
                           total_step=total_steps, target_modules=targets, modules_to_save=heads)
    return AdaLoRAMethod(get_peft_model(base, config), args.adalora_init_r)
