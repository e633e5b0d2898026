"""`LoRA2Config`: every knob of the method (method.md §1–5), validated when it is built.

Errors are raised here, at setup, rather than hours into a run: each names the field and
what a valid value looks like.
"""

from __future__ import annotations

import functools
import json
import math
import re
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

ORTH_TERMS = ("uv", "UV", "PQ")
IMPORTANCE_KINDS = ("reduced", "full")
FACTOR_INITS = ("gaussian", "orthogonal")
PQ_FORMS = ("literal", "rank")
SCALING_RULES = ("alpha/r", "alpha/k", "alpha/sqrt(r)")
CONFIG_NAME = "lora2_config.json"

# Suffixes of the "ALL" target set (method.md §7) for architectures users fine-tune most.
# Settings an adapter written before the field was added trained with, where today's default differs (0.2.0
# changed init and λ's learning rate): reloading it to train further keeps its behaviour, not today's defaults.
FIELDS_BEFORE_THEY_EXISTED = {"init": "gaussian", "lam_lr_ratio": 1.0}

DEFAULT_TARGET_MODULES: dict[str, list[str]] = {
    "bert": ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"],
    "roberta": ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"],
    "deberta-v2": [
        "query_proj", "key_proj", "value_proj", "attention.output.dense", "intermediate.dense", "output.dense",
    ],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
}


def _newer(version: Any) -> bool:
    """Whether ``version`` (as an adapter recorded it) is later than the installed lora2."""
    from packaging.version import InvalidVersion, Version

    from . import __version__

    try:
        return Version(str(version)) > Version(__version__)
    except InvalidVersion:
        return False


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class LoRA2Config:
    """Configuration of a LoRA² adapter and its rank allocator.

    Paper symbols: ``k`` is K (projection dimension), ``r`` the initial number of singular
    values per matrix, ``init_warmup``/``final_warmup``/``mask_interval`` are t_init/t_final/Δt,
    ``orth_reg_weight`` is γ.

    Two defaults depart from the paper, chosen by measured training dynamics (method.md §11): ``init``
    ('orthogonal'; the paper's is 'gaussian') and ``lam_lr_ratio`` (16; the paper's is 1). The paper's
    settings are ``LoRA2Config(init="gaussian", lam_lr_ratio=1)``.

    Training-dynamics options: ``pq_form`` picks the R_PQ term ('literal',
    method.md §3, or 'rank', whose minimum 0 is reachable when k < r; the two differ by a constant, so
    they train identically and differ only in the logged value); ``lam_lr_ratio`` trains lam at
    lr × ratio (LoRA+-style, through ``LoRA2Model.optimizer_param_groups`` and ``LoRA2Trainer``);
    ``scaling_rule`` picks the scale s of the update ('alpha/r', 'alpha/k' or 'alpha/sqrt(r)').
    """

    k: int = field(default=1, metadata={"help": "Projection dimension K of the outer factors (rank cap of Δ)."})
    r: int = field(default=8, metadata={"help": "Singular values per adapted matrix before pruning."})
    alpha: float = field(default=32.0, metadata={"help": "Scaling numerator α: the update is scaled by s = alpha / r "
                                                 "(or as scaling_rule says)."})
    dropout: float = field(default=0.0, metadata={"help": "Dropout on the adapter input, in [0, 1)."})
    init_std: float = field(default=0.02, metadata={"help": "Std of the Gaussian init of the four factors "
                                                    "(init='gaussian' only)."})
    init: str = field(
        default="orthogonal",
        metadata={"help": "Factor init: 'orthogonal' (default: semi-orthonormal factors, the regulariser's target) or "
                  "'gaussian' (N(0, init_std²), the paper's); lam = 0 either way, so Δ = 0 at step 0. The paper's "
                  "settings: init='gaussian', lam_lr_ratio=1.",
                  "choices": list(FACTOR_INITS)},
    )
    target_modules: list[str] | str | None = field(
        default=None,
        metadata={
            "help": "Module-name suffixes to adapt, or one regex matched against the full name, or 'all-linear' "
            "(every linear layer of the backbone, task head and output embeddings left out). "
            "None: the model type's default (query/key/value/attention-output/FFN)."
        },
    )
    modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "Module-name suffixes trained in full and saved (e.g. the classifier)."}
    )
    target_rank: int | None = field(
        default=None,
        metadata={"help": "Average singular values kept per matrix after pruning (bT = target_rank·M); "
                  "None: 2 (the paper's typical value, at most r) unless target_total_rank is set."},
    )
    target_total_rank: int | None = field(
        default=None, metadata={"help": "Total singular values kept over all matrices; overrides target_rank."}
    )
    init_warmup: int = field(default=200, metadata={"help": "t_init: optimizer steps before pruning starts."})
    final_warmup: int = field(default=600, metadata={"help": "t_final: last steps trained with a frozen mask."})
    mask_interval: int = field(default=10, metadata={"help": "Δt: prune every this many steps."})
    beta1: float = field(default=0.85, metadata={"help": "EMA factor of the sensitivity (Ī)."})
    beta2: float = field(default=0.85, metadata={"help": "EMA factor of the uncertainty (Ū)."})
    total_step: int | None = field(
        default=None, metadata={"help": "T: total optimizer steps; the Trainer callback fills it in."}
    )
    orth_reg_weight: float = field(default=0.1, metadata={"help": "γ: weight of the orthogonality regulariser."})
    orth_terms: list[str] = field(
        default_factory=lambda: list(ORTH_TERMS),
        metadata={"help": "Regulariser terms to use: any subset of 'uv', 'UV', 'PQ'."},
    )
    importance: str = field(
        default="reduced", metadata={"help": "Importance of a singular value: 'reduced' (paper Eq. 9, default) or "
                                     "'full' (Eq. 8, adds the outer factors' sensitivity).",
                                     "choices": list(IMPORTANCE_KINDS)}
    )
    pq_form: str = field(
        default="literal",
        metadata={"help": "Form of the R_PQ regulariser term. 'literal' (the paper's, default): ‖PᵀP − I_r‖² + ‖QQᵀ − I_r‖², "
                  "which cannot go below r − k per term when k < r. 'rank': only the min(k, r) singular values P and Q "
                  "can have are asked to be 1, Σ(σ² − 1)², so 0 is reachable; it equals 'literal' minus max(r − k, 0) "
                  "per term, for any factors, so both give the same gradients (only the logged value differs). "
                  "Same k×k cost.", "choices": list(PQ_FORMS)},
    )
    lam_lr_ratio: float = field(
        default=16.0,
        metadata={"help": "Learning-rate multiplier for lam, the singular values (LoRA+-style, > 0): lam trains at "
                  "lr × lam_lr_ratio, every other parameter at lr. Used by LoRA2Model.optimizer_param_groups() and "
                  "LoRA2Trainer (an optimizer built otherwise is refused by LoRA2Callback); 1.0 = one learning "
                  "rate, as in the paper."},
    )
    scaling_rule: str = field(
        default="alpha/r",
        metadata={"help": "Scale s of the update: 'alpha/r' (the paper's, default; r = initial singular values), "
                  "'alpha/k' (k = the rank cap of Δ, as LoRA scales by its rank) or 'alpha/sqrt(r)' "
                  "(rsLoRA-style).", "choices": list(SCALING_RULES)},
    )

    def __post_init__(self) -> None:
        self.validate()
        if self.k > self.r:
            warnings.warn(
                f"LoRA2Config.k={self.k} exceeds r={self.r}: Δ has rank at most min(k, r) = {self.r}, so the extra "
                f"{self.k - self.r} columns of the outer factors only add parameters. Use k <= r.",
                UserWarning,
                stacklevel=3,
            )

    # -- validation ---------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise ``ValueError`` naming the first invalid field (tuples and sets become lists first)."""
        if isinstance(self.orth_terms, str):
            self.orth_terms = [self.orth_terms]
        for name in ("orth_terms", "target_modules", "modules_to_save"):
            if isinstance(getattr(self, name), tuple):
                setattr(self, name, list(getattr(self, name)))
            elif isinstance(getattr(self, name), (set, frozenset)):  # PEFT takes sets; order them for the JSON
                setattr(self, name, sorted(getattr(self, name)))
        if self.target_modules == ["all-linear"]:  # a command line's one-item list
            self.target_modules = "all-linear"
        for name in ("k", "r"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ValueError(f"LoRA2Config.{name} must be an integer >= 1, got {value!r}.")
        for name, low_ok in (("alpha", False), ("init_std", False), ("orth_reg_weight", True)):
            value = getattr(self, name)
            if not _is_number(value) or value < 0 or (value == 0 and not low_ok):
                bound = ">= 0" if low_ok else "> 0"
                raise ValueError(f"LoRA2Config.{name} must be a finite number {bound}, got {value!r}.")
        if self.init not in FACTOR_INITS:
            raise ValueError(f"LoRA2Config.init must be one of {', '.join(map(repr, FACTOR_INITS))}, got {self.init!r}.")
        if not _is_number(self.dropout) or not 0 <= self.dropout < 1:
            raise ValueError(f"LoRA2Config.dropout must be a number in [0, 1), got {self.dropout!r}.")
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            if not _is_number(value) or not 0 < value < 1:
                raise ValueError(f"LoRA2Config.{name} must be a number in (0, 1), got {value!r}.")
        for name in ("init_warmup", "final_warmup"):
            value = getattr(self, name)
            if not _is_int(value) or value < 0:
                raise ValueError(f"LoRA2Config.{name} must be an integer >= 0, got {value!r}.")
        if not _is_int(self.mask_interval) or self.mask_interval < 1:
            raise ValueError(f"LoRA2Config.mask_interval must be an integer >= 1, got {self.mask_interval!r}.")
        if self.target_rank is not None and (not _is_int(self.target_rank) or not 1 <= self.target_rank <= self.r):
            raise ValueError(
                f"LoRA2Config.target_rank must be an integer in [1, r={self.r}] or None, got {self.target_rank!r}. "
                "Use target_rank=r to train without pruning."
            )
        if self.target_total_rank is not None and (not _is_int(self.target_total_rank) or self.target_total_rank < 1):
            raise ValueError(
                f"LoRA2Config.target_total_rank must be an integer >= 1 or None, got {self.target_total_rank!r}."
            )
        if self.total_step is not None:
            if not _is_int(self.total_step) or self.total_step < 1:
                raise ValueError(f"LoRA2Config.total_step must be an integer >= 1 or None, got {self.total_step!r}.")
            if self.target_total_rank is not None or self.resolved_target_rank < self.r:
                self.check_schedule(self.total_step)
        if not isinstance(self.orth_terms, list) or not all(isinstance(t, str) for t in self.orth_terms):
            raise ValueError(f"LoRA2Config.orth_terms must be a list of strings, got {self.orth_terms!r}.")
        unknown = [t for t in self.orth_terms if t not in ORTH_TERMS]
        if unknown:
            raise ValueError(
                f"LoRA2Config.orth_terms has unknown term(s) {unknown}; choose from {list(ORTH_TERMS)} "
                "(case matters: 'uv' is the input side, 'UV' the output side)."
            )
        if len(set(self.orth_terms)) != len(self.orth_terms):
            raise ValueError(f"LoRA2Config.orth_terms lists a term twice: {self.orth_terms!r}.")
        if self.importance not in IMPORTANCE_KINDS:
            raise ValueError(
                f"LoRA2Config.importance must be one of {list(IMPORTANCE_KINDS)}, got {self.importance!r}."
            )
        for name, choices in (("pq_form", PQ_FORMS), ("scaling_rule", SCALING_RULES)):
            if getattr(self, name) not in choices:
                raise ValueError(f"LoRA2Config.{name} must be one of {list(choices)}, got {getattr(self, name)!r}.")
        if not _is_number(self.lam_lr_ratio) or self.lam_lr_ratio <= 0:
            raise ValueError(f"LoRA2Config.lam_lr_ratio must be a finite number > 0, got {self.lam_lr_ratio!r}.")
        self._check_names("target_modules", self.target_modules, allow_regex=True)
        self._check_names("modules_to_save", self.modules_to_save, allow_regex=False)

    @staticmethod
    def _check_names(name: str, value: Any, allow_regex: bool) -> None:
        if value is None:
            return
        if isinstance(value, str):
            if not allow_regex:
                raise ValueError(f"LoRA2Config.{name} must be a list of module-name suffixes, got the string {value!r}.")
            if not value:
                raise ValueError(f"LoRA2Config.{name} must not be an empty string.")
            try:
                re.compile(value)
            except re.error as err:
                raise ValueError(f"LoRA2Config.{name} is not a valid regular expression ({err}): {value!r}.") from None
            return
        empty_ok = not allow_regex  # modules_to_save=[]: nothing trained in full, deliberately (no head warning)
        if not isinstance(value, list) or (not value and not empty_ok) or not all(isinstance(v, str) and v for v in value):
            kind = ("a list of non-empty strings" if empty_ok else "a non-empty list of non-empty strings") \
                + (" or one regex string" if allow_regex else "")
            raise ValueError(f"LoRA2Config.{name} must be {kind}, got {value!r}.")

    def check_schedule(self, total_step: int, source: str = "LoRA2Config.total_step") -> None:
        """method.md §5: the pruning phase must exist, i.e. T > t_init + t_final (``source`` names where T came from)."""
        if total_step <= self.init_warmup + self.final_warmup:
            raise ValueError(
                f"{source}={total_step} leaves no pruning phase: it must exceed "
                f"init_warmup + final_warmup = {self.init_warmup} + {self.final_warmup} = "
                f"{self.init_warmup + self.final_warmup}. Train longer or shrink the warm-up phases."
            )

    # -- derived values -----------------------------------------------------------------------
    @property
    def resolved_target_rank(self) -> int:
        """target_rank, or its default min(2, r) when neither target field is set."""
        return self.target_rank if self.target_rank is not None else min(2, self.r)

    @property
    def scaling(self) -> float:
        """s of the update: alpha / r (method.md §2, the default), alpha / k or alpha / √r, as ``scaling_rule`` says."""
        denominator = {"alpha/r": self.r, "alpha/k": self.k, "alpha/sqrt(r)": math.sqrt(self.r)}[self.scaling_rule]
        return self.alpha / denominator

    def budgets(self, num_matrices: int) -> tuple[int, int]:
        """(b0, bT): initial and target count of active singular values over all matrices."""
        b0 = self.r * num_matrices
        if self.target_total_rank is not None:
            b_target = self.target_total_rank
        else:
            b_target = self.resolved_target_rank * num_matrices
        if b_target > b0:
            raise ValueError(
                f"LoRA2Config.target_total_rank={b_target} exceeds the initial budget r·M = {self.r}·{num_matrices} = {b0}."
            )
        return b0, b_target

    # -- JSON round trip ----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LoRA2Config:
        if not isinstance(data, dict):
            raise ValueError(f"A LoRA2Config must be built from a JSON object, got {type(data).__name__}.")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"Unknown LoRA2Config field(s) {unknown}; valid fields are {sorted(known)}.")
        return cls(**data)

    @classmethod
    def from_adapter_dict(cls, data: Any, saved_by: str | None = None) -> LoRA2Config:
        """The ``config`` of a saved adapter: a field the adapter's lora2 did not have yet takes the value that
        version trained with (``FIELDS_BEFORE_THEY_EXISTED``), not today's default. ``saved_by``: the lora2
        version that saved it; fields from a newer version are refused with the upgrade to make (they may
        change the math, so dropping them could load a different adapter)."""
        if isinstance(data, dict):
            data = {**FIELDS_BEFORE_THEY_EXISTED, **data}
            unknown = sorted(set(data) - {f.name for f in fields(cls)})
            if unknown and saved_by is not None and _newer(saved_by):
                from . import __version__

                raise ValueError(f"This adapter was saved by lora2 {saved_by}, whose config field(s) {unknown} "
                                 f"the installed lora2 {__version__} does not have; upgrade lora2 "
                                 f"(pip install -U 'lora2>={saved_by}') to load it.")
        return cls.from_dict(data)

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json_file(cls, path: str | Path) -> LoRA2Config:
        """A config from a JSON file of ``to_json_string()``, or from an adapter's ``lora2_config.json`` (a path
        to the adapter directory is enough)."""
        path = Path(path)
        if path.is_dir():
            path = path / CONFIG_NAME
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise FileNotFoundError(f"No LoRA² config at {path}: is this a directory written by save_pretrained?") from None
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON ({err}); the file may be truncated or corrupted.") from None
        if isinstance(data, dict) and data.get("library") == "lora2":  # an adapter file: config plus metadata
            return cls.from_adapter_dict(data.get("config"), data.get("version"))
        return cls.from_dict(data)

    @classmethod
    def from_pretrained(cls, path: str | Path, revision: str | None = None, token: str | bool | None = None,
                        ) -> LoRA2Config:
        """PEFT's name: the config of an adapter directory written by ``save_pretrained`` (a Hub repo id as
        ``LoRA2Model.from_pretrained`` takes one), or of a config JSON file."""
        from .hub import resolve_adapter_directory

        return cls.from_json_file(resolve_adapter_directory(path, revision, token))


# PEFT's (and AdaLoRA's) option names that LoRA2Config spells differently or does not need: named in the TypeError
PEFT_OPTION_NAMES = {
    "lora_alpha": "alpha", "lora_dropout": "dropout", "init_r": "r", "target_r": "target_rank",
    "tinit": "init_warmup", "tfinal": "final_warmup", "deltaT": "mask_interval",
    "init_lora_weights": "init ('orthogonal' or 'gaussian')", "use_rslora": "scaling_rule='alpha/sqrt(r)'",
    "task_type": "nothing: the task is read from the model; train its head with modules_to_save=['classifier']",
    "fan_in_fan_out": "nothing: GPT-2's Conv1D layout is detected",
    "exclude_modules": "a list of the modules to adapt, or one regex in target_modules (matched against the full "
                       "module name) that leaves the others out",
    "layers_to_transform": "one regex in target_modules, e.g. r'.*layer\\.(0|1)\\..*query'",
    "bias": "nothing built in: list the modules whose biases should train in modules_to_save",
    "use_dora": "nothing: DoRA is another method",
    "peft_type": "nothing: a LoRA2Config is LoRA²'s own type",
    "inference_mode": "LoRA2Model.from_pretrained(base, dir) (is_trainable=False, the default)",
    "rank_pattern": "nothing: one k and r for every matrix, and the rank allocator sets the ranks",
    "alpha_pattern": "nothing: one alpha for every matrix",
}


def _hint_peft_names(init: Any) -> Any:
    @functools.wraps(init)  # inspect.signature follows __wrapped__: the dataclass's own
    def __init__(self: LoRA2Config, *args: Any, **kwargs: Any) -> None:
        known = [name for name in kwargs if name in PEFT_OPTION_NAMES]
        if known:
            hints = "; ".join(f"{name} → {PEFT_OPTION_NAMES[name]}" for name in known)
            raise TypeError(f"LoRA2Config has no {', '.join(known)} (PEFT's name{'s' if len(known) > 1 else ''}); "
                            f"here: {hints}.")
        init(self, *args, **kwargs)

    return __init__


LoRA2Config.__init__ = _hint_peft_names(LoRA2Config.__init__)  # type: ignore[method-assign]
