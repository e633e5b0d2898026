"""One table from two results directories: each seed from the primary one (the lr search's, e.g. a GPU
sitting) where it has that seed, else from a second directory that trained it at the same learning rate
(``lr_source.json`` names the primary; e.g. the CPU's seeds 1 and 2). A library module of benchmarks/glue.py
(``combine``); the primary's own tables.md stays single-device.

Two devices do not give bit-identical runs (other kernels, other summation orders), so a seed trained on
each is two draws of the same protocol, like two seeds. Whether that mixes in a systematic difference is
measured, not assumed: every (run, seed) that both directories trained is listed with its difference.
"""

from __future__ import annotations

import datetime
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from glue_compare import load_paper, paper_block
from glue_plan import Plan, lr_source, make_plan, metric
from glue_protocol import PROTOCOL, protocol_hash, repo_relative, variant_label
from glue_report import DASH, _header, _row, _task_label, group_table

COMBINED = "combined.md"  # default file name, in the primary directory


def device_of(result: dict[str, Any]) -> str:
    """The GPU's model ("H100" of "NVIDIA H100 80GB HBM3") or "CPU", from the environment the run recorded."""
    gpu = (result.get("environment") or {}).get("gpu")
    if not gpu:
        return "CPU"
    words = str(gpu).removeprefix("NVIDIA ").split()
    return words[0] if words else "GPU"


def seed_of(result: dict[str, Any]) -> int:
    return int(result.get("benchmark", {}).get("seed", result.get("seed", 0)))


@dataclass
class CombinedPlan(Plan):
    """A plan whose cells take each missing seed from ``other`` (a directory at the same learning rates)."""

    other: Plan | None = None

    def cell(self, group: str, variant: str, task: str) -> list[dict[str, Any]]:
        mine = super().cell(group, variant, task)
        seeds = {seed_of(r) for r in mine}
        chosen = self.chosen.get((group, variant, task)) or self.provisional.get((group, variant, task))
        # the lr this cell trains at here: the search's choice, or for a group that borrows one, its runs' lr
        lrs = {chosen} if chosen is not None else {
            s.lr for s in self.steps if (s.run.group, s.run.variant, s.run.task) == (group, variant, task)}
        extra = [] if self.other is None else [
            r for r in self.other.cell(group, variant, task) if seed_of(r) not in seeds
            and r.get("benchmark", {}).get("lr") in lrs]
        return sorted([*mine, *extra], key=seed_of)


def combined_plan(protocol: dict[str, Any], primary: Path, other: Path) -> CombinedPlan:
    """Refuses a second directory whose learning rates were not chosen by ``primary``'s search."""
    base = make_plan(protocol, primary)
    if base.lr_source is not None:
        raise ValueError(f"{primary} takes its learning rates from {base.lr_source}; name that directory as the "
                         "primary one.")
    source = lr_source(other)
    if source is None or source != Path(primary).resolve():
        raise ValueError(f"--seeds-from {other}: its learning rates are not the ones {primary}'s search chose "
                         f"(its lr_source.json names {source or 'no other directory'}); seeds trained at other "
                         "learning rates cannot share a cell. Train that directory with "
                         f"`run --lr-from {primary}`.")
    return CombinedPlan(base.steps, base.chosen, base.provisional, None, other=make_plan(protocol, other))


def seed_sources(protocol: dict[str, Any], plan: CombinedPlan, group_name: str) -> list[str]:
    """Per cell, which device trained each seed (so a reader sees what is mixed)."""
    group = protocol["groups"][group_name]
    lines = _header(["", *(_task_label(protocol, t) for t in group["tasks"])])
    for variant in group["variants"]:
        cells = []
        for task in group["tasks"]:
            results = plan.cell(group_name, variant, task)
            cells.append(" ".join(f"{seed_of(r)}:{device_of(r)}" for r in results) or DASH)
        lines.append(_row([variant_label(protocol, group_name, variant), *cells]))
    return lines


def device_pairs(plan: CombinedPlan) -> list[str]:
    """Every run (any group) both directories trained at the same lr: final metric on each, the difference,
    then a summary."""
    assert plan.other is not None
    mine = {(s.run.group, s.run.variant, s.run.task, s.run.seed, s.lr): s.result for s in plan.steps
            if s.result is not None and not s.result.get("benchmark", {}).get("reused_from")}
    pairs = []
    for s in plan.other.steps:
        r = s.result
        if r is None or r.get("benchmark", {}).get("reused_from"):
            continue
        twin = mine.get((s.run.group, s.run.variant, s.run.task, s.run.seed, s.lr))
        if twin is not None:
            pairs.append((s, twin, r))
    if not pairs:
        return ["No run was trained in both directories yet."]
    lines = _header(["run", "lr", "primary", "second", "second − primary"], left=2)  # the two directories
    diffs = []
    for s, a, b in sorted(pairs, key=lambda p: p[0].run.name):
        diff = 100 * (metric(b) - metric(a))
        diffs.append(diff)
        lines.append(_row([s.run.name, DASH if s.lr is None else f"{s.lr:g}", f"{100 * metric(a):.2f}", f"{100 * metric(b):.2f}",
                           f"{diff:+.2f}"]))
    summary = f"{len(diffs)} pair{'s' if len(diffs) > 1 else ''}: mean difference {statistics.fmean(diffs):+.2f}"
    if len(diffs) > 1:
        sd = statistics.stdev(diffs)
        se = sd / len(diffs) ** 0.5
        mean = statistics.fmean(diffs)
        verdict = ("within two standard errors of 0: no systematic difference between the directories shows at "
                   "this resolution" if abs(mean) <= 2 * se else
                   f"more than two standard errors from 0: the second directory's runs sit about {mean:+.2f} from "
                   "the primary's, so mixing their seeds shifts a cell by up to that much")
        summary += f", sd {sd:.2f}, standard error of the mean {se:.2f}: {verdict}"
    return [*lines, "", summary + "."]


def render_combined(protocol: dict[str, Any], primary: Path, other: Path, groups: list[str] | None = None,
                    command: str | None = None, protocol_path: str | Path = PROTOCOL,
                    paper: dict[str, Any] | None = None) -> str:
    plan = combined_plan(protocol, primary, other)
    groups = groups or ["table1"]
    unknown = [g for g in groups if g not in protocol["groups"]]
    if unknown:
        raise ValueError(f"unknown group(s) {', '.join(unknown)}; the protocol has {', '.join(protocol['groups'])}.")
    paper = load_paper() if paper is None else paper
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"# GLUE protocol v2 across two results directories ({protocol.get('name', '?')})", "",
             f"Written by `{command or 'python benchmarks/glue.py combine'}` on {now}; protocol "
             f"`{repo_relative(Path(protocol_path))}` ({protocol.get('name', '?')}@{protocol_hash(protocol_path)}).",
             "", f"Each seed comes from `{repo_relative(primary)}/` (primary: its learning-rate search chose every "
             f"rate) where that directory has it, else from `{repo_relative(other)}/`, which trained it at the same "
             "rate. Cells are mean ± sample sd ×100 over the seeds found; `(n=…)`: fewer seeds than the protocol "
             "asks. Each directory's own tables.md shows it alone. Runs on two devices are not bit-identical, so a "
             "seed from each is another draw of the same protocol; the last section measures whether the devices "
             "differ systematically.", ""]
    for group_name in groups:
        group = protocol["groups"][group_name]
        lines += [f"## {group.get('title', group_name)}", "", f"Group `{group_name}`: tasks "
                  f"{', '.join(group['tasks'])}; seeds {group['seeds']}.", ""]
        for which, title in (("final", "Final evaluation"), ("best", "Best evaluation during training")):
            lines += [f"**{title}**", "", *group_table(protocol, plan, group_name, which), ""]
        lines += ["**Where each seed ran** (seed:device; a GPU by its model)", "",
                  *seed_sources(protocol, plan, group_name), ""]
        lines += paper_block(protocol, plan, group_name, paper)
    lines += ["## The same run in both directories", "", "Every run of the protocol (any group) that both directories "
              "trained at the same learning rate and seed, on the final dev metric ×100:", "", *device_pairs(plan), ""]
    return "\n".join(lines)


def write_combined(protocol: dict[str, Any], primary: Path, other: Path, out: Path, groups: list[str] | None = None,
                   command: str | None = None, protocol_path: str | Path = PROTOCOL) -> Path:
    from lora2.persistence import atomic_write

    text = render_combined(protocol, primary, other, groups, command, protocol_path)
    atomic_write(out, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    return out


if __name__ == "__main__":  # a library module: its command line is the runner's
    import glue

    sys.exit(glue.main())
