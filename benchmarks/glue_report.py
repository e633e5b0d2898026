"""tables.md of the GLUE protocol v2 from the result files: per group the final and the best-during-training
dev metric, the learning-rate search, how the results were made, the plots and every run. A library module
of benchmarks/glue.py; the file says PARTIAL at the top while any protocol run is missing.
"""

from __future__ import annotations

import datetime
import statistics
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from glue_compare import load_paper, paper_block
from glue_plan import Plan, make_plan, metric
from glue_protocol import PROTOCOL, protocol_hash, repo_relative, variant_label

DASH = "—"
EDGE_MARK = " ‡"
EDGE_NOTE = ("‡: the learning rate was chosen at an end of the method's grid; the run one grid step beyond that end "
             "is pending, so this cell may still change.")


def fmt_cell(values: list[float], expected: int) -> str:
    """Mean ± sample std (×100, 2 decimals); "(n=…)" when fewer seeds than the protocol asks; — when none."""
    if not values:
        return DASH
    mean = 100 * statistics.fmean(values)
    text = f"{mean:.2f}" if len(values) == 1 else f"{mean:.2f} ± {100 * statistics.stdev(values):.2f}"
    return text + (f" (n={len(values)})" if len(values) < expected else "")


def fmt_params(values: Iterable[int]) -> str:
    distinct = sorted(set(values))
    if not distinct:
        return DASH
    return f"{distinct[0]:,}" if len(distinct) == 1 else f"{distinct[0]:,}–{distinct[-1]:,}"


def _task_label(protocol: dict[str, Any], task: str) -> str:
    return protocol["tasks"][task].get("label", task)


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _header(cells: list[str], left: int = 1) -> list[str]:
    return [_row(cells), "|" + "---|" * left + "---:|" * (len(cells) - left)]


def group_table(protocol: dict[str, Any], plan: Plan, group_name: str, which: str) -> list[str]:
    """One row per variant: trainable params, a cell per task, and the average over tasks."""
    group = protocol["groups"][group_name]
    tasks, expected = group["tasks"], len(group["seeds"])
    lines = _header(["", "trainable params", *(_task_label(protocol, t) for t in tasks), "Avg"])
    for variant in group["variants"]:
        cells, means, complete, params = [], [], True, []
        for task in tasks:
            results = plan.cell(group_name, variant, task)
            values = [metric(r, which) for r in results]
            params += [r["trainable_params"] for r in results]
            mark = EDGE_MARK if values and plan.pending_edge((group_name, variant, task)) else ""
            cells.append(fmt_cell(values, expected) + mark)
            if values:
                means.append(statistics.fmean(values))
                complete &= len(values) == expected
        avg = DASH
        if means and len(means) == len(tasks):
            avg = f"{100 * statistics.fmean(means):.2f}" + ("" if complete else " (partial)")
        lines.append(_row([variant_label(protocol, group_name, variant), fmt_params(params), *cells, avg]))
    return lines


def lr_tables(protocol: dict[str, Any], plan: Plan, group_name: str) -> list[str]:
    """The chosen lr per (variant, task), then every stage-1 result (final / best) of the grid."""
    group = protocol["groups"][group_name]
    tasks = group["tasks"]
    lines = ["**Chosen learning rate** (" + DASH + " (k/n): k of the n stage-1 runs done)", "",
             *_header(["", *(_task_label(protocol, t) for t in tasks)])]
    for variant in group["variants"]:
        cells = []
        for task in tasks:
            cell = (group_name, variant, task)
            chosen, grid = plan.chosen.get(cell), plan.grid(group_name, variant, task)
            done = sum(s.result is not None for s in grid)
            if chosen is not None:
                cells.append(f"{chosen:g}")
            elif plan.pending_edge(cell):
                cells.append(f"{plan.provisional[cell]:g}{EDGE_MARK} (edge run pending)")
            else:
                cells.append(f"{DASH} ({done}/{len(grid)})")
        lines.append(_row([variant_label(protocol, group_name, variant), *cells]))
    width = max((len(plan.grid(group_name, v, t)) for v in group["variants"] for t in tasks), default=0)
    lines += ["", f"**Stage 1: seed {group['seeds'][0]} at every lr of the grid** (lr: final / best ×100; "
              "bold: chosen)", "", *_header(["", "task", *(f"lr {i + 1}" for i in range(width))], left=2)]
    for variant in group["variants"]:
        for task in tasks:
            chosen, cells = plan.chosen.get((group_name, variant, task)), []
            for step in plan.grid(group_name, variant, task):
                r = step.result
                text = f"{step.run.lr:g}: " + (DASH if r is None else
                                                 f"{100 * metric(r, 'final'):.2f} / {100 * metric(r, 'best'):.2f}")
                cells.append(f"**{text}**" if step.run.lr == chosen else text)
            lines.append(_row([variant_label(protocol, group_name, variant), _task_label(protocol, task), *cells]))
    return lines


def lr_source_lines(plan: Plan) -> list[str]:
    """Where the learning rates came from when this directory did not search them itself."""
    if plan.lr_source is None:
        return []
    return [f"**The learning rates here were chosen by the stage-1 search in `{repo_relative(plan.lr_source)}/`** "
            f"(its tables.md shows the grid), by the rule above; this directory trains only each chosen lr's "
            "stage-1 run (recorded in `lr_source.json`, and as `lr_chosen_in` in each result).", ""]


def run_listing(plan: Plan) -> list[str]:
    lines = _header(["run", "lr", "main metric", "final", "best", "best step / steps", "trainable params", "wall s",
                     "reused from"], left=3)
    for step in plan.steps:
        r = step.result
        if r is None:
            continue
        bench = r.get("benchmark", {})
        wall = bench.get("wall_s")
        lines.append(_row([step.run.name, DASH if step.lr is None else f"{step.lr:g}", r["main_metric"],
                           f"{100 * metric(r, 'final'):.2f}", f"{100 * metric(r, 'best'):.2f}",
                           f"{r['best']['step']} / {r.get('steps', '?')}", f"{r['trainable_params']:,}",
                           DASH if wall is None else f"{wall:.0f}", bench.get("reused_from") or ""]))
    return lines


def status_lines(plan: Plan) -> list[str]:
    """The PARTIAL banner with counts, or nothing once every protocol run has a result."""
    steps = plan.counted
    count = {k: sum(s.status == k for s in steps) for k in ("done", "todo", "waiting", "reuse")}
    if count["done"] == len(steps):
        return []
    reused = sum(bool(s.result.get("benchmark", {}).get("reused_from")) for s in steps if s.result is not None)
    return [f"**PARTIAL**: {count['done']} of the {len(steps)} protocol runs have a result "
            f"({count['done'] - reused} trained, {reused} reused); {count['todo']} can train now, {count['reuse']} "
            f"wait to be copied, {count['waiting']} wait for their learning rate or an equal run. Numbers below "
            "change as runs finish.", ""]


def provenance(protocol: dict[str, Any], plan: Plan, results_dir: Path, command: str | None,
               protocol_path: str | Path) -> list[str]:
    """Which command, machine, versions and protocol made the results."""
    found = [s.result for s in plan.steps if s.result is not None]
    benches = [r.get("benchmark", {}) for r in found]
    trained = [(r, b) for r, b in zip(found, benches, strict=True) if not b.get("reused_from")]
    commands = sorted({r.get("command") or "" for r, _ in trained} - {""})
    finished = sorted(b["finished"] for b in benches if b.get("finished"))
    machines = sorted({b["machine"] for b in benches if b.get("machine")})
    protocols = sorted({b["protocol"] for b in benches if b.get("protocol")})
    envs = [r.get("environment") or {} for r in found]
    threads = sorted({e.get("threads") for e in envs} - {None})
    versions = sorted({f"lora2 {e.get('lora2')}, torch {e.get('torch')}" for e in envs if e})
    walls = [b["wall_s"] for _, b in trained if b.get("wall_s")]
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"Written by `{command or 'python benchmarks/glue.py tables'}` on {now} from the result files under "
        f"`{repo_relative(results_dir)}/`; protocol `{repo_relative(Path(protocol_path))}` "
        f"({protocol.get('name', '?')}@{protocol_hash(protocol_path)}).  ",
        f"Runs with a result: {len(found)} of {len(plan.counted)}"
        + (f", finished between {finished[0]} and {finished[-1]}" if finished else "") + ".  ",
        "Run by: " + (", ".join(f"`python {c}`" for c in commands) if commands else DASH) + ".  ",
        "Machine: " + ("; ".join(machines) if machines else DASH)
        + (f"; torch threads {', '.join(map(str, threads))}" if threads else "")
        + (f"; {'; '.join(versions)}" if versions else "") + ".  ",
        "Result files from protocol version(s): " + (", ".join(protocols) if protocols else DASH) + ".  ",
    ]
    if walls:
        lines.append(f"Wall time per trained run: median {statistics.median(walls):.0f} s, total "
                     f"{sum(walls) / 3600:.2f} h over {len(walls)} runs (a shared machine: not a speed measurement).")
    return lines


def budget_table(protocol: dict[str, Any]) -> list[str]:
    lines = _header(["task", "max length", "truncated (% of train)", "max steps", "eval every", "s/step (estimate)"])
    for task, spec in protocol["tasks"].items():
        lines.append(_row([_task_label(protocol, task), *(str(spec.get(k, DASH)) for k in
                                                           ("max_length", "truncated_pct", "max_steps", "eval_steps",
                                                            "sec_per_step"))]))
    return lines


def render_tables(protocol: dict[str, Any], results_dir: Path, command: str | None = None,
                  protocol_path: str | Path = PROTOCOL, plots: list[Path] | None = None,
                  paper: dict[str, Any] | None = None) -> str:
    """tables.md's text; ``paper``: the paper's numbers to compare with (default: glue_paper.json)."""
    plan = make_plan(protocol, results_dir)
    paper = load_paper() if paper is None else paper
    lines = [f"# GLUE quality under protocol v2 ({protocol.get('name', '?')})", "", *status_lines(plan),
             *provenance(protocol, plan, results_dir, command, protocol_path), "",
             "Each cell: the task's main metric ×100 on the dev set, mean ± sample standard deviation over seeds; "
             "`(n=…)`: fewer seeds than the protocol asks so far; " + DASH + ": no run yet. *Final* is the evaluation "
             "after the last step (what the learning rate is chosen on); *best* is the best evaluation during "
             "training, picked on that same dev set, so it is optimistic. Avg: mean over the tasks of the cell means, "
             "once every task has one (`(partial)`: some cells have fewer seeds than asked). Trainable params: every "
             "parameter that receives gradients, classification head included; LoRA² counts all r singular values "
             "before pruning, AdaLoRA all init_r triplets. Head only is the floor (frozen encoder), full fine-tuning "
             "the ceiling. " + EDGE_NOTE, "", "Learning rates: " + protocol.get("lr_selection", DASH), "",
             *lr_source_lines(plan),
             "Budgets per task:", "", *budget_table(protocol)]
    for group_name, group in protocol["groups"].items():
        lr = group.get("learning_rate")
        lr_text = ("searched (below)" if lr == "search" else f"the one chosen for {lr.replace(':', '/')} on each task"
                   if isinstance(lr, str) else str(lr))
        lines += ["", f"## {group.get('title', group_name)}", "",
                  f"Group `{group_name}`: tasks {', '.join(group['tasks'])}; seeds {group['seeds']}; "
                  f"learning rate {lr_text}.", ""]
        for which, title in (("final", "Final evaluation"), ("best", "Best evaluation during training")):
            lines += [f"**{title}**", "", *group_table(protocol, plan, group_name, which), ""]
        lines += paper_block(protocol, plan, group_name, paper)
        if lr == "search":
            lines += [*lr_tables(protocol, plan, group_name), ""]
    lines += ["", "## Plots", ""]
    lines += [f"- [{p.name}](plots/{p.name})" for p in plots or []] or [f"{DASH} (no results to plot yet)"]
    lines += ["", "## Every run with a result", "", *run_listing(plan), ""]
    return "\n".join(lines)


def write_tables(protocol: dict[str, Any], results_dir: Path, out: Path, command: str | None = None,
                 protocol_path: str | Path = PROTOCOL) -> Path:
    from lora2.persistence import atomic_write

    plots = sorted((Path(results_dir) / "plots").glob("*.png"))
    text = render_tables(protocol, results_dir, command, protocol_path, plots)
    atomic_write(out, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    return out


if __name__ == "__main__":  # a library module: its command line is the runner's
    import glue

    sys.exit(glue.main())
