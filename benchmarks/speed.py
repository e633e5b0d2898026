"""Speed and memory of LoRA² against PEFT LoRA / AdaLoRA, the head-only floor and full fine-tuning, and of
the ``lora2 glue`` pipeline against a bare training loop.

    OMP_NUM_THREADS=1 python benchmarks/speed.py --repeats 5

One process for all timings; inside every repeat the methods run one after another (A B C ..., then
B C ... A, rotating), after a warm-up, and each number is the median over repeats. Every method is
built by the pipeline's ``build_method`` and every step is the pipeline's ``train_step``, so the tables
measure the code ``lora2 glue`` runs. Timings use process CPU time with one torch thread by default
(see --clock): the machine this was written on is shared, and CPU time is what other tenants disturb least.
Peak memory is measured afterwards in one fresh subprocess per (model, method). Parts live in
speed_setup (models, methods, the timed step), speed_parts (training, allocator, inference, memory),
speed_pipeline (pipeline against a bare loop) and speed_report (speed.md).
Writes ``benchmarks/results/speed.json`` and ``benchmarks/results/speed.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import os
import shlex
import sys
import time
import warnings
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # the speed_* modules sit next to this script
    sys.path.insert(0, str(HERE))
RESULTS = HERE / "results"
PARTS = ("training", "allocator", "inference", "memory", "pipeline")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="minilm,minilm-small,deberta,llama",
                    help="comma list of minilm, minilm-small, deberta, llama, tiny (tests); empty for none")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: per-core cost, robust to other load)")
    ap.add_argument("--clock", choices=("cpu", "wall"), default="cpu",
                    help="cpu: process CPU time (default; honest on a shared machine with --threads 1); wall: perf_counter")
    ap.add_argument("--quick", action="store_true", help="small batches, fewer methods, 3 repeats: a smoke run")
    ap.add_argument("--skip", default="", help=f"comma list of parts to skip: {','.join(PARTS)}")
    ap.add_argument("--memory-steps", type=int, default=2)
    ap.add_argument("--pipeline-model", default=None, help="model of the pipeline-vs-bare part (default: MiniLM)")
    ap.add_argument("--pipeline-steps", type=int, default=None, help="steps per side and repeat (default 20)")
    ap.add_argument("--data-dir", default=None, help="GLUE TSV directory (default $LORA2_GLUE_DIR)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--memory-child", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def bench_model(name: str, args: argparse.Namespace, skip: set[str]) -> dict[str, Any]:
    """Training, allocator and inference tables of one model."""
    from speed_parts import bench_allocator, bench_inference, bench_training, train_methods
    from speed_report import ms
    from speed_setup import MODELS, make_batch

    spec = MODELS[name]
    batch_size, seq = spec["quick"] if args.quick else (spec["batch"], spec["seq"])
    inner = spec.get("inner", 1)
    print(f"== {name}: batch {batch_size} × {seq}", flush=True)
    base = spec["build"]()
    batch = make_batch(base, batch_size, seq)
    entry: dict[str, Any] = {"spec": {"title": spec["title"], "batch": batch_size, "seq": seq, "steps_per_round": inner}}
    if "training" not in skip:
        t0 = time.perf_counter()
        entry["training"] = bench_training(base, train_methods(args.quick), batch, args.warmup, args.repeats, inner)
        print(f"  training {time.perf_counter() - t0:.0f} s: "
              + ", ".join(f"{m} {ms(v['step_s'])} ms" for m, v in entry["training"].items()), flush=True)
    if "allocator" not in skip:
        entry["allocator"] = bench_allocator(base, batch, args.repeats, calls=5 if args.quick else 20)
    if "inference" not in skip:
        entry["inference"] = bench_inference(base, batch, args.warmup, 2 * args.repeats, inner=2)
    del base
    gc.collect()
    return entry


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch
    import transformers

    torch.set_num_threads(args.threads)
    with contextlib.suppress(RuntimeError):
        torch.set_num_interop_threads(1)
    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    from speed_parts import bench_memory, memory_child, train_methods
    from speed_pipeline import bench_pipeline
    from speed_report import machine, render, targets
    from speed_setup import K8, MODELS, TARGET_RANK, K, R
    from speed_timing import set_clock

    set_clock(args.clock)
    if args.memory_child:
        model_name, method = args.memory_child.split(":")
        print(json.dumps(memory_child(model_name, method, args.memory_steps, args.quick)))
        return 0
    if args.quick:
        args.repeats, args.warmup = min(args.repeats, 3), 1
    skip = set(filter(None, args.skip.split(",")))
    names = [n for n in args.models.split(",") if n]
    started = time.perf_counter()
    shown = argv if argv is not None else sys.argv[1:]
    env = f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} " if os.environ.get("OMP_NUM_THREADS") else ""
    results: dict[str, Any] = {
        "command": env + "python benchmarks/speed.py " + " ".join(shlex.quote(a) for a in shown),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "settings": {"repeats": args.repeats, "warmup": args.warmup, "quick": args.quick, "memory_steps": args.memory_steps,
                     "clock": args.clock, "threads": args.threads, "load_average_at_start": os.getloadavg(),
                     "k": K, "r": R, "target_rank": TARGET_RANK, "k8_row": K8},
        "models": {name: bench_model(name, args, skip) for name in names},
    }
    if "pipeline" not in skip:
        print("== pipeline against a bare loop", flush=True)
        steps = {"steps": args.pipeline_steps} if args.pipeline_steps else {}
        results["pipeline"] = bench_pipeline(args.repeats, args.quick, args.data_dir, args.pipeline_model, **steps)
    if "memory" not in skip:
        for name in names:
            if MODELS[name].get("memory", True):
                results["models"][name]["memory"] = bench_memory(name, train_methods(args.quick), args.memory_steps,
                                                                 args.threads, args.quick)
    results["targets"] = targets(results)
    results["wall_s"] = time.perf_counter() - started
    results["settings"]["load_average_at_end"] = os.getloadavg()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "speed.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    (args.out / "speed.md").write_text(render(results), encoding="utf-8")
    print(render(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
