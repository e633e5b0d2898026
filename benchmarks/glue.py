"""GLUE quality benchmark: the paper's tables (Table 1, Table 3, Table 4, reduced vs full importance)
under a CPU-sized protocol, filled over as many sittings as it takes.

    python benchmarks/glue.py run [--order priority] [--only table1,orth] [--tasks rte,mrpc] [--seeds 0]
                                  [--max-runs N] [--shard I/N] [--dry-run]
    python benchmarks/glue.py tables

``benchmarks/glue_protocol.json`` says what to run: per-task settings (length, epochs, evaluation
interval), the methods with their hyperparameters, the seeds, and the ablation groups. ``run``
expands it into runs and trains the missing ones in this process, one at a time (``run_glue``).
Each run trains in ``runs/benchmarks/glue/<group>/<task>-<variant>-s<seed>/`` (git-ignored); only its
``results.json`` is copied to ``benchmarks/results/glue/<group>/<task>-<variant>-s<seed>.json``, and a
run whose copy exists is skipped, so an interrupted sweep resumes where it stopped. A run whose
settings are those of a finished run of another group (e.g. the ablations' "all terms" variant and
Table 1's LoRA² at the same seed) reuses that result instead of training again. ``--shard I/N`` splits
the runs to train between N worker processes (a hash of the run's name picks the worker, so workers
started at different times or with different filters never train the same run); a machine with N
cores runs N one-thread workers side by side.

"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import shlex
import statistics
import sys
import time
import traceback
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora2.persistence import atomic_write, write_json  # unique temp name per call: parallel workers are safe

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PROTOCOL = HERE / "glue_protocol.json"
RESULTS_DIR = HERE / "results" / "glue"
TABLES = HERE / "results" / "glue_tables.md"
RUNS_DIR = REPO / "runs" / "benchmarks" / "glue"
SHARED_GLUE = REPO.parent / "shared" / "data" / "glue"
# GlueArgs fields that do not change what is trained, left out of a run's identity
NON_IDENTITY = ("output_dir", "data_dir", "no_progress", "num_threads", "device", "resume_from_checkpoint",
                "save_steps", "save_total_limit", "logging_steps", "eval_batch_size")
DASH = "—"
# GlueArgs fields added after results were recorded, with the value every earlier run implicitly had:
# left out of a run's identity at that value, so the keys of earlier results stay valid (even if the
# field's default changes later)
ADDED_LATER = {"init": "gaussian", "init_std": 0.02}


# -- protocol -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Run:
    group: str
    task: str
    variant: str
    seed: int
    args: dict[str, Any] = field(hash=False, compare=False)  # GlueArgs keyword arguments, output_dir excluded

    @property
    def run_id(self) -> str:
        return f"{self.task}-{self.variant}-s{self.seed}"

    def result_path(self, results_dir: Path) -> Path:
        return Path(results_dir) / self.group / f"{self.run_id}.json"

    def run_dir(self, runs_dir: Path) -> Path:
        return Path(runs_dir) / self.group / self.run_id


def load_protocol(path: str | Path = PROTOCOL) -> dict[str, Any]:
    protocol = json.loads(Path(path).read_text(encoding="utf-8"))
    for key in ("tasks", "methods", "groups"):
        if key not in protocol:
            raise ValueError(f"{path}: the protocol has no {key!r} section.")
    return protocol


def protocol_hash(path: str | Path = PROTOCOL) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:12]


def _variant_method(group: dict[str, Any], variant: dict[str, Any], where: str) -> str:
    method = variant.get("method", group.get("method"))
    if method is None:
        raise ValueError(f"{where}: no method (set 'method' on the group or the variant).")
    return method


def variant_label(protocol: dict[str, Any], group_name: str, variant: str) -> str:
    group = protocol["groups"][group_name]
    spec = group["variants"][variant]
    if "label" in spec:
        return spec["label"]
    method = spec.get("method", group.get("method"))
    return protocol["methods"].get(method, {}).get("label", variant)


def expand(protocol: dict[str, Any], only: Iterable[str] | None = None, tasks: Iterable[str] | None = None,
           seeds: Iterable[int] | None = None) -> list[Run]:
    """Every run the protocol asks for, in protocol order (group, task, variant, seed), filtered."""
    only, tasks, seeds = (set(x) if x is not None else None for x in (only, tasks, seeds))
    if only:
        unknown = only - set(protocol["groups"])
        if unknown:
            raise ValueError(f"Unknown group(s) {sorted(unknown)}; the protocol has {list(protocol['groups'])}.")
    runs = []
    for group_name, group in protocol["groups"].items():
        if only and group_name not in only:
            continue
        for task in group["tasks"]:
            if task not in protocol["tasks"]:
                raise ValueError(f"Group {group_name!r} names task {task!r}, which has no entry under 'tasks'.")
            if tasks and task not in tasks:
                continue
            task_settings = {k: v for k, v in protocol["tasks"][task].items() if k != "label"}
            for variant, spec in group["variants"].items():
                where = f"group {group_name!r}, variant {variant!r}"
                method = _variant_method(group, spec, where)
                if method not in protocol["methods"]:
                    raise ValueError(f"{where}: method {method!r} is not under 'methods'.")
                for seed in group["seeds"]:
                    if seeds is not None and seed not in seeds:
                        continue
                    args = {**protocol.get("common", {}), **task_settings, **protocol["methods"][method]["args"],
                            **spec.get("args", {}), "task": task, "seed": seed}
                    if protocol.get("model"):
                        args["model"] = protocol["model"]
                    args = {k: v for k, v in args.items() if v is not None}  # None: GlueArgs' default
                    runs.append(Run(group_name, task, variant, seed, args))
    return runs


def _matches(run: Run, rule: dict[str, Any]) -> bool:
    return all(value in rule[key] for key, value in (("groups", run.group), ("tasks", run.task), ("seeds", run.seed))
               if key in rule)


def order_runs(runs: list[Run], protocol: dict[str, Any], order: str) -> list[Run]:
    """``protocol``: as expanded; ``priority``: by the first rule of ``protocol['priority']`` a run matches
    (unmatched runs last), protocol order within a rule."""
    if order == "protocol":
        return list(runs)
    if order != "priority":
        raise ValueError(f"Unknown order {order!r}; choose protocol or priority.")
    rules = protocol.get("priority", [])

    def tier(run: Run) -> int:
        return next((i for i, rule in enumerate(rules) if _matches(run, rule)), len(rules))

    return sorted(runs, key=tier)  # sorted() is stable


def glue_defaults() -> dict[str, Any]:
    import dataclasses

    from lora2.glue.run import GlueArgs

    return {f.name: f.default for f in dataclasses.fields(GlueArgs)
            if f.default is not dataclasses.MISSING}


def validate_args(args: dict[str, Any]) -> None:
    unknown = set(args) - set(glue_defaults()) - {"task"}
    if unknown:
        raise ValueError(f"Protocol keys {sorted(unknown)} are not options of lora2 glue (GlueArgs).")


def run_key(args: dict[str, Any], defaults: dict[str, Any] | None = None) -> str:
    """What a run trains, with GlueArgs' defaults filled in: equal keys, equal runs."""
    base = glue_defaults() if defaults is None else defaults
    full = {**base, **args}
    full = {k: v for k, v in full.items()
            if k not in NON_IDENTITY and not (k in ADDED_LATER and v == ADDED_LATER[k])}
    return json.dumps(full, sort_keys=True)


# -- running --------------------------------------------------------------------------------------
def machine() -> str:
    cpu = ""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor()
    return f"{platform.system()} {platform.machine()}, {cpu or 'unknown CPU'}, {os.cpu_count()} cores"


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def finished_index(results_dir: Path) -> dict[str, Path]:
    """run key → result file, over every finished, non-reused result."""
    index = {}
    for path in sorted(Path(results_dir).glob("*/*.json")):
        data = read_json(path)
        bench = (data or {}).get("benchmark", {})
        if bench.get("key") and not bench.get("reused_from"):
            index.setdefault(bench["key"], path)
    return index


def stamp(results: dict[str, Any], run: Run, key: str, protocol_id: str, **extra: Any) -> dict[str, Any]:
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    results = dict(results)
    results["benchmark"] = {"group": run.group, "task": run.task, "variant": run.variant, "seed": run.seed,
                            "run_id": run.run_id, "args": run.args, "key": key, "protocol": protocol_id,
                            "finished": now, "machine": machine(), **extra}
    return results


def plan(runs: list[Run], results_dir: Path, defaults: dict[str, Any]) -> list[tuple[Run, str, str]]:
    """(run, key, status) with status ``done``, ``reuse`` (an equal run is done) or ``todo``."""
    index = finished_index(results_dir)
    out, pending_keys = [], set()
    for run in runs:
        key = run_key(run.args, defaults)
        if run.result_path(results_dir).exists():
            status = "done"
        elif key in index or key in pending_keys:
            status = "reuse"
        else:
            status = "todo"
            pending_keys.add(key)
        out.append((run, key, status))
    return out


def shard_of(run: Run, count: int) -> int:
    """A run's worker, fixed by its name alone: workers started at different times, or with different
    --only/--tasks filters, still agree on who trains what."""
    return zlib.crc32(f"{run.group}/{run.run_id}".encode()) % count


def shard_steps(steps: list[tuple[Run, str, str]], index: int, count: int) -> list[tuple[Run, str, str]]:
    """Worker ``index`` of ``count`` keeps the runs to train that hash to it, and all others (done/reuse)."""
    return [step for step in steps if step[2] != "todo" or shard_of(step[0], count) == index]


def _shard(text: str) -> tuple[int, int]:
    try:
        index, count = (int(p) for p in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard {text!r}: expected I/N, e.g. 0/2") from None
    if count < 1 or not 0 <= index < count:
        raise argparse.ArgumentTypeError(f"--shard {text!r}: need 0 <= I < N")
    return index, count


def _estimate(pending: list[Run], results_dir: Path) -> str:
    walls: dict[str, list[float]] = {}
    for path in Path(results_dir).glob("*/*.json"):
        data = read_json(path) or {}
        bench = data.get("benchmark", {})
        if bench.get("wall_s") and not bench.get("reused_from"):
            walls.setdefault(bench["task"], []).append(bench["wall_s"])
    every = [w for ws in walls.values() for w in ws]
    if not every:
        return "no finished run to estimate from yet"
    total = sum(statistics.median(walls.get(r.task, every)) for r in pending)
    return f"about {total / 60:.0f} min at the median wall time of finished runs (per task)"


def train_one(run: Run, protocol: dict[str, Any], runs_dir: Path, progress: bool) -> tuple[dict[str, Any], float]:
    from lora2.glue.run import GlueArgs, run_glue

    out_dir = run.run_dir(runs_dir)
    args = GlueArgs(**run.args, output_dir=str(out_dir), num_threads=protocol.get("num_threads"),
                    no_progress=not progress)
    t0 = time.perf_counter()
    results = run_glue(args)
    assert results is not None
    return results, time.perf_counter() - t0


def cmd_run(ns: argparse.Namespace) -> int:
    protocol = load_protocol(ns.protocol)
    runs = expand(protocol, _csv(ns.only), _csv(ns.tasks), [int(s) for s in _csv(ns.seeds)] if ns.seeds else None)
    runs = order_runs(runs, protocol, ns.order)
    results_dir, runs_dir = Path(ns.results_dir), Path(ns.runs_dir)
    defaults = glue_defaults()
    for run in runs:
        validate_args(run.args)
    steps = plan(runs, results_dir, defaults)
    if ns.shard is not None:
        steps = shard_steps(steps, *ns.shard)
    counts = {s: sum(1 for _, _, st in steps if st == s) for s in ("done", "reuse", "todo")}
    print(f"{len(runs)} runs: {counts['done']} done, {counts['reuse']} to reuse, {counts['todo']} to train "
          f"({_estimate([r for r, _, s in steps if s == 'todo'], results_dir)}).", flush=True)
    if ns.dry_run:
        for run, _, status in steps:
            print(f"  {status:5s} {run.group}/{run.run_id}")
        return 0
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not os.environ.get("LORA2_GLUE_DIR") and SHARED_GLUE.is_dir():
        os.environ["LORA2_GLUE_DIR"] = str(SHARED_GLUE)
    protocol_id = f"{protocol.get('name', 'protocol')}@{protocol_hash(ns.protocol)}"
    trained, failed = 0, []
    for run, key, status in steps:
        target = run.result_path(results_dir)
        if target.exists():
            stored = (read_json(target) or {}).get("benchmark", {})
            if stored.get("key") and stored["key"] != key:
                print(f"warning: {target} was produced with other settings than the protocol's now; "
                      "delete it to run it again.", flush=True)
            continue
        source = finished_index(results_dir).get(key)
        if source is None and status == "reuse" and ns.shard is not None:
            print(f"skip {run.group}/{run.run_id}: its equal run belongs to another shard; rerun to copy it.", flush=True)
            continue
        if source is not None:
            data = read_json(source) or {}
            write_json(target, stamp(data, run, key, data.get("benchmark", {}).get("protocol", protocol_id),
                                     reused_from=str(source.relative_to(results_dir)),
                                     wall_s=data.get("benchmark", {}).get("wall_s")))
            print(f"reuse {run.group}/{run.run_id} = {source.relative_to(results_dir)}", flush=True)
            continue
        if ns.max_runs is not None and trained >= ns.max_runs:
            continue
        trained += 1
        print(f"[{trained}] train {run.group}/{run.run_id}: {run.args}", flush=True)
        try:
            results, wall = train_one(run, protocol, runs_dir, ns.progress)
        except Exception:  # one failed run must not end a sweep of hours; the next sitting retries it
            traceback.print_exc()
            failed.append(run)
            continue
        write_json(target, stamp(results, run, key, protocol_id, wall_s=round(wall, 1)))
        metric = results["main_metric"]
        print(f"    done in {wall:.0f} s: final {metric} {results['final'][metric]:.4f}, best {results['best'][metric]:.4f} "
              f"(step {results['best']['step']}), {results['trainable_params']:,} trainable params", flush=True)
        if not ns.no_tables:
            write_tables(protocol, results_dir, Path(ns.tables), protocol_path=ns.protocol)
    if not ns.no_tables:
        path = write_tables(protocol, results_dir, Path(ns.tables), protocol_path=ns.protocol)
        print(f"tables: {path}")
    left = sum(1 for r in runs if not r.result_path(results_dir).exists())
    print(f"trained {trained}, failed {len(failed)}, still missing {left}.", flush=True)
    for run in failed:
        print(f"  failed: {run.group}/{run.run_id}")
    return 1 if failed else 0


# -- tables ---------------------------------------------------------------------------------------
def metric_value(result: dict[str, Any], which: str) -> float:
    return float(result[which][result["main_metric"]])


def fmt_cell(values: list[float], expected: int) -> str:
    """Mean ± sample std (×100, 2 decimals); "(n=…)" when fewer seeds than the protocol asks; — when none."""
    if not values:
        return DASH
    mean = 100 * statistics.fmean(values)
    text = f"{mean:.2f}" if len(values) == 1 else f"{mean:.2f} ± {100 * statistics.stdev(values):.2f}"
    if len(values) < expected:
        text += f" (n={len(values)})"
    return text


def fmt_params(values: Iterable[int]) -> str:
    distinct = sorted(set(values))
    if not distinct:
        return DASH
    return f"{distinct[0]:,}" if len(distinct) == 1 else f"{distinct[0]:,}–{distinct[-1]:,}"


def collect(protocol: dict[str, Any], results_dir: Path) -> dict[tuple[str, str, str, int], dict[str, Any]]:
    """(group, task, variant, seed) → result, for every run of the protocol that has a result file."""
    found = {}
    for run in expand(protocol):
        data = read_json(run.result_path(results_dir))
        if data is not None:
            found[(run.group, run.task, run.variant, run.seed)] = data
    return found


def group_table(protocol: dict[str, Any], group_name: str, found: dict[tuple[str, str, str, int], dict[str, Any]],
                which: str) -> list[str]:
    group = protocol["groups"][group_name]
    tasks, seeds = group["tasks"], group["seeds"]
    header = ["", "trainable params", *(protocol["tasks"][t].get("label", t) for t in tasks), "Avg"]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for variant in group["variants"]:
        cells, means, complete, params = [], [], True, []
        for task in tasks:
            results = [found[(group_name, task, variant, s)] for s in seeds if (group_name, task, variant, s) in found]
            values = [metric_value(r, which) for r in results]
            params += [r["trainable_params"] for r in results]
            cells.append(fmt_cell(values, len(seeds)))
            if values:
                means.append(statistics.fmean(values))
                complete &= len(values) == len(seeds)
        if len(means) == len(tasks) and means:
            avg = f"{100 * statistics.fmean(means):.2f}" + ("" if complete else " (partial)")
        else:
            avg = DASH
        lines.append(f"| {variant_label(protocol, group_name, variant)} | {fmt_params(params)} | "
                     + " | ".join(cells) + f" | {avg} |")
    return lines


def run_listing(protocol: dict[str, Any], found: dict[tuple[str, str, str, int], dict[str, Any]]) -> list[str]:
    lines = ["| group | run | main metric | final | best | best step / steps | trainable params | wall s | reused from |",
             "|---|---|---|---:|---:|---:|---:|---:|---|"]
    for run in expand(protocol):
        r = found.get((run.group, run.task, run.variant, run.seed))
        if r is None:
            continue
        bench = r.get("benchmark", {})
        wall = bench.get("wall_s")
        lines.append(f"| {run.group} | {run.run_id} | {r['main_metric']} | {100 * metric_value(r, 'final'):.2f} | "
                     f"{100 * metric_value(r, 'best'):.2f} | {r['best']['step']} / {r.get('steps', '?')} | "
                     f"{r['trainable_params']:,} | {DASH if wall is None else f'{wall:.0f}'} | "
                     f"{bench.get('reused_from') or ''} |")
    return lines


def render_tables(protocol: dict[str, Any], results_dir: Path, command: str | None = None,
                  protocol_path: str | Path = PROTOCOL) -> str:
    found = collect(protocol, results_dir)
    expected = len(expand(protocol))
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    benches = [r.get("benchmark", {}) for r in found.values()]
    commands = sorted({r.get("command") or "" for r, b in zip(found.values(), benches, strict=True)
                       if not b.get("reused_from")} - {""})
    finished = sorted(b["finished"] for b in benches if b.get("finished"))
    machines = sorted({b["machine"] for b in benches if b.get("machine")})
    protocols = sorted({b["protocol"] for b in benches if b.get("protocol")})
    threads = sorted({r.get("environment", {}).get("threads") for r in found.values()} - {None})
    versions = sorted({f"lora2 {e.get('lora2')}, torch {e.get('torch')}" for e in
                       (r.get("environment", {}) for r in found.values()) if e})
    walls = [b["wall_s"] for b in benches if b.get("wall_s") and not b.get("reused_from")]
    lines = [
        "# GLUE quality: the paper's tables under the CPU protocol",
        "",
        f"Tables written by `{command or 'python benchmarks/glue.py tables'}` on {now}, from the result files under "
        f"`{_rel(results_dir)}/`; protocol `{_rel(Path(protocol_path))}` "
        f"({protocol.get('name', '?')}@{protocol_hash(protocol_path)}).  ",
        f"Runs: {len(found)} of the {expected} the protocol names"
        + (f", finished between {finished[0]} and {finished[-1]}" if finished else "") + ".  ",
        "Run by: " + (", ".join(f"`python {c}`" for c in commands) if commands else DASH) + ".  ",
        "Machine: " + ("; ".join(machines) if machines else DASH)
        + (f"; torch threads {', '.join(map(str, threads))}" if threads else "")
        + (f"; {'; '.join(versions)}" if versions else "") + ".  ",
        "Result files from protocol version(s): " + (", ".join(protocols) if protocols else DASH) + ".  ",
    ]
    if walls:
        lines.append(f"Wall time per trained run: median {statistics.median(walls):.0f} s, total "
                     f"{sum(walls) / 3600:.2f} h over {len(walls)} trained run(s) (a shared machine: not a speed measurement).")
    lines += [
        "",
        "Each cell: the task's main metric ×100 on the dev set, mean ± sample standard deviation over seeds; "
        "`(n=…)`: fewer seeds than the protocol asks so far; " + DASH + ": no run yet. *Final* is the evaluation "
        "after the last step; *best* is the best of the evaluations during training (every `eval_steps` and at the "
        "end), picked on that same dev set, so it is optimistic. Avg: mean over the table's tasks of the cell means, "
        "shown once every task has a run (`(partial)`: some cells have fewer seeds than asked). Trainable params: "
        "every parameter that receives gradients, classification head included (STS-B's 1-output head makes the "
        "range); LoRA² counts all r singular values before pruning, AdaLoRA all init_r triplets.",
    ]
    titles = {"table1": "Table 1"}
    for group_name, group in protocol["groups"].items():
        tasks = ", ".join(group["tasks"])
        lines += ["", f"## {group.get('title', titles.get(group_name, group_name))}", "",
                  f"Tasks {tasks}; seeds {group['seeds']}.", ""]
        for which, title in (("final", "Final evaluation"), ("best", "Best evaluation during training")):
            lines += [f"**{title}**", "", *group_table(protocol, group_name, found, which), ""]
    lines += ["## Every run", "", *run_listing(protocol, found), ""]
    return "\n".join(lines)


def write_tables(protocol: dict[str, Any], results_dir: Path, out: Path, command: str | None = None,
                 protocol_path: str | Path = PROTOCOL) -> Path:
    text = render_tables(protocol, results_dir, command, protocol_path)
    atomic_write(out, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    return out


def cmd_tables(ns: argparse.Namespace) -> int:
    protocol = load_protocol(ns.protocol)
    command = "python " + " ".join(shlex.quote(a) for a in [_rel(Path(sys.argv[0])), *sys.argv[1:]])
    path = write_tables(protocol, Path(ns.results_dir), Path(ns.tables), command, ns.protocol)
    print(path)
    return 0


# -- CLI ------------------------------------------------------------------------------------------
def _csv(text: str | None) -> list[str] | None:
    return [t for t in text.split(",") if t] if text else None


def _rel(path: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--protocol", default=str(PROTOCOL), help="Protocol JSON (default: %(default)s).")
    ap.add_argument("--results-dir", default=str(RESULTS_DIR), help="Where result files go (default: %(default)s).")
    ap.add_argument("--tables", default=str(TABLES), help="Markdown tables file (default: %(default)s).")
    sub = ap.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="Train every run of the protocol that has no result file yet.")
    run.add_argument("--only", help="Comma-separated groups (table1, orth, targets, importance).")
    run.add_argument("--tasks", help="Comma-separated tasks.")
    run.add_argument("--seeds", help="Comma-separated seeds.")
    run.add_argument("--order", choices=["protocol", "priority"], default="protocol",
                     help="protocol: group, task, variant, seed; priority: the protocol's 'priority' rules first.")
    run.add_argument("--max-runs", type=int, help="Train at most N runs, then stop (reused results do not count).")
    run.add_argument("--shard", type=_shard,
                     help="I/N: train only the runs assigned to worker I of N (by a hash of the run's name).")
    run.add_argument("--dry-run", action="store_true", help="List the runs and their status; train nothing.")
    run.add_argument("--runs-dir", default=str(RUNS_DIR), help="Run directories (default: %(default)s).")
    run.add_argument("--progress", action="store_true", help="Show progress bars.")
    run.add_argument("--no-tables", action="store_true", help="Do not rewrite the tables after each run.")
    sub.add_parser("tables", help="Write the markdown tables from the result files.")
    ns = ap.parse_args(argv)
    if ns.command == "run" and ns.max_runs is not None and ns.max_runs < 0:
        ap.error("--max-runs must be >= 0")
    return cmd_run(ns) if ns.command == "run" else cmd_tables(ns)


if __name__ == "__main__":
    sys.exit(main())
