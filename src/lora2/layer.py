"""The LoRA² adapter layer: Δ = P Λ Q with P = v u and Q = 𝒰 𝒱 (method.md §1–2, §6).

Paper symbol → code name: v → ``p_outer`` (d_in×k), u → ``p_inner`` (k×r), Λ → ``lam`` (r),
𝒰 → ``q_inner`` (r×k), 𝒱 → ``q_outer`` (k×d_out). ``mask`` (r, buffer) marks the singular values
the allocator keeps. The forward never forms a d_in×d_out matrix: cost per token is
k·(d_in + d_out) + k², the same order as a rank-k LoRA.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .factors import ADAPTER_PARAMETERS, FACTOR_NAMES, FACTORS, LoRA2Factors, core, dense_update

SUPPORTED_TYPES = (nn.Linear, Conv1D)
__all__ = ["ADAPTER_PARAMETERS", "FACTORS", "FACTOR_NAMES", "SUPPORTED_TYPES", "LoRA2Layer", "base_shape",
           "effective_rank_of_factors"]


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


def effective_rank_of_factors(f: Mapping[str, torch.Tensor], scaling: float = 1.0) -> int:
    """rank(Δ) of one matrix from its tensors keyed by ``FACTOR_NAMES`` (see ``LoRA2Factors.effective_rank``)."""
    return LoRA2Factors.from_tensors(f, scaling).effective_rank()


def _state_dict_holds_w0(module: LoRA2Layer, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    """A merged layer's base weight is W0 + s·Δ; its state dict entry is W0 (rounded as unmerge() would), so a
    state dict means the same whether the model was merged or not."""
    key = prefix + "base_layer.weight"
    if module.merged and key in state_dict:
        with torch.no_grad():
            weight = module.base_layer.weight
            delta = module.get_delta_weight()
            wide = torch.promote_types(weight.dtype, delta.dtype)
            state_dict[key] = (weight.to(wide) - delta.to(wide)).to(weight.dtype)


def _unmerge_before_load(module: LoRA2Layer, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    module._merge_after_load = module.merged and any(k.startswith(prefix) for k in state_dict)
    if module._merge_after_load:
        module.unmerge()


def _merge_again_after_load(module: LoRA2Layer, incompatible_keys: Any) -> None:
    if getattr(module, "_merge_after_load", False):
        module._merge_after_load = False
        module.merge()


class LoRA2Layer(nn.Module):
    """A frozen linear map plus the LoRA² update ``s · x (P Λ Q)``."""

    def reset_factors(self, init: str = "orthogonal", init_std: float = 0.02) -> None:
        """Initialise the four factors; ``lam`` is left at zero so the update starts at Δ = 0.

        ``gaussian`` is the paper's N(0, init_std²). ``orthogonal`` starts each factor where the
        regulariser wants it (Gram over the smaller side = I): with the Gaussian init the inner
        factors start at norm ≈ init_std·√r, so the five-factor product needs hundreds of steps
        before the update moves the model, too long for short budgets.
        """
        for name in FACTORS:
            weight = getattr(self, name)
            with torch.no_grad():
                if init == "orthogonal":
                    nn.init.orthogonal_(weight)
                elif init == "gaussian":
                    nn.init.normal_(weight, mean=0.0, std=init_std)
                else:
                    raise ValueError(f"Unknown LoRA² factor init {init!r}; use 'gaussian' or 'orthogonal'.")

    def __init__(self, base_layer: nn.Module, k: int, r: int, alpha: float, dropout: float = 0.0,
                 init_std: float = 0.02, init: str = "orthogonal", scaling: float | None = None) -> None:
        """``scaling`` is s; None gives the paper's alpha / r (``LoRA2Model`` passes ``LoRA2Config.scaling``)."""
        super().__init__()
        d_in, d_out, self.fan_in_fan_out = base_shape(base_layer)
        self.base_layer = base_layer
        self.d_in, self.d_out, self.k, self.r = d_in, d_out, k, r
        self.scaling = float(alpha / r if scaling is None else scaling)
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
        self.reset_factors(init, init_std)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self.disabled = False
        # state dicts always hold W0: a merged layer writes W0 and loads by unmerging first, merging again after
        self.register_state_dict_post_hook(_state_dict_holds_w0)
        self.register_load_state_dict_pre_hook(_unmerge_before_load)
        self.register_load_state_dict_post_hook(_merge_again_after_load)

    def extra_repr(self) -> str:
        return f"d_in={self.d_in}, d_out={self.d_out}, k={self.k}, r={self.r}, scaling={self.scaling:g}"

    # Models read these off the layer they call (T5 casts to ``self.wo.weight.dtype``): the base layer's, which
    # are what the layer holds (the update is never folded into them unless merged).
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def core(self) -> torch.Tensor:
        """The k×k matrix s · p_inner · diag(lam ⊙ mask) · q_inner (differentiable)."""
        return core(self.p_inner, self.lam, self.mask, self.q_inner, self.scaling)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.merged or self.disabled:
            return result
        h = self.dropout(x.to(self.p_outer.dtype)) @ self.p_outer
        update = (h @ self.core()) @ self.q_outer
        if update.dtype == result.dtype:
            return result + update
        return (result + update).to(result.dtype)  # a half base: one rounding of the sum, as PEFT does

    def _apply(self, fn, recurse: bool = True):  # nn.Module's signature
        """``model.half()``, ``.bfloat16()``, ``.to(torch.float16)`` cast the base layer but leave the adapter and
        its mask in float32 (moved to the new device): in half precision most factor updates round away (after 30
        bf16 AdamW steps at lr 1e-4 only 1–19% of the entries had moved) and fp16 AdamW overflows. Float64 and
        other casts apply as usual."""
        kept = {}
        for name in FACTOR_NAMES:
            t = getattr(self, name)
            grad = t.grad if isinstance(t, nn.Parameter) else None
            # .data: new handles on the old storages, which the cast below replaces but does not touch
            kept[name] = (t.data, grad.data if grad is not None else None)
        module = super()._apply(fn, recurse)
        for name, (data, grad) in kept.items():
            now = getattr(self, name)
            if data.dtype != torch.float32 or now.dtype not in (torch.float16, torch.bfloat16):
                continue
            if isinstance(now, nn.Parameter):
                now.grad = None  # a half gradient cannot sit on a float32 parameter, even for a moment
                now.data = data.to(now.device)
                if grad is not None:
                    now.grad = grad.to(now.device)
            else:
                self._buffers[name] = data.to(now.device)
        return module

    # -- the mask: the allocator changes it only through these ----------------------------------
    @torch.no_grad()
    def set_mask(self, row: torch.Tensor, zero_pruned: bool = True) -> None:
        """Keep the singular values where ``row`` is 1. Pruned ones also get lam = 0 (the forward multiplies by the
        mask anyway), so exports see a clean zero. Between mask steps the optimizer's momentum may still move a
        pruned lam; one that the allocator brings back resumes from there, as in AdaLoRA. ``zero_pruned=False``
        restores a saved mask next to the lam saved with it, untouched (a resumed run must continue identically)."""
        self.mask.copy_(row)
        if zero_pruned:
            self.lam.mul_(self.mask)

    def active_count(self) -> int:
        return int(self.mask.sum().item())

    # -- dense views: merge, unmerge, export and rank all go through the factors' formulas -------
    def factors(self, detach: bool = True) -> LoRA2Factors:
        """This matrix's factors, mask, scaling and layout (detached unless ``detach=False``)."""
        tensors = {name: getattr(self, name) for name in FACTOR_NAMES}
        if detach:
            tensors = {name: t.detach() for name, t in tensors.items()}
        return LoRA2Factors.from_tensors(tensors, self.scaling, self.fan_in_fan_out)

    def get_delta_weight(self) -> torch.Tensor:
        """The dense update s·Δ in the base layer's own weight layout (d_out×d_in, Conv1D: d_in×d_out)."""
        return dense_update(self.p_outer, self.core(), self.q_outer, self.fan_in_fan_out)

    def effective_rank(self) -> int:
        """rank(Δ) ≤ min(k, active λ), from k×k work in float64 without forming Δ."""
        return self.factors().effective_rank()

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            return
        weight = self.base_layer.weight
        weight.add_(self.get_delta_weight())  # in-place promotes: W0 + Δ in float32, rounded once to W0's dtype
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        weight = self.base_layer.weight
        weight.sub_(self.get_delta_weight())
        self.merged = False
