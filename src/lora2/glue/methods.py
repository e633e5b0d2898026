"""Every fine-tuning method the paper compares, built the same way: same base model, same target
modules, classification head always trainable. LoRA and AdaLoRA come from PEFT; SoRA is ours."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from ..config import DEFAULT_TARGET_MODULES, LoRA2Config
from ..model import get_lora2_model
from ..persistence import write_tensors
from ..sora import add_sora, proximal_step

METHODS = ("lora2", "lora", "adalora", "sora", "bitfit", "full")


@dataclass
class MethodArgs:
    """Method hyperparameters (the CLI's LoRA², LoRA, AdaLoRA and SoRA options)."""

    target_modules: list[str] | None = None
    k: int = 1
    r: int = 8
    alpha: float = 32.0
    target_rank: int = 2
    dropout: float = 0.0
    init_std: float = 0.02
    init: str = "gaussian"
    orth_reg_weight: float = 0.1
    orth_terms: tuple[str, ...] = ("uv", "UV", "PQ")
    importance: str = "reduced"
    init_warmup: int = 200
    final_warmup: int = 600
    mask_interval: int = 10
    beta1: float = 0.85
    beta2: float = 0.85
    lora_r: int = 8
    lora_alpha: float = 16.0
    adalora_init_r: int = 12
    adalora_target_r: int = 8
    adalora_alpha: float = 32.0
    sora_r: int = 8
    sora_alpha: float = 16.0
    sora_lambda: float = 0.1


@dataclass
class MethodHandle:
    """What the training loop needs from a method, whatever it is."""

    name: str
    model: nn.Module
    after_step: Callable[[int, float], None]  # (optimizer step, current lr), before zero_grad
    save: Callable[[Path], None]
    active_pattern: Callable[[], dict[str, int] | None]  # module → active ranks, for the heatmap
    initial_rank: int | None

    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in {id(p): p for p in self.model.parameters() if p.requires_grad}.values())


def head_modules(model: nn.Module) -> list[str]:
    """The task head: top-level children other than the pretrained backbone (e.g. ``classifier``)."""
    backbone = getattr(model, "base_model_prefix", None)
    heads = [n for n, m in model.named_children() if n != backbone and any(True for _ in m.parameters())]
    if not heads:
        raise ValueError(f"Could not find a task head next to the backbone {backbone!r} of {type(model).__name__}.")
    return heads


def resolve_targets(model: nn.Module, targets: list[str] | None) -> list[str]:
    if targets:
        return list(targets)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in DEFAULT_TARGET_MODULES:
        raise ValueError(f"No default target modules for model type {model_type!r}; pass --target-modules.")
    return list(DEFAULT_TARGET_MODULES[model_type])


def _save_trainable(model: nn.Module) -> Callable[[Path], None]:
    def save(directory: Path) -> None:
        tensors = {n: p for n, p in model.named_parameters() if p.requires_grad}
        write_tensors(Path(directory) / "trainable.safetensors", tensors, metadata={"format": "pt"})

    return save


def _freeze_all_but(model: nn.Module, keep: Callable[[str], bool]) -> None:
    for name, param in model.named_parameters():
        param.requires_grad_(keep(name))


def _in_heads(name: str, heads: list[str]) -> bool:
    return any(name == h or name.startswith(h + ".") for h in heads)


def build_method(method: str, base: nn.Module, args: MethodArgs, total_steps: int) -> MethodHandle:
    """Wrap ``base`` for ``method``; ``total_steps`` drives the LoRA² and AdaLoRA budget schedules."""
    if method not in METHODS:
        raise ValueError(f"Unknown method {method!r}; choose one of {list(METHODS)}.")
    heads = head_modules(base)
    targets = resolve_targets(base, args.target_modules)
    noop = lambda step, lr: None  # noqa: E731
    if method == "lora2":
        config = LoRA2Config(k=args.k, r=args.r, alpha=args.alpha, dropout=args.dropout, init_std=args.init_std,
                             init=args.init,
                             target_modules=targets, modules_to_save=heads, target_rank=args.target_rank,
                             init_warmup=args.init_warmup, final_warmup=args.final_warmup,
                             mask_interval=args.mask_interval, beta1=args.beta1, beta2=args.beta2,
                             total_step=total_steps, orth_reg_weight=args.orth_reg_weight,
                             orth_terms=list(args.orth_terms), importance=args.importance)
        model = get_lora2_model(base, config)
        return MethodHandle(
            method, model, lambda step, lr: model.update_and_allocate(step), model.save_pretrained,
            lambda: {n: v["active"] for n, v in model.rank_pattern().items()}, args.r,
        )
    if method in ("lora", "adalora"):
        return _build_peft(method, base, args, targets, heads, total_steps)
    if method == "sora":
        layers = add_sora(base, targets, args.sora_r, args.sora_alpha, args.dropout)
        _freeze_all_but(base, lambda n: _in_heads(n, heads) or n.rsplit(".", 1)[-1] in ("lora_A", "lora_B", "gate"))
        return MethodHandle(
            method, base, lambda step, lr: proximal_step(layers, args.sora_lambda * lr), _save_trainable(base),
            lambda: {n: la.active_count() for n, la in layers.items()}, args.sora_r,
        )
    if method == "bitfit":
        _freeze_all_but(base, lambda n: _in_heads(n, heads) or n.endswith(".bias"))
    else:  # full
        _freeze_all_but(base, lambda n: True)
    return MethodHandle(method, base, noop, _save_trainable(base), lambda: None, None)


def _build_peft(method: str, base: nn.Module, args: MethodArgs, targets: list[str], heads: list[str],
                total_steps: int) -> MethodHandle:
    from peft import AdaLoraConfig, LoraConfig, get_peft_model

    if method == "lora":
        config = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.dropout,
                            target_modules=targets, modules_to_save=heads)
        model = get_peft_model(base, config)
        return MethodHandle(method, model, lambda step, lr: None, model.save_pretrained, lambda: None, None)
    config = AdaLoraConfig(init_r=args.adalora_init_r, target_r=args.adalora_target_r, lora_alpha=args.adalora_alpha,
                           lora_dropout=args.dropout, tinit=args.init_warmup, tfinal=args.final_warmup,
                           deltaT=args.mask_interval, beta1=args.beta1, beta2=args.beta2,
                           orth_reg_weight=args.orth_reg_weight, total_step=total_steps,
                           target_modules=targets, modules_to_save=heads)
    model = get_peft_model(base, config)

    def active() -> dict[str, int]:
        pattern = model.peft_config["default"].rank_pattern
        if not pattern:  # before the first allocation every triplet is active
            pattern = {n: [True] * args.adalora_init_r for n, m in model.named_modules() if hasattr(m, "lora_E")}
        return {re.sub(r"^base_model\.model\.|\.lora_E.*$", "", k): int(sum(v)) for k, v in pattern.items()}

    return MethodHandle(method, model, lambda step, lr: model.base_model.update_and_allocate(step),
                        model.save_pretrained, active, args.adalora_init_r)
