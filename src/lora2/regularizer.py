"""Orthogonality regulariser R (SPEC §3): squared Frobenius distances of Gram matrices to I.

Every Gram is formed over the factor's smaller dimension, so nothing larger than max(k, r)²
is built; PᵀP and QQᵀ reuse the k×k Grams of ``p_outer`` and ``q_outer``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from .layer import LoRA2Layer


def gram(matrix: torch.Tensor) -> torch.Tensor:
    """Gram matrix over the smaller dimension: MᵀM for a tall M, MMᵀ for a wide one."""
    return matrix.T @ matrix if matrix.shape[0] >= matrix.shape[1] else matrix @ matrix.T


def _dist_to_identity(g: torch.Tensor) -> torch.Tensor:
    eye = torch.eye(g.shape[0], dtype=g.dtype, device=g.device)
    return (g - eye).pow(2).sum()


def layer_terms(layer: LoRA2Layer, terms: Sequence[str]) -> dict[str, torch.Tensor]:
    """The enabled terms R_uv, R_UV, R_PQ of one adapted matrix."""
    out: dict[str, torch.Tensor] = {}
    g_p = layer.p_outer.T @ layer.p_outer  # (k, k), shared by R_uv and R_PQ
    g_q = layer.q_outer @ layer.q_outer.T  # (k, k), shared by R_UV and R_PQ
    if "uv" in terms:
        g_uv = g_p if layer.d_in >= layer.k else gram(layer.p_outer)
        out["uv"] = _dist_to_identity(g_uv) + _dist_to_identity(gram(layer.p_inner))
    if "UV" in terms:
        g_uv = g_q if layer.d_out >= layer.k else gram(layer.q_outer)
        out["UV"] = _dist_to_identity(gram(layer.q_inner)) + _dist_to_identity(g_uv)
    if "PQ" in terms:
        ptp = layer.p_inner.T @ g_p @ layer.p_inner  # (r, r) = PᵀP
        qqt = layer.q_inner @ g_q @ layer.q_inner.T  # (r, r) = QQᵀ
        out["PQ"] = _dist_to_identity(ptp) + _dist_to_identity(qqt)
    return out


def orth_regularization(layers: Iterable[LoRA2Layer], terms: Sequence[str]) -> torch.Tensor:
    """R = mean over adapted matrices of the sum of the enabled terms (not yet scaled by γ)."""
    layers = list(layers)
    if not layers:
        raise ValueError("orth_regularization needs at least one LoRA² layer.")
    if not terms:
        return layers[0].lam.new_zeros(())
    total = sum(sum(layer_terms(layer, terms).values()) for layer in layers)
    return total / len(layers)
