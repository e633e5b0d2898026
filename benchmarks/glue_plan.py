"""Where the GLUE protocol stands: each run's status from the result files on disk, the learning rates
chosen so far, and the up-front CPU-time estimate. A library module of benchmarks/glue.py.

Statuses: ``done`` (its result file exists), ``reuse`` (a finished run of equal settings exists: copy it),
``todo`` (trainable now) and ``waiting`` (its lr is not chosen yet, or an equal run earlier in the protocol
has still to train). The plan is recomputed from the files alone, so two workers, or a later sitting,
agree on it, and a stage-2 run turns from waiting to todo as soon as its stage-1 results exist.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from glue_protocol import Run, choose_lr, expand, run_key

Cell = tuple[str, str, str]  # (group, variant, task)
LR_SOURCE = "lr_source.json"  # in a results directory: take the learning-rate choices from another one


@dataclass
class Step:
    run: Run
    status: str  # done | reuse | todo | waiting | skip (an lr-edge run the grid's choice does not need)
    lr: float | None  # the run's learning rate; None while not chosen (or the method's default)
    key: str  # run key; computed with a provisional grid lr while the lr is not chosen
    result: dict[str, Any] | None = None  # the stored result (done)
    source: Path | None = None  # reuse: the result file to copy
    note: str = ""
    trains: bool = False  # counts in the estimate: todo, or waiting for an lr with no equal run before it


@dataclass
class Plan:
    steps: list[Step]
    chosen: dict[Cell, float | None]  # lr chosen per searched (group, variant, task); None: stage 1 incomplete
    provisional: dict[Cell, float | None]  # the grid's own choice while the run beyond its edge is pending
    lr_source: Path | None = None  # the results directory whose lr search chose the lrs; None: this one

    def pending_edge(self, cell: Cell) -> bool:
        return self.chosen.get(cell) is None and self.provisional.get(cell) is not None

    def cell(self, group: str, variant: str, task: str) -> list[dict[str, Any]]:
        """The results that make a table cell, by seed: the stage-1 run at the chosen lr (the provisional one
        while an lr-edge run is pending) and the other seeds."""
        chosen = self.chosen.get((group, variant, task)) or self.provisional.get((group, variant, task))
        return [s.result for s in self.steps if s.result is not None and s.run.group == group
                and s.run.variant == variant and s.run.task == task and (s.run.stage != 1 or s.run.lr == chosen)]

    def grid(self, group: str, variant: str, task: str) -> list[Step]:
        return [s for s in self.steps if s.run.stage == 1 and s.status != "skip"
                and (s.run.group, s.run.variant, s.run.task) == (group, variant, task)]

    @property
    def counted(self) -> list[Step]:
        """The runs the protocol needs now (lr-edge runs that no choice needs are left out)."""
        return [s for s in self.steps if s.status != "skip"]


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def unreadable(path: Path, data: dict[str, Any] | None) -> str | None:
    """Why an existing result file (``data`` as ``read_json`` gave it) cannot be used: truncated, not JSON, no
    final metric; None: it can, or it does not exist. Such a run is trained again, and its new file replaces the
    bad one atomically."""
    if data is None:
        if not Path(path).is_file():
            return None
        return "not a JSON object (truncated or corrupted)"
    try:
        metric(data)
    except (KeyError, TypeError, ValueError):
        return "no final main metric"
    return None


def metric(result: dict[str, Any], which: str = "final") -> float:
    return float(result[which][result["main_metric"]])


def stored_key(result: dict[str, Any]) -> str | None:
    """The key of a stored result, recomputed from the options it recorded (None: not a benchmark result)."""
    args = result.get("benchmark", {}).get("args")
    return run_key(args) if isinstance(args, dict) else None


def lr_source(results_dir: Path) -> Path | None:
    """The results directory whose learning-rate search ``results_dir`` uses (its ``lr_source.json``), or None:
    its own search."""
    path = Path(results_dir) / LR_SOURCE
    if not path.exists():
        return None
    data = read_json(path)
    if data is None or not isinstance(data.get("lr_from"), str):
        raise ValueError(f"{path} is not a JSON object with a string 'lr_from' (a results directory, relative "
                         "to this one); fix or delete it.")
    source = (Path(results_dir) / data["lr_from"]).resolve()
    if not source.is_dir():
        raise ValueError(f"{path} takes the learning rates from {source}, which does not exist (moved?); fix "
                         "lr_from there, or restore that directory.")
    return source


def set_lr_source(results_dir: Path, source: Path, protocol: dict[str, Any], write: bool = True) -> Path:
    """Make ``results_dir`` take its learning rates from ``source``'s stage-1 search (recorded in
    ``lr_source.json``, so ``tables`` and later sittings agree). Refuses a different source than the recorded
    one, and a directory whose lr-dependent runs were trained at its own search's choices: either would mix
    runs chosen by two searches in one table."""
    from lora2.persistence import write_json

    results_dir, source = Path(results_dir), Path(source).resolve()
    if source == results_dir.resolve():
        raise ValueError(f"--lr-from {source} is the results directory itself; name the directory whose search "
                         "to reuse, or leave --lr-from out to search here.")
    if not source.is_dir():
        raise ValueError(f"--lr-from {source}: no such results directory.")
    if lr_source(source) is not None:
        raise ValueError(f"--lr-from {source}: that directory takes its own learning rates from "
                         f"{lr_source(source)}; name that one.")
    recorded = lr_source(results_dir)
    if recorded is not None and recorded != source:
        raise ValueError(f"{results_dir} already takes its learning rates from {recorded} ({results_dir / LR_SOURCE})"
                         f"; --lr-from {source} would mix runs chosen by two searches. Use another --results-dir, "
                         "or delete that file and the results trained under it.")
    if recorded is None:
        own = [run.name for run in expand(protocol) if (run.stage in (1, 2) or run.lr_from is not None)
               and run.result_path(results_dir).is_file()]
        if own:
            raise ValueError(f"{results_dir} already holds runs trained at its own search's learning rates ("
                             f"{', '.join(own[:3])}{', ...' if len(own) > 3 else ''}); --lr-from would mix the two "
                             "searches. Use another --results-dir.")
    if recorded is None and write:
        write_json(results_dir / LR_SOURCE, {"lr_from": os.path.relpath(source, results_dir.resolve()),
                                             "why": "the learning rates of this directory's runs are the ones the "
                                                    "stage-1 search in lr_from chose; that search is not repeated "
                                                    "here"})
    return source


def _readable(runs: list[Run], results_dir: Path) -> tuple[dict[Run, dict[str, Any] | None], dict[Run, str]]:
    """Each run's usable result (read once per plan) and why a present file is not usable."""
    read = {run: read_json(run.result_path(results_dir)) for run in runs}
    bad = {run: why for run, data in read.items() if (why := unreadable(run.result_path(results_dir), data))}
    return {run: None if run in bad else data for run, data in read.items()}, bad


def make_plan(protocol: dict[str, Any], results_dir: Path, lr_from: Path | None = None) -> Plan:
    """``lr_from``: take the lrs from that directory's search (default: the one ``lr_source.json`` names, else
    this directory's own)."""
    runs = expand(protocol)
    results, bad = _readable(runs, results_dir)
    source = Path(lr_from).resolve() if lr_from is not None else lr_source(results_dir)
    searched = results if source is None else _readable([r for r in runs if r.stage == 1], source)[0]
    finals: dict[Cell, dict[float, float | None]] = defaultdict(dict)
    edges: dict[Cell, dict[str, tuple[float, float | None]]] = defaultdict(dict)
    for run in runs:
        if run.stage == 1:
            result = searched[run]
            final = None if result is None else metric(result)
            if run.edge:
                edges[run.group, run.variant, run.task][run.edge] = (run.lr, final)
            else:
                finals[run.group, run.variant, run.task][run.lr] = final
    choice = {cell: choose_lr(f, edges[cell]) for cell, f in finals.items()}
    chosen = {cell: c[0] for cell, c in choice.items()}
    originals: dict[str, Path] = {}  # key -> first finished, non-reused result of that key
    for run in runs:
        result = results[run]
        if result is not None and not result.get("benchmark", {}).get("reused_from"):
            key = stored_key(result)
            if key is not None:
                originals.setdefault(key, run.result_path(results_dir))
    steps: list[Step] = []
    first_any: dict[str, Run] = {}  # key (provisional ones included) -> first run with it
    first_exact: dict[str, Run] = {}  # key of a run whose lr is known -> first run with it
    for run in runs:
        lr = run.lr if run.lr_from is None else chosen.get((*run.lr_from, run.task))
        waiting_lr = run.lr_from is not None and lr is None
        key = run_key(run.with_lr(run.lr_guess if waiting_lr else lr))
        step = Step(run, "todo", lr, key, results[run])
        if run in bad:
            step.note = f"bad result file ({bad[run]}): it is trained again"
        cell = (run.group, run.variant, run.task)
        if source is not None and run.stage == 1 and step.result is None:  # the search ran elsewhere
            if chosen[cell] is None:
                step.status = "waiting"
                step.note += f"{'; ' if step.note else ''}lr: the search in {source.name} is not complete"
            elif run.lr != chosen[cell]:
                step.status = "skip"
                step.note += f"{'; ' if step.note else ''}not needed: {source.name}'s search chose lr {chosen[cell]:g}"
            if step.status != "todo":
                steps.append(step)
                continue
        elif run.edge and step.result is None and choice[cell][2] != run.edge:  # not (or not yet) needed
            grid_done = choice[cell][1] is not None
            step.status = "skip" if grid_done else "waiting"
            step.note = ("not needed: the grid's choice is not at this end" if grid_done else
                         "lr edge: trains only if the grid's choice is at this end")
            steps.append(step)
            continue
        first = first_any.setdefault(key, run)
        twin = run if waiting_lr else first_exact.setdefault(key, run)
        if step.result is not None:
            step.status = "done"
            if not waiting_lr and stored_key(step.result) not in (None, key):
                step.note = "stale: the protocol's settings changed since; delete the file to rerun it"
        elif waiting_lr:
            group, variant = run.lr_from
            have = sum(v is not None for v in finals[group, variant, run.task].values())
            if choice[group, variant, run.task][2]:
                step.note += f"{'; ' if step.note else ''}lr: waiting for the run beyond the grid's edge"
            step.status, step.trains = "waiting", first is run
            step.note += f"{'; ' if step.note else ''}lr: {have} of {len(finals[group, variant, run.task])} " \
                         f"stage-1 runs of {group}/{variant} done" + (f" in {source.name}" if source else "")
        elif key in originals:
            step.status, step.source = "reuse", originals[key]
        elif twin is not run:
            step.status = "waiting"
            step.note += f"{'; ' if step.note else ''}same settings as {twin.name}"
        else:
            step.trains = True
        steps.append(step)
    return Plan(steps, chosen, {cell: c[1] for cell, c in choice.items()}, source)


def sec_per_step(protocol: dict[str, Any], plan: Plan) -> dict[str, tuple[float, str]]:
    """Per task: (seconds per step, where it comes from), measured on finished runs (median of wall/steps),
    else the protocol's estimate."""
    measured: dict[str, list[float]] = defaultdict(list)
    for step in plan.steps:
        bench = (step.result or {}).get("benchmark", {})
        if bench.get("wall_s") and step.result.get("steps") and not bench.get("reused_from"):
            measured[step.run.task].append(bench["wall_s"] / step.result["steps"])
    out = {}
    for task, spec in protocol["tasks"].items():
        if measured[task]:
            out[task] = (statistics.median(measured[task]), f"measured, {len(measured[task])} runs")
        else:
            out[task] = (float(spec.get("sec_per_step", 0.0)), "protocol")
    return out


def estimate_line(protocol: dict[str, Any], steps: list[Step], plan: Plan, workers: int) -> str:
    """Total CPU time of the runs still to train (now or once their lr is chosen), per task steps × s/step."""
    rates = sec_per_step(protocol, plan)
    to_train = [s for s in steps if s.trains]
    now = sum(s.status == "todo" for s in to_train)
    seconds = sum(s.run.args.get("max_steps", 0) * rates[s.run.task][0] for s in to_train)
    per_task = ", ".join(f"{t} {rate:.2f} ({src})" for t, (rate, src) in rates.items())
    hours = seconds / 3600
    return (f"estimate: {len(to_train)} runs to train ({now} now, {len(to_train) - now} once their lr is chosen), "
            f"{sum(s.run.args.get('max_steps', 0) for s in to_train):,} steps, about {hours:.1f} CPU-hours "
            f"(~{hours / workers:.1f} h on {workers} one-thread worker{'s' if workers > 1 else ''}); "
            f"s/step: {per_task}")


if __name__ == "__main__":  # a library module: its command line is the runner's
    import glue

    sys.exit(glue.main())
