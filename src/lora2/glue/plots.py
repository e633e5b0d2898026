"""Plots of one run: the paper's Fig. 3 heatmap (active singular values per layer and matrix type) and
the dev-metric learning curve."""

from __future__ import annotations

import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from ..persistence import atomic_write

# Friendly row labels for the usual module names (anything else keeps its own name).
MATRIX_LABELS = {
    "attention.self.query": "Q", "attention.self.key": "K", "attention.self.value": "V",
    "attention.self.query_proj": "Q", "attention.self.key_proj": "K", "attention.self.value_proj": "V",
    "attention.output.dense": "O", "intermediate.dense": "FF.W1", "output.dense": "FF.W2",
    "self_attn.q_proj": "Q", "self_attn.k_proj": "K", "self_attn.v_proj": "V", "self_attn.o_proj": "O",
    "mlp.gate_proj": "FF.gate", "mlp.up_proj": "FF.up", "mlp.down_proj": "FF.down",
    "attn.c_attn": "QKV", "attn.c_proj": "O", "mlp.c_fc": "FF.W1", "mlp.c_proj": "FF.W2",
}


def pattern_grid(pattern: dict[str, int]) -> tuple[list[str], list[int], np.ndarray]:
    """(row labels, layer indices, counts[row, layer]) from {module name: active count}."""
    cells: dict[tuple[str, int], int] = {}
    for name, count in pattern.items():
        match = re.search(r"\.(\d+)\.(.+)$", name)
        if not match:
            continue
        layer, kind = int(match.group(1)), match.group(2)
        cells[(MATRIX_LABELS.get(kind, kind), layer)] = count
    if not cells:
        raise ValueError("No layer index found in the adapted module names; cannot draw a per-layer heatmap.")
    rows = list(dict.fromkeys(label for label, _ in cells))
    layers = sorted({layer for _, layer in cells})
    grid = np.full((len(rows), len(layers)), np.nan)
    for (label, layer), count in cells.items():
        grid[rows.index(label), layers.index(layer)] = count
    return rows, layers, grid


def heatmap_title(title: str, pattern: dict[str, int], grid: np.ndarray, effective_total: int | None) -> str:
    """The counts over every adapted matrix, those outside the layer grid (a pooler) included and said so."""
    total, drawn = sum(pattern.values()), int(np.nansum(grid))
    outside = "" if drawn == total else f" ({total - drawn} outside the layers, not drawn)"
    effective = "" if effective_total is None else f"; effective rank (sum): {effective_total}"
    return f"{title}\nactive singular values: {total}{outside}{effective}"


def save_heatmap(pattern: dict[str, int], path: str | Path, title: str, vmax: int | None = None,
                 effective_total: int | None = None) -> Path:
    """Write the heatmap PNG atomically; cells are annotated with their counts. ``effective_total``: the summed
    rank(ΔW), shown beside the active count (for LoRA² it is at most k per matrix, whatever the count)."""
    rows, layers, grid = pattern_grid(pattern)
    fig, ax = plt.subplots(figsize=(max(4.0, 0.6 * len(layers) + 2), max(2.5, 0.45 * len(rows) + 1.2)))
    image = ax.imshow(grid, cmap="viridis", vmin=0, vmax=vmax if vmax is not None else np.nanmax(grid), aspect="auto")
    ax.set_xticks(range(len(layers)), [str(layer + 1) for layer in layers])
    ax.set_yticks(range(len(rows)), rows)
    ax.set_xlabel("layer")
    for i in range(len(rows)):
        for j in range(len(layers)):
            if not np.isnan(grid[i, j]):
                value = int(grid[i, j])
                bright = vmax is not None and value > 0.6 * vmax
                ax.text(j, i, str(value), ha="center", va="center", fontsize=8, color="black" if bright else "white")
    ax.set_title(heatmap_title(title, pattern, grid, effective_total), fontsize=10)
    fig.colorbar(image, ax=ax, fraction=0.04, pad=0.02)
    fig.tight_layout()
    path = Path(path)
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)
    return path


def save_learning_curve(history: list[dict[str, float]], main_metric: str, path: str | Path, title: str) -> Path:
    """Dev metrics against optimizer step (the main metric bold), written atomically as PNG."""
    if not history:
        raise ValueError("No evaluation in the history; nothing to plot.")
    steps = [h["step"] for h in history]
    fig, ax = plt.subplots(figsize=(6.0, 3.6))
    for name in [k for k in history[0] if k != "step"]:
        main = name == main_metric
        ax.plot(steps, [h[name] for h in history], marker="o", markersize=3, linewidth=2.0 if main else 1.0,
                alpha=1.0 if main else 0.6, label=name)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("dev metric")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)
    return path
