"""Baselines that are not the method: SoRA (gated LoRA with a proximal L1 step), BitFit, full
fine-tuning and head-only (the floor every adapter must beat). Built through ``methods.build_method``.

SoRA (Ding et al., 2023, "Sparse Low-rank Adaptation"): ΔW x = B · (g ⊙ (A x)) · alpha/r. The gate g
trains with the other adapter weights and, after each optimizer step, is moved by the proximal
operator of λ‖g‖₁ (soft-thresholding by λ·lr), so gates the loss does not defend reach exactly zero
and their rank-one components drop out. Our own implementation; PEFT has none.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from ..targets import matches, set_submodule
from .args import GlueArgs
from .methods import Method


class SoRALayer(nn.Module):
    """A frozen ``nn.Linear`` plus a gated rank-r update."""

    def __init__(self, base_layer: nn.Linear, r: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"SoRA adapts nn.Linear layers, not {type(base_layer).__name__}.")
        self.base_layer = base_layer
        self.r, self.scaling = r, alpha / r
        weight = base_layer.weight
        self.lora_A = nn.Parameter(torch.empty(r, base_layer.in_features, device=weight.device))
        self.lora_B = nn.Parameter(torch.zeros(base_layer.out_features, r, device=weight.device))
        self.gate = nn.Parameter(torch.ones(r, device=weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = (self.dropout(x).to(self.lora_A.dtype) @ self.lora_A.T) * (self.gate * self.scaling)
        return self.base_layer(x) + (h @ self.lora_B.T).to(x.dtype)

    def active_count(self) -> int:
        return int(torch.count_nonzero(self.gate.detach()).item())


def add_sora(model: nn.Module, target_modules: list[str], r: int, alpha: float,
             dropout: float = 0.0) -> dict[str, SoRALayer]:
    """Replace matching ``nn.Linear`` modules by SoRA layers; freeze nothing (the caller decides)."""
    found = [(n, m) for n, m in model.named_modules() if n and matches(n, target_modules)]
    if not found:
        raise ValueError(f"SoRA target_modules={target_modules!r} matched no module.")
    layers = {}
    for name, module in found:
        layer = SoRALayer(module, r, alpha, dropout)
        set_submodule(model, name, layer)
        layers[name] = layer
    return layers


@torch.no_grad()
def proximal_step(layers: dict[str, SoRALayer], threshold: float) -> None:
    """g ← sign(g) · max(|g| − threshold, 0): the proximal operator of threshold·‖g‖₁."""
    for layer in layers.values():
        gate = layer.gate
        gate.copy_(torch.sign(gate) * torch.clamp(gate.abs() - threshold, min=0.0))


class SoRAMethod(Method):
    name = "sora"

    def __init__(self, model: nn.Module, layers: dict[str, SoRALayer], r: int, l1: float) -> None:
        super().__init__(model)
        self.layers, self.initial_rank, self.l1 = layers, r, l1

    def after_step(self, step: int, lr: float) -> None:
        proximal_step(self.layers, self.l1 * lr)

    def active_pattern(self) -> dict[str, int]:
        return {n: layer.active_count() for n, layer in self.layers.items()}

    def deltas(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for layer in self.layers.values():
            yield (layer.lora_B * (layer.gate * layer.scaling)) @ layer.lora_A, layer.base_layer.weight


def freeze_all_but(model: nn.Module, keep: Callable[[str], bool]) -> None:
    for name, param in model.named_parameters():
        param.requires_grad_(keep(name))


class FrozenBaseMethod(Method):
    """BitFit, full fine-tuning and head-only: the model itself, with a choice of trainable parameters.

    ``watched``: the target matrices whose change ‖W − W0‖ is reported; W0 is copied only when they train.
    """

    def __init__(self, name: str, model: nn.Module, keep: Callable[[str], bool], watched: list[str] | None = None) -> None:
        super().__init__(model)
        self.name = name
        freeze_all_but(model, keep)
        modules = [m for n, m in model.named_modules() if n and watched and matches(n, watched) and hasattr(m, "weight")]
        self.initial = [(m.weight, m.weight.detach().clone() if m.weight.requires_grad else None) for m in modules]

    def deltas(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for weight, start in self.initial:
            if start is None:
                yield torch.zeros_like(weight), weight
            else:  # W0 was copied before the model moved to its device
                start = start.to(weight.device)
                yield weight - start, start


def build_baseline(args: GlueArgs, base: nn.Module, settings: dict[str, Any], targets: list[str],
                   heads: list[str]) -> Method:
    def in_heads(name: str) -> bool:
        return any(name == h or name.startswith(h + ".") for h in heads)

    if args.method == "sora":
        layers = add_sora(base, targets, args.sora_r, args.sora_alpha, settings["dropout"])
        gated = re.compile(r"(^|\.)(lora_A|lora_B|gate)$")
        freeze_all_but(base, lambda n: in_heads(n) or gated.search(n) is not None)
        return SoRAMethod(base, layers, args.sora_r, args.sora_lambda)
    if args.method == "bitfit":
        return FrozenBaseMethod("bitfit", base, lambda n: in_heads(n) or n.endswith(".bias"), targets)
    if args.method == "head":
        return FrozenBaseMethod("head", base, in_heads)
    if args.method == "full":
        return FrozenBaseMethod("full", base, lambda n: True, targets)
    raise ValueError(f"{args.method!r} is not a baseline method.")
