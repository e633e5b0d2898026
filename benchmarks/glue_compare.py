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
    """Kendall's tau-b of two orderings of the same rows; NaN with fewer than 3 rows or no order on one side."""
    if len(ours) < 3 or len(set(ours)) < 2 or len(set(theirs)) < 2:
        return math.nan
    from scipy.stats import kendalltau

    return float(kendalltau(ours, theirs)[0])


def _mean(plan: Plan, group: str, variant: str, task: str, which: str) -> float | None:
    """The cell's mean ×100, rounded as the tables show it (so equal-looking cells rank as ties); None if empty
    or not finite (a diverged run's NaN metric, or a hand-edited file: not ranked)."""
    values = [metric(r, which) for r in plan.cell(group, variant, task)]
    mean = 100 * statistics.fmean(values) if values else math.nan
    return round(mean, 2) if math.isfinite(mean) else None


def seed_spread(protocol: dict[str, Any], plan: Plan, group_name: str) -> list[str]:
    """For a one-seed group that borrows its lr from a searched variant: that variant's seed sd per task."""
    group = protocol["groups"][group_name]
    source = group.get("learning_rate")
    if len(group["seeds"]) != 1 or not isinstance(source, str) or ":" not in source:
        return []
    src_group, _, src_variant = source.partition(":")
    cells, known = [], False
    for task in group["tasks"]:
        results = plan.cell(src_group, src_variant, task)
        label = protocol["tasks"][task].get("label", task)
        if len(results) < 2:
            cells.append(f"{label} {DASH}")
            continue
        known = True
        sds = [100 * statistics.stdev(metric(r, which) for r in results) for which in ("final", "best")]
        cells.append(f"{label} {sds[0]:.2f} / {sds[1]:.2f} (n={len(results)})")
    if not known:
        return []  # no seeds beyond the first yet
    return [f"Seed spread for scale: the sample sd σ (final / best ×100) of {src_group}'s "
            f"{variant_label(protocol, src_group, src_variant)} at the same lr: " + ", ".join(cells)
            + ". Two one-seed cells differ by about √2·σ from seed noise alone, so a difference below about 3σ "
            "says nothing (and σ is itself rough from so few seeds)."]


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
        cells["avg"] = round(statistics.fmean(known), 2) if len(known) == len(tasks) else None
    return table


def _rows_for(primary: list[str], alias: str | None, aliases: dict[str, str]) -> list[str]:
    """The compared rows: the paper's rows we ran, with an alias (if any) in its paper row's place."""
    return [alias if alias is not None and v == aliases[alias] else v for v in primary]


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
    rows, aliases = spec["rows"], {a: t for a, t in spec.get("aliases", {}).items() if a in group["variants"]}
    primary = [v for v in group["variants"] if v in rows]
    shown = [v for v in group["variants"] if v in rows or v in aliases]
    if not primary:
        return []
    paper_of = {v: aliases.get(v, v) for v in shown}
    theirs = _with_avg({v: {t: rows[paper_of[v]].get(t) for t in tasks} for v in shown}, tasks)
    ours = {kind: _with_avg({v: {t: _mean(plan, group_name, v, t, kind) for t in tasks} for v in shown}, tasks)
            for kind in dict.fromkeys((which, "final"))}
    columns = [*tasks, "avg"]
    labels = {t: protocol["tasks"][t].get("label", t).split(" (")[0] for t in tasks} | {"avg": "Avg"}
    header = ["", *(f"{labels[c]} {side}" for c in columns for side in ("ours", "paper"))]
    alias_note = (" A row that shares another's paper number (" + ", ".join(
        f"{variant_label(protocol, group_name, a)} → {variant_label(protocol, group_name, t)}"
        for a, t in aliases.items()) + ") is ranked in that row's place.") if aliases else ""
    lines += [f"The paper's {spec.get('table', group_name)} ({paper.get('model', '?')}) beside ours, on the *{which}* "
              "dev metric ×100 (the paper reports the best evaluation during training). In brackets: rank / rows "
              "ranked, 1 = best, counting on both sides only the rows that have our result in that column (a tie "
              "at the shown two decimals shares the better rank). Avg: over this group's tasks only (not the "
              "paper's Avg column, which has other tasks). Compare orderings, not values: the models differ."
              + alias_note, "", "| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for variant in shown:
        compared = _rows_for(primary, variant if variant in aliases else None, aliases)
        cells = []
        for c in columns:
            mine, paper_value = ours[which][variant][c], theirs[variant][c]
            ranked = [v for v in compared if ours[which][v][c] is not None and theirs[v][c] is not None]
            if mine is None or paper_value is None or variant not in ranked:
                cells += [DASH if mine is None else f"{mine:.2f}", DASH if paper_value is None else f"{paper_value:.2f}"]
                continue
            n = len(ranked)
            cells.append(f"{mine:.2f} ({rank_among(mine, [ours[which][v][c] for v in ranked if v != variant])}/{n})")
            cells.append(f"{paper_value:.2f} ({rank_among(paper_value, [theirs[v][c] for v in ranked if v != variant])}"
                         f"/{n})")
        lines.append("| " + " | ".join([variant_label(protocol, group_name, variant), *cells]) + " |")
    lines += ["", "Rank agreement, Kendall's tau-b between our ordering and the paper's over the rows ranked above "
              "(+1: the same order, −1: reversed; —: fewer than 3 rows, or no order on one side; (n): rows):", "",
              "| rows compared | metric | " + " | ".join(labels[c] for c in columns) + " |",
              "|---|---|" + "---:|" * len(columns)]
    for alias in (None, *aliases):
        compared = _rows_for(primary, alias, aliases)
        name = ("as above" if not aliases else "with " + (
            variant_label(protocol, group_name, alias) if alias else
            ", ".join(variant_label(protocol, group_name, t) for t in dict.fromkeys(aliases.values()))))
        for kind, table in ours.items():
            cells = []
            for c in columns:
                pairs = [(table[v][c], theirs[v][c]) for v in compared
                         if table[v][c] is not None and theirs[v][c] is not None]
                tau = kendall_tau([a for a, _ in pairs], [b for _, b in pairs])
                cells.append((DASH if math.isnan(tau) else f"{tau:+.2f}") + f" ({len(pairs)})")
            lines.append(f"| {name} | {kind} | " + " | ".join(cells) + " |")
    spread = seed_spread(protocol, plan, group_name)
    return [*lines, "", *spread, *([""] if spread else [])]


if __name__ == "__main__":  # a library module: its command line is the runner's
    import glue

    sys.exit(glue.main())
