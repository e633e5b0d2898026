"""GLUE quality benchmark, protocol v2: the paper's tables (Table 1 with a learning-rate search, Table 3,
Table 4, reduced vs full importance) plus LoRA² training dynamics, on a CPU, over as many sittings as it takes.

    python benchmarks/glue.py run [--order protocol|priority] [--only G,...] [--tasks T,...] [--seeds S,...]
                                  [--variants V,...] [--max-runs N] [--shard I/N] [--workers N] [--dry-run] ...
    python benchmarks/glue.py tables      # results/glue_v2/tables.md, and the plots
    python benchmarks/glue.py plots       # results/glue_v2/plots/*.png
    python benchmarks/glue.py --results-dir benchmarks/results/glue_v2_gpu combine \
        --seeds-from benchmarks/results/glue_v2   # seeds of two devices in one table (→ glue_v2_gpu/combined.md)

``benchmarks/glue_protocol.json`` says what to run (per-task budgets, methods with their lr grids,
groups, the lr-selection rule, the priority order). ``run`` trains the runs that can train now, one at a
time in this process, and re-reads the result files after each: a stage-2 run (seeds 1, 2) waits until
the stage-1 lr search of its (method, task) is complete, then trains in the same or a later sitting.
Each run trains in ``runs/benchmarks/glue_v2/<group>/<run_id>/`` (git-ignored); its results.json, plus a
"benchmark" block, is written atomically to ``benchmarks/results/glue_v2/<group>/<run_id>.json``, and a
run with that file is never trained again. A run whose settings equal a finished run's (e.g. the
ablations' "all terms" and Table 1's LoRA² at the chosen lr) copies that result instead of training.
``--shard I/N``: train only the runs a hash of their name assigns to worker I (two one-thread workers,
0/2 and 1/2, keep two cores busy without overlap). A failed run is reported and the sweep goes on.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import sys
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the glue_* modules beside this file

import glue_pool
from glue_plan import Plan, Step, estimate_line, make_plan, read_json, set_lr_source
from glue_protocol import (
    PROTOCOL,
    Run,
    expand,
    load_protocol,
    order_runs,
    parse_shard,
    protocol_hash,
    repo_relative,
    select,
    shard_of,
)

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS_DIR = HERE / "results" / "glue_v2"
RUNS_DIR = REPO / "runs" / "benchmarks" / "glue_v2"
SHARED_GLUE = REPO.parent / "shared" / "data" / "glue"
DASH = "—"


def machine() -> str:
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor()
    torch = sys.modules.get("torch")  # loaded by a run that trained in this process
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch is not None and torch.cuda.is_available() else ""
    return f"{platform.system()} {platform.machine()}, {cpu or 'unknown CPU'}, {os.cpu_count()} cores{gpu}"


def stamp(results: dict[str, Any], step: Step, protocol_id: str, **extra: Any) -> dict[str, Any]:
    """The result file: run_glue's results plus what the benchmark knows about the run."""
    run = step.run
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    bench = {"group": run.group, "task": run.task, "variant": run.variant, "seed": run.seed, "lr": step.lr,
             "stage": run.stage, "run_id": run.run_id, "args": run.with_lr(step.lr), "key": step.key,
             "protocol": protocol_id, "finished": now, "machine": machine(), "wall_s": None, "reused_from": None}
    return {**{k: v for k, v in results.items() if k != "benchmark"}, "benchmark": {**bench, **extra}}


def train_one(run: Run, args: dict[str, Any], protocol: dict[str, Any], runs_dir: Path,
              ns: argparse.Namespace) -> tuple[dict[str, Any], float]:
    """Train one run with ``run_glue``; an option the library does not have (yet) fails this run only."""
    from lora2.glue.args import GlueArgs
    from lora2.glue.checkpoint import latest_checkpoint
    from lora2.glue.run import run_glue

    run_dir = run.run_dir(runs_dir)
    save_steps = None if ns.no_checkpoints else protocol.get("save_steps")
    options = {**args, "output_dir": str(run_dir), "num_threads": protocol.get("num_threads"),
               "no_progress": not ns.progress, "save_steps": save_steps, "save_total_limit": 1, "tf32": ns.tf32}
    if save_steps and latest_checkpoint(run_dir) is not None:  # a stopped worker left it
        options["resume_from_checkpoint"] = "last"
        print(f"    resuming {run.name} from {latest_checkpoint(run_dir).name}", flush=True)
    else:  # the runner owns its run directories: what a run stopped before its first checkpoint left goes
        options["overwrite_output_dir"] = True
    glue_args = GlueArgs.from_flat(options)
    t0 = time.perf_counter()
    results = run_glue(glue_args)
    if results is None:
        raise RuntimeError(f"{run.name}: run_glue returned no results")
    return results, time.perf_counter() - t0


def invalid(args: dict[str, Any]) -> str | None:
    """Why these options do not make a GlueArgs today (None: they do)."""
    from lora2.glue.args import GlueArgs

    try:
        GlueArgs.from_flat(args)
    except ValueError as err:
        return str(err)
    return None


def _view(plan: Plan, ns: argparse.Namespace, protocol: dict[str, Any]) -> list[Step]:
    """The plan's steps this worker sees: filtered, ordered, and (sharded) only its own runs to train."""
    runs = order_runs(select(expand(protocol), protocol, ns.only, ns.tasks, ns.seeds, ns.variants), protocol, ns.order)
    by_name = {s.run.name: s for s in plan.steps}
    steps = [by_name[r.name] for r in runs]
    if ns.shard is None:  # claiming workers never shard (main() refuses both)
        return steps
    index, count = ns.shard
    return [s for s in steps if s.status in ("done", "reuse") or shard_of(s.run, count) == index]


def copy_result(step: Step, results_dir: Path) -> None:
    from lora2.persistence import write_json

    data = read_json(step.source) or {}
    source = data.get("benchmark", {})
    kept = {k: source[k] for k in ("finished", "machine", "wall_s", "lr_chosen_in") if k in source}  # when, where
    write_json(step.run.result_path(results_dir), stamp(data, step, source.get("protocol", "?"), **kept,
                                                        reused_from=step.source.relative_to(results_dir).as_posix()))
    print(f"reuse {step.run.name} = {step.source.relative_to(results_dir).as_posix()}", flush=True)


def cmd_run(ns: argparse.Namespace) -> int:
    protocol = load_protocol(ns.protocol)
    results_dir, runs_dir = Path(ns.results_dir), Path(ns.runs_dir)
    protocol_id = f"{protocol.get('name', 'protocol')}@{protocol_hash(ns.protocol)}"
    if ns.lr_from is not None:
        try:
            lr_from = set_lr_source(results_dir, Path(ns.lr_from), protocol, write=not ns.dry_run)
        except ValueError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        print(f"learning rates: chosen by the search in {repo_relative(lr_from)} (not repeated here)", flush=True)
    plan = make_plan(protocol, results_dir, ns.lr_from if ns.dry_run else None)
    steps = _view(plan, ns, protocol)
    counts = {k: sum(s.status == k for s in steps) for k in ("done", "reuse", "todo", "waiting", "skip")}
    elsewhere = sum(s.status == "skip" and "search chose lr" in s.note for s in steps)  # --lr-from: other grid lrs
    skipped = f"{counts['skip'] - elsewhere} lr-edge runs not needed" + (
        f", {elsewhere} grid runs of the other directory's search" if elsewhere else "")
    print(f"{len(steps) - counts['skip']} runs: {counts['done']} done, {counts['reuse']} to reuse, {counts['todo']} "
          f"to train now, {counts['waiting']} waiting ({skipped}).", flush=True)
    print(estimate_line(protocol, steps, plan, 1 if ns.shard else 2), flush=True)  # a shard: its own worker
    for step in steps:
        if step.note.startswith(("stale", "bad result file")):
            print(f"warning: {step.run.name}: {step.note}", flush=True)
    if ns.dry_run:
        for s in steps:
            why = invalid(s.run.with_lr(s.lr or s.run.lr_guess)) if s.status in ("todo", "waiting") else None
            lr = DASH if s.lr is None else f"{s.lr:g}"
            print(f"  {s.status:7s} {s.run.name:40s} lr {lr:7s} {s.note}{f' INVALID: {why}' if why else ''}")
        return 0
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not os.environ.get("LORA2_GLUE_DIR") and SHARED_GLUE.is_dir():
        os.environ["LORA2_GLUE_DIR"] = str(SHARED_GLUE)
    attempted: set[str] = set()
    failed: list[str] = []
    start = time.monotonic()
    while True:
        for step in steps:
            if step.status == "reuse":
                copy_result(step, results_dir)
        if ns.stop_after is not None and time.monotonic() - start > ns.stop_after:
            print(f"--stop-after {ns.stop_after:g} s reached: no new run starts.", flush=True)
            break
        if ns.max_runs is not None and len(attempted) >= ns.max_runs:
            break
        step = next((s for s in steps if s.status == "todo" and s.run.name not in attempted
                     and (not ns.claim or glue_pool.take(s.run, runs_dir, results_dir))), None)
        if step is None:
            if ns.wait and any(s.status == "waiting" for s in steps) and (not ns.claim or glue_pool.in_progress(runs_dir)):
                # stage 2 waits for other workers' stage 1
                time.sleep(ns.poll)
                plan = make_plan(protocol, results_dir)
                steps = _view(plan, ns, protocol)
                continue
            break
        attempted.add(step.run.name)
        args = step.run.with_lr(step.lr)
        print(f"[{len(attempted)}] train {step.run.name}: {args}", flush=True)
        try:
            results, wall = train_one(step.run, args, protocol, runs_dir, ns)
        except Exception as err:  # one failed run must not end a sweep of hours; the next sitting retries it
            if not isinstance(err, ValueError):
                traceback.print_exc()
            print(f"    FAILED {step.run.name}: {err}", flush=True)
            failed.append(step.run.name)
            if ns.claim:
                glue_pool.release(step.run, runs_dir, error=f"{type(err).__name__}: {err}")
        else:
            from lora2.persistence import write_json

            chosen_in = {} if plan.lr_source is None else {  # relative to the results directory, as lr_source.json
                "lr_chosen_in": Path(os.path.relpath(plan.lr_source, results_dir.resolve())).as_posix()}
            write_json(step.run.result_path(results_dir),
                       stamp(results, step, protocol_id, wall_s=round(wall, 1), **chosen_in))
            if ns.claim:
                glue_pool.release(step.run, runs_dir)
            m = results["main_metric"]
            print(f"    done in {wall:.0f} s: final {m} {results['final'][m]:.4f}, best {results['best'][m]:.4f} "
                  f"(step {results['best']['step']}), {results['trainable_params']:,} trainable params", flush=True)
        if not ns.no_tables:
            _write_report(protocol, ns, plots=False)
        plan = make_plan(protocol, results_dir)  # stage-2 runs and reuses unlocked by this result
        steps = _view(plan, ns, protocol)
    if not ns.no_tables:
        print(f"tables: {_write_report(protocol, ns, plots=True)}")
    left = [s for s in _view(make_plan(protocol, results_dir), ns, protocol) if s.status not in ("done", "skip")]
    print(f"trained {len(attempted) - len(failed)}, failed {len(failed)}; still missing {len(left)} "
          f"({sum(s.status == 'waiting' for s in left)} waiting).", flush=True)
    for name in failed:
        print(f"  failed: {name}")
    return 1 if failed else 0


def _command() -> str:
    return "python " + " ".join(shlex.quote(a) for a in [repo_relative(Path(sys.argv[0])), *sys.argv[1:]])


def _write_report(protocol: dict[str, Any], ns: argparse.Namespace, plots: bool, command: str | None = None) -> Path:
    import glue_report

    results_dir = Path(ns.results_dir)
    if plots:
        import glue_plots

        glue_plots.write_plots(protocol, make_plan(protocol, results_dir), results_dir / "plots")
    return glue_report.write_tables(protocol, results_dir, results_dir / "tables.md", command, ns.protocol)


def cmd_tables(ns: argparse.Namespace) -> int:
    print(_write_report(load_protocol(ns.protocol), ns, plots=True, command=_command()))
    return 0


def cmd_plots(ns: argparse.Namespace) -> int:
    import glue_plots

    protocol = load_protocol(ns.protocol)
    for path in glue_plots.write_plots(protocol, make_plan(protocol, Path(ns.results_dir)),
                                       Path(ns.results_dir) / "plots"):
        print(path)
    return 0


def cmd_combine(ns: argparse.Namespace) -> int:
    import glue_combine

    primary = Path(ns.results_dir)
    out = Path(ns.out) if ns.out else primary / glue_combine.COMBINED
    print(glue_combine.write_combined(load_protocol(ns.protocol), primary, Path(ns.seeds_from), out, ns.only,
                                      _command(), ns.protocol))
    return 0


def _csv(text: str) -> list[str]:
    return [t for t in text.split(",") if t]


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python benchmarks/glue.py", description=__doc__, allow_abbrev=False,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--protocol", default=str(PROTOCOL), help="Protocol JSON (default: %(default)s).")
    ap.add_argument("--results-dir", default=str(RESULTS_DIR),
                    help="Result files, tables.md and plots/ (default: %(default)s).")
    sub = ap.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="Train the protocol's runs that have no result file and can train now.",
                         allow_abbrev=False)
    run.add_argument("--only", type=_csv, help="Comma-separated groups (table1, dynamics, orth, targets, importance).")
    run.add_argument("--tasks", type=_csv, help="Comma-separated tasks.")
    run.add_argument("--seeds", type=lambda t: [int(s) for s in _csv(t)], help="Comma-separated seeds.")
    run.add_argument("--variants", type=_csv, help="Comma-separated variants (e.g. lora2,lora1; group/variant picks one group's: "
                                                  "importance/full).")
    run.add_argument("--order", choices=["protocol", "priority"], default="protocol",
                     help="protocol: as the file lists them; priority: by the protocol's 'priority' rules.")
    run.add_argument("--max-runs", type=int, help="Train at most N runs, then stop (reused results do not count).")
    run.add_argument("--shard", type=parse_shard,
                     help="I/N: train only the runs a hash of their name assigns to worker I of N.")
    run.add_argument("--dry-run", action="store_true",
                     help="Print the status of every run and the CPU-time estimate; train and copy nothing.")
    run.add_argument("--runs-dir", default=str(RUNS_DIR), help="Run directories (default: %(default)s).")
    run.add_argument("--lr-from", metavar="RESULTS_DIR",
                     help="Take the learning rates from the stage-1 search in that results directory instead of "
                          "searching here (e.g. a CPU sitting at the GPU's choices): only the chosen lr's stage-1 "
                          "run trains. Recorded in <results-dir>/lr_source.json, which later runs and `tables` "
                          "follow; a different source is refused.")
    glue_pool.add_arguments(run)
    run.add_argument("--progress", action="store_true", help="Show progress bars.")
    run.add_argument("--no-tables", action="store_true", help="Do not rewrite tables and plots.")
    sub.add_parser("tables", help="Write tables.md (and the plots) from the result files.")
    sub.add_parser("plots", help="Write the learning-curve and update-norm plots from the result files.")
    combine = sub.add_parser("combine", allow_abbrev=False,
                             help="One table from --results-dir (the lr search's) and a second directory trained at "
                                  "its learning rates: each seed from the first where it has it, else the second.")
    combine.add_argument("--seeds-from", required=True, metavar="RESULTS_DIR",
                         help="The second directory (its lr_source.json must name --results-dir).")
    combine.add_argument("--only", type=_csv, help="Comma-separated groups (default: table1).")
    combine.add_argument("--out", help="Markdown file to write (default: <results-dir>/combined.md).")
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    ns = ap.parse_args(argv)
    if ns.command == "run" and ns.max_runs is not None and ns.max_runs < 0:
        ap.error("--max-runs must be >= 0")
    if ns.command == "run" and ns.wait and not (ns.claim or ns.workers):
        ap.error("--wait needs --claim (or --workers): without claims nothing tells whether a waiting run can unlock")
    if ns.command == "run" and ns.claim and ns.shard is not None:
        ap.error("--claim and --shard exclude each other: claiming workers share every run")
    if ns.command == "run" and ns.workers:
        code = glue_pool.run_workers(ns, sys.argv[1:] if argv is None else argv, Path(__file__))
        if not ns.no_tables:
            print(f"tables: {_write_report(load_protocol(ns.protocol), ns, plots=True)}")
        return code
    try:
        return {"run": cmd_run, "tables": cmd_tables, "plots": cmd_plots, "combine": cmd_combine}[ns.command](ns)
    except ValueError as err:  # a bad protocol or lr_source.json (a run's own errors are caught per run)
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
