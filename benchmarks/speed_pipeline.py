"""Does the pipeline add little to the model's own work? ``lora2 glue``'s training loop against a bare
forward/backward/optimizer loop of the same model, batches and adapter. A library module of speed.py.

Both sides start from ``prepare``: the objects ``run_glue`` builds, by the functions it calls (same seed,
so the same head and adapter initialisation and the same shuffled MRPC batches). The pipeline side then
runs ``lora2.glue.loop.train`` itself (DataLoader iteration, ``train_step`` with clip, schedule and the
method's hook, a log line every ``logging_steps``, the update norms at the end; evaluation is a stub, as
it is not training); the bare side runs ``loss = model(**batch).loss; loss.backward(); clip; opt.step();
model.update_and_allocate(step); opt.zero_grad()`` over an identical DataLoader. Set-up (model loading,
tokenisation) is timed apart. Each repeat runs both sides, alternating which goes first.
"""

from __future__ import annotations

import dataclasses
import gc
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from lora2.glue.args import GlueArgs
from lora2.glue.loop import LoopState, train
from lora2.glue.run import PreparedRun, prepare_run

DEFAULTS = {"task": "mrpc", "batch": 16, "max_length": 128, "steps": 20, "methods": "lora2,lora", "logging_steps": 10}
TARGET = 0.90  # issue #10: the pipeline reaches at least this share of the bare loop's steps/s


def glue_args(method: str, out_dir: Path, data_dir: str | None, model: str | None, task: str, batch: int,
              max_length: int, steps: int, logging_steps: int, max_train_samples: int | None = None) -> GlueArgs:
    """The run's ``lora2 glue`` options: the pipeline's defaults except length, batch, steps and logging."""
    return GlueArgs.from_flat({
        "task": task, "method": method, "model": model, "data_dir": data_dir, "output_dir": str(out_dir),
        "max_length": max_length, "batch_size": batch, "max_steps": steps, "eval_steps": steps,
        "logging_steps": logging_steps, "no_progress": True, "seed": 0, "max_train_samples": max_train_samples,
        "device": "cpu"})  # both sides on the CPU, where the bare loop runs


def run_pipeline(args: GlueArgs, p: PreparedRun) -> None:
    """``lora2 glue``'s loop with ``run_glue``'s optimizer and schedule (``prepare_run``); evaluation stubbed."""
    settings = dataclasses.replace(p.settings, progress=False)
    Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    (Path(args.output_dir) / "train_log.jsonl").write_text("", encoding="utf-8")  # as run_glue starts a run
    state = train(p.method, p.train_loader, p.generator, p.optimizer, p.scheduler, lambda: {"accuracy": 0.0},
                  lambda m: 0.0, settings, Path(args.output_dir), LoopState(), "cpu")
    assert state is not None and state.step == settings.total_steps


def run_bare(args: GlueArgs, p: PreparedRun) -> None:
    """The model's own work: forward, backward, clip, AdamW, the allocator (LoRA²), zero_grad."""
    model, loader = p.method.model, p.train_loader
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    lr = args.learning_rate_or_default()
    opt = torch.optim.AdamW(p.method.param_groups(lr, args.weight_decay), lr=lr)  # λ at its ratio, as the pipeline
    allocate = getattr(model, "update_and_allocate", None)  # LoRA²'s allocator; PEFT LoRA has none
    step = 0
    while step < args.max_steps:
        for batch in loader:
            loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
            opt.step()
            step += 1
            if allocate is not None:
                allocate(step)
            opt.zero_grad(set_to_none=True)
            if step == args.max_steps:
                break


SIDES = {"pipeline": run_pipeline, "bare": run_bare}


def timed_side(side: str, args: GlueArgs) -> dict[str, float]:
    """Set-up, then one side's loop; CPU and wall seconds of each."""
    w0, c0 = time.perf_counter(), time.process_time()
    prepared = prepare_run(args)
    w1, c1 = time.perf_counter(), time.process_time()
    SIDES[side](args, prepared)
    w2, c2 = time.perf_counter(), time.process_time()
    out = {"cpu_s": c2 - c1, "wall_s": w2 - w1, "setup_cpu_s": c1 - c0, "setup_wall_s": w1 - w0,
           "trainable": sum(p.numel() for p in prepared.method.trainable())}
    del prepared
    gc.collect()
    return out


def spread(xs: list[float]) -> dict[str, float]:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}


def bench_pipeline(repeats: int, quick: bool, data_dir: str | None = None, model: str | None = None,
                   **overrides: Any) -> dict[str, Any]:
    """Interleaved repeats of (pipeline, bare) per method; ratio = pipeline steps/s ÷ bare steps/s per repeat."""
    opts = {**DEFAULTS, **({"batch": 4, "max_length": 32, "steps": 4, "logging_steps": 2} if quick else {}),
            **overrides}
    data_dir = data_dir or os.environ.get("LORA2_GLUE_DIR", "/work/shared/data/glue")
    limit = 4 * opts["batch"] * opts["steps"] if quick else None
    out: dict[str, Any] = {"settings": {**opts, "repeats": repeats, "data_dir": data_dir,
                                        "model": model or "all-MiniLM-L6-v2", "max_train_samples": limit},
                           "methods": {}}
    with tempfile.TemporaryDirectory() as tmp:
        def args_for(method: str, steps: int) -> GlueArgs:
            return glue_args(method, Path(tmp) / method, data_dir, model, opts["task"], opts["batch"],
                             opts["max_length"], steps, opts["logging_steps"], limit)

        for method in opts["methods"].split(","):
            for side in SIDES:  # warm-up: first calls of a process are slower (lazy initialisation)
                timed_side(side, args_for(method, min(3, opts["steps"])))
            rounds: dict[str, list[dict[str, float]]] = {side: [] for side in SIDES}
            for rep in range(repeats):
                for side in (list(SIDES) if rep % 2 == 0 else list(SIDES)[::-1]):
                    rounds[side].append(timed_side(side, args_for(method, opts["steps"])))
            steps = opts["steps"]
            entry: dict[str, Any] = {"trainable": rounds["bare"][0]["trainable"], "steps": steps, "rounds": rounds}
            for clock in ("cpu", "wall"):
                key = f"{clock}_s"
                ratios = [b[key] / p[key] for p, b in zip(rounds["pipeline"], rounds["bare"], strict=True)]
                entry[clock] = {
                    "pipeline_steps_per_s": statistics.median(steps / r[key] for r in rounds["pipeline"]),
                    "bare_steps_per_s": statistics.median(steps / r[key] for r in rounds["bare"]),
                    "ratio": spread(ratios)}
            entry["setup_cpu_s"] = statistics.median(r["setup_cpu_s"] for side in SIDES for r in rounds[side])
            entry["met"] = entry["cpu"]["ratio"]["median"] >= TARGET
            out["methods"][method] = entry
            print(f"  pipeline vs bare {method}: ratio {entry['cpu']['ratio']['median']:.3f} "
                  f"(cpu; wall {entry['wall']['ratio']['median']:.3f})", flush=True)
    return out


def render_pipeline(res: dict[str, Any]) -> list[str]:
    s = res["settings"]
    lines = [f"## The pipeline against a bare loop — {s['task'].upper()}, batch {s['batch']}, max length "
             f"{s['max_length']}, {s['model']}", "",
             f"{s['steps']} optimizer steps per side and repeat, {s['repeats']} repeats alternating which side goes "
             "first; steps/s are medians over repeats, the ratio (pipeline steps/s ÷ bare steps/s) is taken within "
             f"each repeat, then its median and range (min–max) over repeats. Target: ratio ≥ {TARGET:.2f}.", "",
             "| method | trainable | pipeline steps/s | bare steps/s | pipeline ÷ bare | min–max | wall-clock ratio "
             "| set-up s (not timed) |", "|---|---:|---:|---:|---:|---|---:|---:|"]
    for method, v in res["methods"].items():
        c, w = v["cpu"], v["wall"]
        lines.append(f"| {method} | {v['trainable']:,} | {c['pipeline_steps_per_s']:.3f} | {c['bare_steps_per_s']:.3f} | "
                     f"{c['ratio']['median']:.3f} | {c['ratio']['min']:.3f}–{c['ratio']['max']:.3f} | "
                     f"{w['ratio']['median']:.3f} | {v['setup_cpu_s']:.1f} |")
    lines += ["", "Pipeline side: `lora2.glue.loop.train` (the loop `lora2 glue` runs) on the objects `run_glue` builds: "
              "DataLoader iteration, `train_step` (forward, NaN check, backward, clip, AdamW, the method's hook, "
              "linear schedule, zero_grad), `loss.item()`, a JSON log line with the active ranks every "
              f"{s['logging_steps']} steps, and the update norms at the last step; evaluation is a stub. Bare side: "
              "the same model, adapter and DataLoader with `loss = model(**batch).loss; loss.backward(); clip; "
              "opt.step(); model.update_and_allocate(step); opt.zero_grad()`. Set-up (data, tokenisation, model, "
              "adapter) is timed apart and left out of both.", ""]
    return lines


if __name__ == "__main__":  # a library module: its command line is the runner's
    import speed

    sys.exit(speed.main())
