"""Protocol v2 against the LoRA² paper's own tables: per group, our cell next to the paper's number with both
ranks, the rank agreement (Kendall's tau), and the seed spread that says which differences are noise. A library
module of benchmarks/glue.py (tables.md); the paper's numbers live in ``glue_paper.json``.

The paper ran DeBERTa-v3-base with one run per cell and reports the best evaluation during training, so the
comparison is on orderings, never on absolute values: MiniLM sits several points lower on every task.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any

from glue_plan import Plan, metric
from glue_protocol import variant_label

PAPER = Path(__file__).resolve().parent / "glue_paper.json"
DASH = "—"


def load_paper(path: str | Path = PAPER) -> dict[str, Any]:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def rank_among(value: float, others: list[float]) -> int:
    """1 + how many of the other rows are strictly higher (ties share the better rank)."""
    return 1 + sum(o > value for o in others)


def kendall_tau(ours: list[float], theirs: list[float]) -> float:
    """Kendall's tau-b of two orderings of the same rows; NaN with fewer than 3 rows or a constant side."""
    if len(ours) < 3 or len(set(ours)) < 2 or len(set(theirs)) < 2:
        return math.nan
    from scipy.stats import kendalltau

    return float(kendalltau(ours, theirs).statistic)


def _mean(plan: Plan, group: str, variant: str, task: str, which: str) -> float | None:
    values = [metric(r, which) for r in plan.cell(group, variant, task)]
    return 100 * statistics.fmean(values) if values else None


def seed_spread(protocol: dict[str, Any], plan: Plan, group_name: str) -> list[str]:
    """For a one-seed group that borrows its lr from a searched variant: that variant's seed sd per task."""
    group = protocol["groups"][group_name]
    source = group.get("learning_rate")
    if len(group["seeds"]) != 1 or not isinstance(source, str) or ":" not in source:
        return []
    src_group, _, src_variant = source.partition(":")
    cells = []
    for task in group["tasks"]:
        values = [metric(r, "final") for r in plan.cell(src_group, src_variant, task)]
        label = protocol["tasks"][task].get("label", task)
        cells.append(f"{label} {100 * statistics.stdev(values):.2f} (n={len(values)})" if len(values) > 1
                     else f"{label} {DASH}")
    if all(cell.endswith(DASH) for cell in cells):
        return []  # no seeds beyond the first yet
    return [f"Seed spread for scale: the final metric's sample sd of {src_group}'s "
            f"{variant_label(protocol, src_group, src_variant)} at the same lr: " + ", ".join(cells)
            + ". With one seed per cell here, a difference smaller than about twice that is within seed noise."]


def _pairwise(protocol: dict[str, Any], plan: Plan, group_name: str) -> list[str]:
    """Each variant against the group's first one, per task (final and best), for groups without paper numbers."""
    group = protocol["groups"][group_name]
    variants = list(group["variants"])
    base, lines = variants[0], []
    for variant in variants[1:]:
        cells = []
        for task in group["tasks"]:
            diffs = []
            for which in ("final", "best"):
                a, b = _mean(plan, group_name, base, task, which), _mean(plan, group_name, variant, task, which)
                diffs.append(DASH if a is None or b is None else f"{b - a:+.2f}")
            cells.append(f"{protocol['tasks'][task].get('label', task)} {diffs[0]} / {diffs[1]}")
        lines.append(f"{variant_label(protocol, group_name, variant)} minus "
                     f"{variant_label(protocol, group_name, base)} (final / best ×100): " + ", ".join(cells) + ".")
    return lines


def _with_avg(table: dict[str, dict[str, float | None]], tasks: list[str]) -> dict[str, dict[str, float | None]]:
    """Add each row's mean over the group's tasks, once every task has a value."""
    for cells in table.values():
        known = [cells[t] for t in tasks if cells[t] is not None]
        cells["avg"] = statistics.fmean(known) if len(known) == len(tasks) else None
    return table


def paper_block(protocol: dict[str, Any], plan: Plan, group_name: str, paper: dict[str, Any]) -> list[str]:
    """Markdown lines comparing one group with the paper's table (nothing when the paper has no counterpart)."""
    spec = paper.get("groups", {}).get(group_name)
    if not spec:
        return []
    group = protocol["groups"][group_name]
    tasks = group["tasks"]
    which = paper.get("compare_on", "best")
    lines = ["**Against the paper**", ""]
    if "rows" not in spec:
        lines += [spec.get("claim", ""), "", *_pairwise(protocol, plan, group_name)]
        return [*lines, "", *seed_spread(protocol, plan, group_name), ""]
    rows, aliases = spec["rows"], spec.get("aliases", {})
    shown = [v for v in group["variants"] if v in rows or aliases.get(v) in rows]
    if not shown:
        return []
    theirs = _with_avg({v: {t: rows[v].get(t) for t in tasks} for v in rows}, tasks)
    ours = {kind: _with_avg({v: {t: _mean(plan, group_name, v, t, kind) for t in tasks} for v in shown}, tasks)
            for kind in dict.fromkeys((which, "final"))}
    columns = [*tasks, "avg"]
    labels = {t: protocol["tasks"][t].get("label", t).split(" (")[0] for t in tasks} | {"avg": "Avg"}
    header = ["", *(f"{labels[c]} {side}" for c in columns for side in ("ours", "paper"))]
    lines += [f"The paper's {spec.get('table', group_name)} ({paper.get('model', '?')}) beside ours, on the *{which}* "
              "dev metric ×100 (the paper reports the best evaluation during training); in brackets: the rank among "
              "the rows with a paper number, 1 = best; a row that shares the paper's number of another (e.g. LoRA² with the "
              "paper's settings) is ranked in that row's place. Compare orderings, not values: the models differ.",
              "", "| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    primary = [v for v in shown if v in rows]
    for variant in shown:
        own = aliases.get(variant, variant)
        cells = []
        for c in columns:
            mine = ours[which][variant][c]
            rivals_ours = [ours[which][v][c] for v in primary if v != own and ours[which][v][c] is not None]
            rivals_paper = [theirs[v][c] for v in primary if v != own and theirs[v][c] is not None]
            cells.append(DASH if mine is None else f"{mine:.2f} ({rank_among(mine, rivals_ours)})")
            paper_value = theirs[own][c]
            cells.append(DASH if paper_value is None else f"{paper_value:.2f} ({rank_among(paper_value, rivals_paper)})")
        lines.append("| " + " | ".join([variant_label(protocol, group_name, variant), *cells]) + " |")
    taus = []
    for c in columns:
        for kind, table in ours.items():
            pairs = [(table[v][c], theirs[v][c]) for v in primary
                     if table[v][c] is not None and theirs[v][c] is not None]
            tau = kendall_tau([a for a, _ in pairs], [b for _, b in pairs])
            taus.append(f"{labels[c]} ({kind}) " + (DASH if math.isnan(tau) else f"{tau:+.2f}") + f" (n={len(pairs)})")
    lines += ["", "Rank agreement with the paper, Kendall's tau-b over the rows with a paper number (+1: the same "
              "order, −1: reversed; — below 3 rows): " + ", ".join(taus) + ".", ""]
    spread = seed_spread(protocol, plan, group_name)
    return [*lines, *spread, *([""] if spread else [])]


if __name__ == "__main__":  # a library module: its command line is the runner's
    import glue

    sys.exit(glue.main())
