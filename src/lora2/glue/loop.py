"""The training loop every method shares: same data order, optimizer, schedule and evaluation.

The loop is ours (not the Trainer's) so the per-step hook (LoRA²/AdaLoRA allocation, SoRA's proximal
step) runs right after ``optimizer.step()`` and before ``zero_grad()`` for every method alike, and a
run can stop and resume at any step.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..persistence import read_json
from .checkpoint import STATE_NAME, latest_checkpoint, load_checkpoint, prune_checkpoints, save_checkpoint
from .methods import Method


@dataclass
class LoopSettings:
    total_steps: int
    eval_every: int
    logging_steps: int = 10
    max_grad_norm: float = 1.0
    save_steps: int | None = None
    save_total_limit: int = 2
    progress: bool = True
    description: str = "train"
    identity: dict[str, Any] = field(default_factory=dict)  # the run's options; a resume must match them


@dataclass
class LoopState:
    """Counters and history that a checkpoint carries."""

    step: int = 0
    epoch: int = 0
    batches_done: int = 0
    train_time: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)
    update_norms: list[dict[str, float]] = field(default_factory=list)  # ‖ΔW‖/‖W0‖ at each evaluation
    best: dict[str, Any] = field(default_factory=lambda: {"score": -math.inf})
    # the losses since the last log line, so that a resumed run's next line averages the same steps
    running: list[float] = field(default_factory=list)
    running_task: list[float] = field(default_factory=list)  # the task part of each loss (LoRA²'s γ·R taken out)


def resume(path: str, out_dir: Path, method: Method, optimizer: Any, scheduler: Any, settings: LoopSettings,
           generator: torch.Generator, log_path: Path) -> LoopState:
    """Load a checkpoint ('last' or a path) into method/optimizer/scheduler/generator; trim the log to it.

    Refused when the checkpoint was written with other options (steps, learning rate, any LoRA² field):
    continuing it would train with the old ones and report the new ones."""
    source = latest_checkpoint(out_dir) if path == "last" else Path(path)
    if source is None:
        raise FileNotFoundError(f"--resume-from-checkpoint last: no complete checkpoint-N in {out_dir}.")
    total_steps = settings.total_steps
    stored = read_json(source / STATE_NAME) if (source / STATE_NAME).is_file() else {}
    if stored.get("total_steps", total_steps) != total_steps:
        raise ValueError(f"{source} belongs to a run of {stored['total_steps']} steps, this one has "
                         f"{total_steps}: resume with the same options.")
    options = json.loads(json.dumps(settings.identity))  # as JSON stores them (tuples become lists)
    if "options" in stored and stored["options"] != options:
        changed = sorted(k for k in set(options) | set(stored["options"]) if options.get(k) != stored["options"].get(k))
        raise ValueError(f"{source} was written with other options ({', '.join(changed)}): resume with the same "
                         "options, or start a new run in another --output-dir.")
    saved, data_state = load_checkpoint(source, method, optimizer, scheduler)
    generator.set_state(data_state)
    kept = [line for line in log_path.read_text(encoding="utf-8").splitlines()
            if json.loads(line)["step"] <= saved["step"]] if log_path.exists() else []
    log_path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    return LoopState(**{f.name: saved[f.name] for f in dataclasses.fields(LoopState) if f.name in saved})


def train_step(method: Method, batch: dict[str, torch.Tensor], optimizer: Any, scheduler: Any, step: int,
               max_grad_norm: float, params: list[torch.nn.Parameter] | None = None,
               phase: Callable[[str], None] | None = None) -> torch.Tensor:
    """One optimizer step (step number ``step``, 1-based), the only copy that the pipeline and the benchmarks run:
    forward, backward, clip, optimizer, the method's hook, schedule, zero_grad. Returns the loss.

    ``phase`` (benchmarks) is called with "forward", "backward", "optimizer" (clip included), "hook" and
    "zero_grad" as each part ends, so a timer can split the step without a second copy of it.
    """
    loss = method.training_loss(batch)
    if not torch.isfinite(loss):
        raise FloatingPointError(f"Training loss is {loss.item()} at step {step}; lower the learning rate.")
    if phase is not None:
        phase("forward")
    loss.backward()
    if phase is not None:
        phase("backward")
    if max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(params if params is not None else method.trainable(), max_grad_norm)
    extra = method.unclipped_loss()
    if extra is not None:
        extra.backward()
        loss = loss.detach() + extra.detach()  # the objective, as in the usual loop: task loss + γ·R
    optimizer.step()
    if phase is not None:
        phase("optimizer")
    method.after_step(step, scheduler.get_last_lr()[0])
    if phase is not None:
        phase("hook")
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    if phase is not None:
        phase("zero_grad")
    return loss


def train(method: Method, loader: Any, generator: torch.Generator, optimizer: Any, scheduler: Any,
          evaluate: Callable[[], dict[str, float]], score: Callable[[dict[str, float]], float],
          settings: LoopSettings, out_dir: Path, state: LoopState, device: str,
          stop_at_step: int | None = None) -> LoopState | None:
    """Train to ``settings.total_steps``; log to ``out_dir/train_log.jsonl``, evaluate, checkpoint.

    Returns the final state, or None when ``stop_at_step`` (tests only) ended the run early, as a kill would.
    """
    model, params = method.model, method.trainable()
    total = settings.total_steps
    log = open(out_dir / "train_log.jsonl", "a", encoding="utf-8")  # closed in the finally below
    model.train()
    bar = tqdm(total=total, initial=state.step, desc=settings.description, disable=not settings.progress,
               dynamic_ncols=True)
    try:
        while state.step < total:
            epoch_data_state = generator.get_state()  # the epoch's shuffle is drawn from here when iteration starts
            for index, batch in enumerate(loader):
                if index < state.batches_done:
                    continue  # consumed before the checkpoint this run resumed from
                t0 = time.perf_counter()
                batch = {k: v.to(device) for k, v in batch.items()}
                lr_used = scheduler.get_last_lr()[0]  # this step's rate: the schedule moves on inside train_step
                loss = train_step(method, batch, optimizer, scheduler, state.step + 1, settings.max_grad_norm, params)
                state.step += 1
                state.batches_done = index + 1
                state.train_time += time.perf_counter() - t0
                state.running.append(loss.item())
                state.running_task.append(method.task_loss(state.running[-1]))
                bar.update(1)
                step = state.step
                if step % settings.logging_steps == 0 or step == total:
                    entry = {"step": step, "loss": float(np.mean(state.running)),
                             "task_loss": float(np.mean(state.running_task)),
                             "lr": lr_used}
                    pattern = method.active_pattern()
                    if pattern is not None:
                        entry["active_ranks"] = int(sum(pattern.values()))
                    entry.update(method.log_values())
                    log.write(json.dumps(entry) + "\n")
                    log.flush()
                    bar.set_postfix(loss=f"{entry['loss']:.4f}")
                    state.running, state.running_task = [], []
                if step % settings.eval_every == 0 or step == total:
                    metrics = evaluate()
                    state.history.append({"step": step, **metrics})
                    norms = method.update_norms()
                    # LoRA²: rank(ΔW) ≤ k per matrix whatever the active count; a small SVD per matrix (a device
                    # sync each on a GPU), so with the other ΔW statistics at evaluations, not at every log line
                    effective = method.effective_pattern()
                    if norms is not None and effective is not None:
                        norms = {**norms, "effective_rank": int(sum(effective.values()))}
                    if norms is not None:
                        state.update_norms.append({"step": step, **norms})
                    log.write(json.dumps({"step": step, "eval": metrics, "update_norm": norms}) + "\n")
                    log.flush()
                    if score(metrics) > state.best["score"]:
                        state.best = {"score": score(metrics), "step": step, "metrics": metrics}
                    bar.write(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
                if settings.save_steps and step % settings.save_steps == 0 and step < total:
                    loop_state = {**dataclasses.asdict(state), "total_steps": total, "options": settings.identity}
                    save_checkpoint(out_dir / f"checkpoint-{step}", method, optimizer, scheduler, loop_state,
                                    epoch_data_state)
                    prune_checkpoints(out_dir, settings.save_total_limit)
                if step == stop_at_step:
                    return None
                if step >= total:
                    break
            state.epoch, state.batches_done = state.epoch + 1, 0
    finally:
        bar.close()
        log.close()
    return state
