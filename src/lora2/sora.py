"""SoRA baseline (Ding et al., 2023, "Sparse Low-rank Adaptation"): LoRA with a gate vector.

ΔW x = B · (g ⊙ (A x)) · alpha/r. The gate g is trained with the other adapter weights and, after
each optimizer step, moved by the proximal operator of λ‖g‖₁ (soft-thresholding by λ·lr), so
gates that the loss does not defend reach exactly zero and their rank-one components drop out.
Our own implementation; PEFT has none.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .model import _matches, _set_submodule


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


def add_sora(model: nn.Module, target_modules: list[str] | str, r: int, alpha: float,
             dropout: float = 0.0) -> dict[str, SoRALayer]:
    """Replace matching ``nn.Linear`` modules by SoRA layers; freeze nothing (the caller decides)."""
    found = [(n, m) for n, m in model.named_modules() if n and _matches(n, target_modules)]
    if not found:
        raise ValueError(f"SoRA target_modules={target_modules!r} matched no module.")
    layers = {}
    for name, module in found:
        layer = SoRALayer(module, r, alpha, dropout)
        _set_submodule(model, name, layer)
        layers[name] = layer
    return layers


@torch.no_grad()
def proximal_step(layers: dict[str, SoRALayer], threshold: float) -> None:
    """g ← sign(g) · max(|g| − threshold, 0): the proximal operator of threshold·‖g‖₁."""
    for layer in layers.values():
        gate = layer.gate
        gate.copy_(torch.sign(gate) * torch.clamp(gate.abs() - threshold, min=0.0))
