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
FACTORS = ("p_outer", "p_inner", "q_inner", "q_outer")  # randomly initialised and regularised (lam starts at 0)
FACTOR_NAMES = (*ADAPTER_PARAMETERS, "mask")  # what Δ is computed from: ``LoRA2Layer.factors()``, saved adapters
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


# -- rank of Δ from the factors alone (k×k work, float64, only active λ) -------------------------
def reduced_factors(f: dict[str, torch.Tensor], scaling: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                  torch.Tensor, torch.Tensor]:
    """Δ = Qp · (left · right) · Qqᵀ in float64, with Qp, Qq orthonormal and left/right at most k×k.

    Only the active, non-zero λ enter, so rank(left · right) ≤ #active structurally and float
    rounding of a k×k core cannot make a pruned matrix look full-rank.
    """
    lam = f["lam"].double() * f["mask"].double() * scaling
    active = torch.nonzero(lam, as_tuple=True)[0]
    qp, rp = torch.linalg.qr(f["p_outer"].double())  # (d_in, k), (k, k)
    qq, rq = torch.linalg.qr(f["q_outer"].double().T)  # (d_out, k), (k, k)
    left = (rp @ f["p_inner"].double()[:, active]) * lam[active]  # (k, a)
    right = f["q_inner"].double()[active] @ rq.T  # (a, k)
    return qp, left, right, qq, lam


def small_svd(left: torch.Tensor, right: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                                 torch.Tensor]:
    """left · right = Q1 · (U S Vᵀ) · Q2ᵀ with an SVD of an m×m matrix, m = min(k, a)."""
    q1, r1 = torch.linalg.qr(left)  # (k, m), (m, a)
    q2, r2 = torch.linalg.qr(right.T)  # (k, m), (m, a)
    u, s, vh = torch.linalg.svd(r1 @ r2.T)
    return q1, u, s, vh, q2


def numerical_rank(s: torch.Tensor, dtype: torch.dtype) -> int:
    """Singular values above m · ε(adapter dtype) · σ_max: the ones the forward pass can resolve."""
    if s.numel() == 0 or float(s[0]) == 0.0:
        return 0
    eps = torch.finfo(dtype).eps if dtype.is_floating_point else torch.finfo(torch.float32).eps
    return int((s > s[0] * s.numel() * eps).sum().item())


def effective_rank_of_factors(f: dict[str, torch.Tensor], scaling: float = 1.0) -> int:
    """rank(Δ) of one LoRA² matrix from its factors (``FACTOR_NAMES``), from k×k work only."""
    _, left, right, _, _ = reduced_factors(f, scaling)
    if left.shape[1] == 0:
        return 0
    _, _, s, _, _ = small_svd(left, right)
    return numerical_rank(s, f["p_outer"].dtype)


class LoRA2Layer(nn.Module):
    """A frozen linear map plus the LoRA² update ``s · x (P Λ Q)``."""

    def reset_factors(self, init: str = "gaussian", init_std: float = 0.02) -> None:
        """Initialise the four factors; ``lam`` is left at zero so the update starts at Δ = 0.

        ``gaussian`` is the spec's N(0, init_std²). ``orthogonal`` starts each factor where the
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
                 init_std: float = 0.02, init: str = "gaussian") -> None:
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
        self.reset_factors(init, init_std)
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

    def factors(self) -> dict[str, torch.Tensor]:
        """The five factors and the mask, detached (what rank and export computations read)."""
        return {name: getattr(self, name).detach() for name in FACTOR_NAMES}

    def effective_rank(self) -> int:
        """rank(Δ) ≤ min(k, active λ), from k×k work in float64 without forming Δ."""
        return effective_rank_of_factors(self.factors(), self.scaling)

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
