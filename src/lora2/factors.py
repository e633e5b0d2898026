"""One source of the Δ math (method.md §2, §6): the k×k core, the dense update, its rank, its LoRA form.

``core`` and ``dense_update`` are the formulas. The layer calls them on its live parameters (its
differentiable forward and ``get_delta_weight``); ``LoRA2Factors`` — a frozen snapshot of one
matrix's five factors, mask, scaling and layout, from a live layer or a saved adapter — calls them
for merge, export, rank reports and tests. Nothing else re-derives Δ.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

ADAPTER_PARAMETERS = ("p_outer", "p_inner", "lam", "q_inner", "q_outer")
FACTORS = ("p_outer", "p_inner", "q_inner", "q_outer")  # randomly initialised and regularised (lam starts at 0)
FACTOR_NAMES = (*ADAPTER_PARAMETERS, "mask")  # what Δ is computed from: ``LoRA2Layer.factors()``, saved adapters


def core(p_inner: torch.Tensor, lam: torch.Tensor, mask: torch.Tensor, q_inner: torch.Tensor,
         scaling: float) -> torch.Tensor:
    """The k×k matrix s · p_inner · diag(lam ⊙ mask) · q_inner (s folded in here: it is the smallest tensor)."""
    return (p_inner * (lam * mask * scaling)) @ q_inner


def dense_update(p_outer: torch.Tensor, core_matrix: torch.Tensor, q_outer: torch.Tensor,
                 fan_in_fan_out: bool) -> torch.Tensor:
    """s·Δ in the base layer's weight layout (d_out×d_in; GPT-2's Conv1D stores d_in×d_out)."""
    delta = p_outer @ core_matrix @ q_outer  # (d_in, d_out), the paper's layout
    return delta if fan_in_fan_out else delta.T


def numerical_rank(s: torch.Tensor, dtype: torch.dtype) -> int:
    """Singular values above m · ε(adapter dtype) · σ_max: the ones the forward pass can resolve."""
    if s.numel() == 0 or float(s[0]) == 0.0:
        return 0
    eps = torch.finfo(dtype).eps if dtype.is_floating_point else torch.finfo(torch.float32).eps
    return int((s > s[0] * s.numel() * eps).sum().item())


def float64_device(device: torch.device) -> torch.device:
    """Where the float64 rank/export work on ``device``'s tensors runs: MPS has no float64, so the CPU there
    (the work is k×k or one matrix product); anywhere else, in place."""
    return torch.device("cpu") if device.type == "mps" else device


@dataclass(frozen=True)
class LoRA2Factors:
    """One adapted matrix: the five factors, the mask, the scale s and the base layout."""

    p_outer: torch.Tensor  # (d_in, k)
    p_inner: torch.Tensor  # (k, r)
    lam: torch.Tensor  # (r,)
    q_inner: torch.Tensor  # (r, k)
    q_outer: torch.Tensor  # (k, d_out)
    mask: torch.Tensor  # (r,)
    scaling: float
    fan_in_fan_out: bool = False

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor], scaling: float,
                     fan_in_fan_out: bool = False) -> LoRA2Factors:
        """From a mapping keyed by ``FACTOR_NAMES`` (e.g. one matrix's tensors of a saved adapter)."""
        return cls(**{name: tensors[name] for name in FACTOR_NAMES}, scaling=float(scaling),
                   fan_in_fan_out=bool(fan_in_fan_out))

    def tensors(self) -> dict[str, torch.Tensor]:
        """The six tensors keyed by ``FACTOR_NAMES`` (what an adapter file stores)."""
        return {name: getattr(self, name) for name in FACTOR_NAMES}

    def to(self, *args: Any, **kwargs: Any) -> LoRA2Factors:
        """A copy with every tensor moved/cast by ``Tensor.to(*args, **kwargs)``."""
        return dataclasses.replace(self, **{n: t.to(*args, **kwargs) for n, t in self.tensors().items()})

    def active_count(self) -> int:
        return int(self.mask.sum().item())

    # -- Δ ------------------------------------------------------------------------------------
    def core(self) -> torch.Tensor:
        return core(self.p_inner, self.lam, self.mask, self.q_inner, self.scaling)

    def delta_weight(self) -> torch.Tensor:
        """s·Δ in the base weight's layout: what merge adds to W0."""
        return dense_update(self.p_outer, self.core(), self.q_outer, self.fan_in_fan_out)

    # -- rank and LoRA form from k×k work (float64, only active λ) -----------------------------
    def _float64(self) -> LoRA2Factors:
        # move, then cast: one MPS → CPU float64 copy would ask MPS for the float64 cast it does not have
        return self.to(float64_device(self.p_outer.device)).to(torch.float64)

    def _reduced(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """s·Δ = Qp · (left · right) · Qqᵀ in float64, Qp and Qq orthonormal, left/right at most k×k.

        Only the active, non-zero λ enter, so rank(left · right) ≤ #active structurally and float
        rounding of a k×k core cannot make a pruned matrix look full-rank.
        """
        f = self._float64()
        lam = f.lam * f.mask * self.scaling
        active = torch.nonzero(lam, as_tuple=True)[0]
        qp, rp = torch.linalg.qr(f.p_outer)  # (d_in, k), (k, k)
        qq, rq = torch.linalg.qr(f.q_outer.T)  # (d_out, k), (k, k)
        left = (rp @ f.p_inner[:, active]) * lam[active]  # (k, a)
        right = f.q_inner[active] @ rq.T  # (a, k)
        return qp, left, right, qq

    @staticmethod
    def _small_svd(left: torch.Tensor, right: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """left · right = Q1 · (U S Vᵀ) · Q2ᵀ with an SVD of an m×m matrix, m = min(k, a)."""
        q1, r1 = torch.linalg.qr(left)  # (k, m), (m, a)
        q2, r2 = torch.linalg.qr(right.T)  # (k, m), (m, a)
        u, s, vh = torch.linalg.svd(r1 @ r2.T)
        return q1, u, s, vh, q2

    def effective_rank(self) -> int:
        """rank(Δ) ≤ min(k, active λ), resolved at the adapter dtype's precision, without forming Δ."""
        _, left, right, _ = self._reduced()
        if left.shape[1] == 0:
            return 0
        return numerical_rank(self._small_svd(left, right)[2], self.p_outer.dtype)

    def as_lora(self, exact_rank: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) of a plain LoRA with scaling 1 and ``B @ A`` = s·Δᵀ (method.md §6), in the dtype of ``p_outer``.

        ``exact_rank=False``: rank k, ``A = p_outerᵀ``, ``B = (core · q_outer)ᵀ``. ``exact_rank=True``:
        rank = ``effective_rank()`` (may be 0), singular values split evenly as √σ between A and B.
        """
        dtype, device = self.p_outer.dtype, self.p_outer.device
        if not exact_rank:
            f = self._float64()
            a, b = f.p_outer.T, (f.core() @ f.q_outer).T
            return a.to(device=device, dtype=dtype).contiguous(), b.to(device=device, dtype=dtype).contiguous()
        qp, left, right, qq = self._reduced()
        if left.shape[1] == 0:
            return (torch.zeros(0, qp.shape[0], dtype=dtype, device=device),
                    torch.zeros(qq.shape[0], 0, dtype=dtype, device=device))
        q1, u, s, vh, q2 = self._small_svd(left, right)
        rank = numerical_rank(s, dtype)
        root = s[:rank].sqrt()
        a = ((qp @ q1 @ u[:, :rank]) * root).T  # (rank, d_in)
        b = (qq @ q2 @ vh[:rank].T) * root  # (d_out, rank)
        return a.to(device=device, dtype=dtype).contiguous(), b.to(device=device, dtype=dtype).contiguous()

    # -- validation of tensors read from disk --------------------------------------------------
    def check(self, k: int, r: int, name: str, where: str) -> None:
        """Raise ``ValueError`` unless every tensor has its k/r shape and is finite floating point."""
        d_in, d_out = self.p_outer.shape[0], self.q_outer.shape[-1]
        expected = {"p_outer": (d_in, k), "p_inner": (k, r), "lam": (r,), "q_inner": (r, k), "q_outer": (k, d_out),
                    "mask": (r,)}
        for p, want in expected.items():
            t = getattr(self, p)
            if tuple(t.shape) != want:
                raise ValueError(f"{name}.{p} in {where} has shape {tuple(t.shape)}, expected {want} for k={k}, "
                                 f"r={r}; the adapter is corrupted or its config does not match its weights.")
            if not t.is_floating_point() or not bool(torch.isfinite(t).all()):
                raise ValueError(f"{name}.{p} in {where} is not a finite floating-point tensor; the adapter is broken.")
