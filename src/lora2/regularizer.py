"""Orthogonality regulariser R (method.md §3): squared Frobenius distances of Gram matrices to I.

Every Gram is formed over the factor's smaller dimension, so nothing larger than max(k, r)²
is built; PᵀP and QQᵀ reuse the k×k Grams of ``p_outer`` and ``q_outer``. Adapted matrices of
the same shape are stacked and their terms computed with batched matrix products: a handful of
ops per distinct shape (three in a BERT or Llama block) instead of some thirty per matrix.

R_PQ comes in two forms (``LoRA2Config.pq_form``). 'literal' is the paper's ‖PᵀP − I_r‖²_F, whose
floor is r − k when k < r. 'rank' asks only the m non-zero singular values P can have to be 1:
Σ_{i≤m} (σ_i² − 1)² = tr(A²) − 2·tr(A) + m with the k×k A = (p_inner p_innerᵀ)(p_outerᵀ p_outer),
whose eigenvalues are the σ_i² (and likewise for Q), so its minimum 0 is reachable.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from .config import ORTH_TERMS
from .layer import FACTORS, LoRA2Layer


def gram(matrix: torch.Tensor) -> torch.Tensor:
    """Gram matrix over the smaller dimension: MᵀM for a tall M, MMᵀ for a wide one (batched over leading dims)."""
    return matrix.mT @ matrix if matrix.shape[-2] >= matrix.shape[-1] else matrix @ matrix.mT


def _dist_to_identity(g: torch.Tensor) -> torch.Tensor:
    """‖G − I‖²_F, summed over any leading batch dimensions."""
    eye = torch.eye(g.shape[-1], dtype=g.dtype, device=g.device)
    return (g - eye).pow(2).sum()


def _unit_spectrum_distance(inner: torch.Tensor, outer: torch.Tensor, m: int) -> torch.Tensor:
    """Σ_{i≤m} (σ_i² − 1)² = tr(A²) − 2·tr(A) + m for A = inner · outer (k×k, eigenvalues σ_i²), summed over the batch."""
    a = inner @ outer
    return ((a * a.mT).sum(dim=(-2, -1)) - 2 * a.diagonal(dim1=-2, dim2=-1).sum(-1) + m).sum()


def _terms(p_outer: torch.Tensor, p_inner: torch.Tensor, q_inner: torch.Tensor, q_outer: torch.Tensor,
           terms: Sequence[str], pq_form: str = "literal") -> dict[str, torch.Tensor]:
    """The enabled terms, summed over a stack of same-shaped matrices ((n, d_in, k), (n, k, r), ...)."""
    out: dict[str, torch.Tensor] = {}
    k, r = p_inner.shape[-2:]
    g_p = p_outer.mT @ p_outer  # (n, k, k), shared by R_uv and R_PQ
    g_q = q_outer @ q_outer.mT  # (n, k, k), shared by R_UV and R_PQ
    if "uv" in terms:
        g_uv = g_p if p_outer.shape[-2] >= k else gram(p_outer)
        out["uv"] = _dist_to_identity(g_uv) + _dist_to_identity(gram(p_inner))
    if "UV" in terms:
        g_uv = g_q if q_outer.shape[-1] >= k else gram(q_outer)
        out["UV"] = _dist_to_identity(gram(q_inner)) + _dist_to_identity(g_uv)
    if "PQ" in terms and pq_form == "rank":
        # m = how many non-zero singular values P (d_in×r, rank ≤ min(d_in, k, r)) and Q can have
        out["PQ"] = (_unit_spectrum_distance(p_inner @ p_inner.mT, g_p, min(k, r, p_outer.shape[-2]))
                     + _unit_spectrum_distance(q_inner.mT @ q_inner, g_q, min(k, r, q_outer.shape[-1])))
    elif "PQ" in terms:
        ptp = p_inner.mT @ g_p @ p_inner  # (n, r, r) = PᵀP
        qqt = q_inner @ g_q @ q_inner.mT  # (n, r, r) = QQᵀ
        out["PQ"] = _dist_to_identity(ptp) + _dist_to_identity(qqt)
    return out


def _autocast_off(device: torch.device) -> contextlib.AbstractContextManager:
    """No autocast on ``device``'s type; nothing to switch off where autocast does not exist (e.g. meta)."""
    try:
        return torch.autocast(device.type, enabled=False)
    except RuntimeError:
        return contextlib.nullcontext()


def layer_terms(layer: LoRA2Layer, terms: Sequence[str], pq_form: str = "literal") -> dict[str, torch.Tensor]:
    """The enabled terms R_uv, R_UV, R_PQ of one adapted matrix."""
    return _terms(*(getattr(layer, name) for name in FACTORS), terms, pq_form)


def orth_term_means(layers: Iterable[LoRA2Layer], terms: Sequence[str],
                    pq_form: str = "literal") -> dict[str, torch.Tensor]:
    """Each enabled term's mean over the adapted matrices (R is their sum), in the order of ``terms``."""
    layers = list(layers)
    if not layers:
        raise ValueError("orth_regularization needs at least one LoRA² layer.")
    groups: dict[tuple, list[LoRA2Layer]] = {}
    for layer in layers:
        groups.setdefault((layer.d_in, layer.d_out, layer.k, layer.r, layer.lam.dtype, layer.lam.device), []).append(layer)
    sums: dict[str, torch.Tensor] = {}
    home = layers[0].lam.device  # a model spread over devices sums its terms on the first matrix's
    for group in groups.values():
        device = group[0].lam.device
        # Grams near I minus I cancel to noise in bf16 (R_PQ's rank form went negative, its gradient 27% off):
        # the terms are formed in float32 at least, whatever autocast region the loss is computed in.
        with _autocast_off(device):
            stacked = [torch.stack([getattr(la, name) for la in group]) for name in FACTORS]
            if stacked[0].dtype in (torch.float16, torch.bfloat16):
                stacked = [t.float() for t in stacked]
            for name, value in _terms(*stacked, terms, pq_form).items():
                value = value.to(home)
                sums[name] = sums[name] + value if name in sums else value
    return {name: sums[name] / len(layers) for name in terms if name in sums}


def orth_regularization(layers: Iterable[LoRA2Layer] | Any, terms: Sequence[str] | None = None,
                        pq_form: str | None = None) -> torch.Tensor:
    """R = mean over adapted matrices of the sum of the enabled terms (not yet scaled by γ). ``layers``: LoRA²
    layers, or a ``LoRA2Model`` (its layers, and its config's terms and P/Q form unless given); ``terms`` None:
    all three ('uv', 'UV', 'PQ'); ``pq_form`` None: 'literal'."""
    config = getattr(layers, "lora2_config", None)
    if config is not None and hasattr(layers, "lora2_layers"):  # a LoRA2Model
        if terms is None and pq_form is None:
            return layers.orth_regularization()
        terms = config.orth_terms if terms is None else terms
        layers, pq_form = layers.lora2_layers.values(), config.pq_form if pq_form is None else pq_form
    terms = list(ORTH_TERMS) if terms is None else terms
    pq_form = "literal" if pq_form is None else pq_form
    layers = list(layers)
    if not layers:
        raise ValueError("orth_regularization needs at least one LoRA² layer (or a LoRA2Model).")
    means = orth_term_means(layers, terms, pq_form)
    return sum(means.values(), layers[0].lam.new_zeros(()))
