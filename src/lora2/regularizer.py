"""Orthogonality regulariser R (SPEC §3): squared Frobenius distances of Gram matrices to I.

Every Gram is formed over the factor's smaller dimension, so nothing larger than max(k, r)²
is built; PᵀP and QQᵀ reuse the k×k Grams of ``p_outer`` and ``q_outer``. Adapted matrices of
the same shape are stacked and their terms computed with batched matrix products: a handful of
ops per distinct shape (three in a BERT or Llama block) instead of some thirty per matrix.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from .layer import FACTORS, LoRA2Layer


def gram(matrix: torch.Tensor) -> torch.Tensor:
    """Gram matrix over the smaller dimension: MᵀM for a tall M, MMᵀ for a wide one (batched over leading dims)."""
    return matrix.mT @ matrix if matrix.shape[-2] >= matrix.shape[-1] else matrix @ matrix.mT


def _dist_to_identity(g: torch.Tensor) -> torch.Tensor:
    """‖G − I‖²_F, summed over any leading batch dimensions."""
    eye = torch.eye(g.shape[-1], dtype=g.dtype, device=g.device)
    return (g - eye).pow(2).sum()


def _terms(p_outer: torch.Tensor, p_inner: torch.Tensor, q_inner: torch.Tensor, q_outer: torch.Tensor,
           terms: Sequence[str]) -> dict[str, torch.Tensor]:
    """The enabled terms, summed over a stack of same-shaped matrices ((n, d_in, k), (n, k, r), ...)."""
    out: dict[str, torch.Tensor] = {}
    k = p_inner.shape[-2]
    g_p = p_outer.mT @ p_outer  # (n, k, k), shared by R_uv and R_PQ
    g_q = q_outer @ q_outer.mT  # (n, k, k), shared by R_UV and R_PQ
    if "uv" in terms:
        g_uv = g_p if p_outer.shape[-2] >= k else gram(p_outer)
        out["uv"] = _dist_to_identity(g_uv) + _dist_to_identity(gram(p_inner))
    if "UV" in terms:
        g_uv = g_q if q_outer.shape[-1] >= k else gram(q_outer)
        out["UV"] = _dist_to_identity(gram(q_inner)) + _dist_to_identity(g_uv)
    if "PQ" in terms:
        ptp = p_inner.mT @ g_p @ p_inner  # (n, r, r) = PᵀP
        qqt = q_inner @ g_q @ q_inner.mT  # (n, r, r) = QQᵀ
        out["PQ"] = _dist_to_identity(ptp) + _dist_to_identity(qqt)
    return out


def layer_terms(layer: LoRA2Layer, terms: Sequence[str]) -> dict[str, torch.Tensor]:
    """The enabled terms R_uv, R_UV, R_PQ of one adapted matrix."""
    return _terms(*(getattr(layer, name) for name in FACTORS), terms)


def orth_regularization(layers: Iterable[LoRA2Layer], terms: Sequence[str]) -> torch.Tensor:
    """R = mean over adapted matrices of the sum of the enabled terms (not yet scaled by γ)."""
    layers = list(layers)
    if not layers:
        raise ValueError("orth_regularization needs at least one LoRA² layer.")
    if not terms:
        return layers[0].lam.new_zeros(())
    groups: dict[tuple, list[LoRA2Layer]] = {}
    for layer in layers:
        groups.setdefault((layer.d_in, layer.d_out, layer.k, layer.r, layer.lam.dtype, layer.lam.device), []).append(layer)
    total = 0
    for group in groups.values():
        stacked = [torch.stack([getattr(la, name) for la in group]) for name in FACTORS]
        total = total + sum(_terms(*stacked, terms).values())
    return total / len(layers)
