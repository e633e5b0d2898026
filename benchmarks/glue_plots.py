"""Plots of the GLUE protocol v2 from the result files, for the groups marked "plots": per task, the dev
main metric against step and the median relative update ‖ΔW‖/‖W0‖ against step (log scale), one line per
variant at its chosen lr: the mean over seeds, with the min–max band. Curves show what final/best tables
hide: whether a method still climbs at the budget's end, or peaked early. A library module of glue.py.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from glue_plan import Plan
from glue_protocol import variant_label

Series = dict[int, float]  # step -> value


def metric_series(result: dict[str, Any]) -> Series:
    name = result["main_metric"]
    return {int(e["step"]): float(e[name]) for e in result.get("eval_history") or [] if e.get(name) is not None}


def norm_series(result: dict[str, Any]) -> Series:
    return {int(e["step"]): float(e["median"]) for e in result.get("update_norms") or []
            if (e.get("median") or 0) > 0}  # zeros dropped: log axis


def band(series: list[Series]) -> tuple[list[int], list[float], list[float], list[float]]:
    """Steps every seed evaluated at, with the mean, min and max over seeds there."""
    if not series:
        return [], [], [], []
    steps = sorted(set.intersection(*(set(s) for s in series)))
    values = [[s[step] for s in series] for step in steps]
    return steps, [sum(v) / len(v) for v in values], [min(v) for v in values], [max(v) for v in values]


def style(index: int) -> dict[str, str]:
    """A variant's line style: ten colors, then the same colors dashed (the dynamics group has 12 variants)."""
    return {"color": f"C{index % 10}", "linestyle": "-" if index < 10 else "--"}


def _figure(curves: list[tuple[str, dict[str, str], list[Series]]], title: str, ylabel: str, log: bool,
            path: Path) -> bool:
    """One line with a min–max band per (label, style, series) curve; False (no file) when no curve has a point."""
    curves = [c for c in curves if band(c[2])[0]]
    if not curves:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lora2.persistence import atomic_write

    fig, ax = plt.subplots(figsize=(10, 4.2))
    for label, line, series in curves:
        steps, mean, low, high = band(series)
        ax.plot(steps, mean, **line, marker="." if len(steps) < 30 else None, label=f"{label} (n={len(series)})")
        if len(series) > 1:
            ax.fill_between(steps, low, high, color=line["color"], alpha=0.2, linewidth=0)
    if log:
        ax.set_yscale("log")
    ax.set(title=title, xlabel="optimizer step", ylabel=ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the lines, never over them
    fig.tight_layout()
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    finally:
        plt.close(fig)
    return True


def write_plots(protocol: dict[str, Any], plan: Plan, out_dir: Path) -> list[Path]:
    """Every plot that has data; returns the files written."""
    written = []
    for group_name, group in protocol["groups"].items():
        if not group.get("plots"):
            continue
        for task in group["tasks"]:
            cells = [(variant_label(protocol, group_name, v), style(i), plan.cell(group_name, v, task))
                     for i, v in enumerate(group["variants"])]  # a variant keeps its color across figures
            task_label = protocol["tasks"][task].get("label", task)
            figures = (("metric", metric_series, f"dev {task_label}", False),
                       ("update-norms", norm_series, "median ‖ΔW‖ / ‖W0‖", True))
            for suffix, series_of, ylabel, log in figures:
                curves = [(label, line, [s for s in map(series_of, results) if s]) for label, line, results in cells]
                path = Path(out_dir) / f"{group_name}-{task}-{suffix}.png"
                if _figure(curves, f"{group_name}: {task_label}", ylabel, log, path):
                    written.append(path)
    return written


if __name__ == "__main__":  # a library module: its command line is the runner's
    import glue

    sys.exit(glue.main())
