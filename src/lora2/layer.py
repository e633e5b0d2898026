"""The LoRA² adapter layer: Δ = P Λ Q with P = v u and Q = 𝒰 𝒱 (SPEC §1–2, §6).

Paper symbol → code name: v → ``p_outer`` (d_in×k), u → ``p_inner`` (k×r), Λ → ``lam`` (r),
𝒰 → ``q_inner`` (r×k), 𝒱 → ``q_outer`` (k×d_out). ``mask`` (r, buffer) marks the singular values
the allocator keeps. The forward never forms a d_in×d_out matrix: cost per token is
k·(d_in + d_out) + k², the same order as a rank-k LoRA.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

ADAPTER_PARAMETERS = ("p_outer", "p_inner", "lam", "q_inner", "q_outer")
SUPPORTED_TYPES = (nn.Linear, Conv1D)


def base_shape(base: nn.Module) -> tuple[int, int, bool]:
    """(d_in, d_out, fan_in_fan_out) of a supported base layer; GPT-2's Conv1D stores Wᵀ."""
    if isinstance(base, nn.Linear):
        return base.in_features, base.out_features, False
    if isinstance(base, Conv1D):
        d_in, d_out = base.weight.shape
        return d_in, d_out, True
    raise TypeError(
        f"LoRA² adapts nn.Linear and transformers' Conv1D layers, not {type(base).__name__}. "
        "Remove this module from target_modules."
    )


class LoRA2Layer(nn.Module):
    """A frozen linear map plus the LoRA² update ``s · x (P Λ Q)``."""

    def __init__(self, base_layer: nn.Module, k: int, r: int, alpha: float, dropout: float = 0.0,
                 init_std: float = 0.02) -> None:
        super().__init__()
        d_in, d_out, self.fan_in_fan_out = base_shape(base_layer)
        self.base_layer = base_layer
        self.d_in, self.d_out, self.k, self.r = d_in, d_out, k, r
        self.scaling = alpha / r
        weight = base_layer.weight
        factory = {"device": weight.device, "dtype": weight.dtype if weight.is_floating_point() else torch.float32}
        if factory["dtype"] in (torch.float16, torch.bfloat16):
            factory["dtype"] = torch.float32  # adapter statistics and updates stay in float32
        self.p_outer = nn.Parameter(torch.empty(d_in, k, **factory))
        self.p_inner = nn.Parameter(torch.empty(k, r, **factory))
        self.lam = nn.Parameter(torch.zeros(r, **factory))
        self.q_inner = nn.Parameter(torch.empty(r, k, **factory))
        self.q_outer = nn.Parameter(torch.empty(k, d_out, **factory))
        self.register_buffer("mask", torch.ones(r, **factory))
        for name in ("p_outer", "p_inner", "q_inner", "q_outer"):
            nn.init.normal_(getattr(self, name), mean=0.0, std=init_std)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self.disabled = False

    def extra_repr(self) -> str:
        return f"d_in={self.d_in}, d_out={self.d_out}, k={self.k}, r={self.r}, scaling={self.scaling:g}"

    def core(self) -> torch.Tensor:
        """The k×k matrix s · p_inner · diag(lam ⊙ mask) · q_inner (scaling folded in: it is tiny)."""
        return (self.p_inner * (self.lam * self.mask * self.scaling)) @ self.q_inner

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.merged or self.disabled:
            return result
        h = self.dropout(x.to(self.p_outer.dtype)) @ self.p_outer
        update = (h @ self.core()) @ self.q_outer
        return result + update.to(result.dtype)

    # -- dense views: merge, unmerge, tests and export all go through get_delta_weight ----------
    def get_delta_weight(self) -> torch.Tensor:
        """The dense update in the base layer's own weight layout (d_out×d_in, Conv1D: d_in×d_out)."""
        delta = self.p_outer @ self.core() @ self.q_outer  # (d_in, d_out), the paper's layout
        return delta if self.fan_in_fan_out else delta.T

    def active_count(self) -> int:
        return int(self.mask.sum().item())

    def effective_rank(self) -> int:
        """rank(Δ) ≤ min(k, active λ), computed from k×k factors without forming Δ."""
        if self.active_count() == 0:
            return 0
        with torch.no_grad():
            r_p = torch.linalg.qr(self.p_outer.double(), mode="r").R  # (k, k)
            r_q = torch.linalg.qr(self.q_outer.double().T, mode="r").R  # (k, k)
            small = r_p @ self.core().double() @ r_q.T
            return int(torch.linalg.matrix_rank(small).item())

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            return
        weight = self.base_layer.weight
        weight.add_(self.get_delta_weight().to(weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        weight = self.base_layer.weight
        weight.sub_(self.get_delta_weight().to(weight.dtype))
        self.merged = False
