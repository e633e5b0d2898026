"""LoRA² ⇄ PEFT LoRA: serve a LoRA² adapter with any LoRA runtime, or start LoRA² from a LoRA (SPEC §6).

A LoRA² update (paper layout, d_in×d_out) is ``Δ = s · p_outer · core · q_outer`` with the k×k
``core = p_inner · diag(lam ⊙ mask) · q_inner``. A PEFT LoRA adds ``B A`` to the PyTorch-layout weight
(``A``: rank×d_in, ``B``: d_out×rank, both the same for GPT-2's Conv1D, whose PEFT layer sets
``fan_in_fan_out``). So

- **rank k** (default): ``A = p_outerᵀ``, ``B = s · (core · q_outer)ᵀ``, PEFT scaling 1 (``lora_alpha = r``);
- **exact rank** (``exact_rank=True``): the k×k middle of Δ is reduced by QR of ``p_outer`` and
  ``q_outerᵀ`` and one tiny SVD, so each matrix is written at its true rank (≤ min(k, active λ))
  with PEFT's ``rank_pattern``/``alpha_pattern``; matrices whose rank is 0 are left out.

No d_in×d_out matrix is formed, and reading a saved adapter needs no base-model weights.
``init_from_peft_lora`` goes the other way: a fresh LoRA² model whose update equals a PEFT LoRA's.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .config import CONFIG_NAME, LoRA2Config
from .layer import FACTOR_NAMES, numerical_rank, reduced_factors, small_svd
from .persistence import WEIGHTS_NAME, read_json, read_tensors, write_json, write_tensors

PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."

# Class-name endings of 🤗 models → PEFT task_type (PeftModel.from_pretrained picks its wrapper from it).
_TASK_TYPES = (
    ("ForSequenceClassification", "SEQ_CLS"),
    ("ForTokenClassification", "TOKEN_CLS"),
    ("ForQuestionAnswering", "QUESTION_ANS"),
    ("ForCausalLM", "CAUSAL_LM"),
    ("LMHeadModel", "CAUSAL_LM"),
    ("ForSeq2SeqLM", "SEQ_2_SEQ_LM"),
)
# Heads PEFT adds to modules_to_save for these task types (peft_model.py).
_TASK_HEADS = {"SEQ_CLS": {"classifier", "score"}, "TOKEN_CLS": {"classifier", "score"}, "QUESTION_ANS": {"qa_outputs"}}


def lora_factors(f: dict[str, torch.Tensor], scaling: float, exact_rank: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of a PEFT LoRA with scaling 1 and ``B @ A`` = the PyTorch-layout update ``s · Δᵀ``.

    ``exact_rank=False``: rank k, ``A = p_outerᵀ``, ``B = s · (core · q_outer)ᵀ`` (SPEC §6).
    ``exact_rank=True``: rank = rank(Δ) (may be 0); the singular values are split evenly as √σ
    between A and B. Results come back in the dtype of ``p_outer``.
    """
    dtype = f["p_outer"].dtype
    if not exact_rank:
        lam = f["lam"].double() * f["mask"].double() * scaling
        core = (f["p_inner"].double() * lam) @ f["q_inner"].double()  # (k, k), s folded in
        a = f["p_outer"].double().T
        b = (core @ f["q_outer"].double()).T
        return a.to(dtype).contiguous(), b.to(dtype).contiguous()
    qp, left, right, qq, _ = reduced_factors(f, scaling)
    d_in, d_out = qp.shape[0], qq.shape[0]
    if left.shape[1] == 0:
        return torch.zeros(0, d_in, dtype=dtype), torch.zeros(d_out, 0, dtype=dtype)
    q1, u, s, vh, q2 = small_svd(left, right)
    rank = numerical_rank(s, dtype)
    root = s[:rank].sqrt()
    a = ((qp @ q1 @ u[:, :rank]) * root).T  # (rank, d_in)
    b = (qq @ q2 @ vh[:rank].T) * root  # (d_out, rank)
    return a.to(dtype).contiguous(), b.to(dtype).contiguous()


# -- reading a LoRA² adapter (a live model or a save_pretrained directory) ---------------------
@dataclass
class _LoRA2Source:
    config: LoRA2Config
    factors: dict[str, dict[str, torch.Tensor]]
    fan_in_fan_out: dict[str, bool]
    modules_to_save: list[str]
    saved_tensors: dict[str, torch.Tensor]  # modules_to_save weights, keyed by name in the unwrapped model
    base_model_name_or_path: str | None
    base_model_class: str | None
    where: str


def _from_model(model: Any) -> _LoRA2Source:
    if getattr(model, "_unloaded", False):
        raise ValueError("This LoRA2Model was unloaded by merge_and_unload(); export the model before merging, "
                         "or export its saved adapter directory.")
    factors = {
        name: {p: t.cpu() for p, t in layer.factors().items()} for name, layer in model.lora2_layers.items()
    }
    saved: dict[str, torch.Tensor] = {}
    for name in model.modules_to_save_names:
        for key, value in model.base_model.get_submodule(name).state_dict().items():
            saved[f"{name}.{key}"] = value.detach().cpu()
    base_cfg = model.config
    return _LoRA2Source(
        config=model.lora2_config,
        factors=factors,
        fan_in_fan_out={n: bool(layer.fan_in_fan_out) for n, layer in model.lora2_layers.items()},
        modules_to_save=list(model.modules_to_save_names),
        saved_tensors=saved,
        base_model_name_or_path=getattr(base_cfg, "_name_or_path", None) or None,
        base_model_class=type(model.base_model).__name__,
        where="the LoRA2Model",
    )


def read_lora2_adapter(directory: Path) -> _LoRA2Source:
    """A saved LoRA² adapter directory, validated: config, per-matrix factors (``FACTOR_NAMES``) and the rest."""
    if not directory.exists():
        raise FileNotFoundError(f"Adapter directory {directory} does not exist; pass the directory "
                                "LoRA2Model.save_pretrained wrote.")
    if not directory.is_dir():
        raise ValueError(f"{directory} is a file; pass the adapter directory that contains {CONFIG_NAME} and {WEIGHTS_NAME}.")
    if not (directory / CONFIG_NAME).is_file():
        hint = (" It holds a PEFT adapter already (adapter_config.json): it needs no export."
                if (directory / PEFT_CONFIG_NAME).is_file() else "")
        raise FileNotFoundError(f"{directory} has no {CONFIG_NAME}, so it is not a LoRA² adapter directory "
                                f"(written by LoRA2Model.save_pretrained).{hint}")
    meta = read_json(directory / CONFIG_NAME)
    if not isinstance(meta, dict) or meta.get("library") != "lora2" or "config" not in meta:
        raise ValueError(f"{directory / CONFIG_NAME} is not a LoRA² adapter config (no 'library': 'lora2' / 'config').")
    config = LoRA2Config.from_dict(meta["config"])
    names = meta.get("adapted_modules")
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise ValueError(f"{directory / CONFIG_NAME} has no usable 'adapted_modules' list; the file is corrupted. "
                         "Re-save the adapter with LoRA2Model.save_pretrained.")
    fan = meta.get("fan_in_fan_out")
    if not isinstance(fan, dict) or set(fan) != set(names):
        raise ValueError(
            f"{directory / CONFIG_NAME} does not say which adapted layers are GPT-2 Conv1D ('fan_in_fan_out', written "
            "by lora2 since the export feature). Load it with LoRA2Model.from_pretrained(base_model, dir) and pass "
            "that model to export_to_peft, or re-save it with save_pretrained."
        )
    to_save = meta.get("modules_to_save") or []
    tensors = read_tensors(directory / WEIGHTS_NAME)
    factors: dict[str, dict[str, torch.Tensor]] = {}
    for name in names:
        missing = [p for p in FACTOR_NAMES if f"{name}.{p}" not in tensors]
        if missing:
            raise ValueError(f"{directory / WEIGHTS_NAME} lacks {[f'{name}.{p}' for p in missing]}; the adapter is "
                             "incomplete or corrupted. Re-save it with LoRA2Model.save_pretrained.")
        factors[name] = {p: tensors.pop(f"{name}.{p}") for p in FACTOR_NAMES}
    stray = [key for key in tensors if not any(key.startswith(m + ".") for m in to_save)]
    if stray:
        raise ValueError(f"{directory / WEIGHTS_NAME} has tensors that belong to no adapted module or modules_to_save, "
                         f"e.g. {stray[:3]}; the weights do not match {CONFIG_NAME}.")
    return _LoRA2Source(
        config=config,
        factors=factors,
        fan_in_fan_out={n: bool(fan[n]) for n in names},
        modules_to_save=list(to_save),
        saved_tensors=tensors,
        base_model_name_or_path=meta.get("base_model_name_or_path"),
        base_model_class=meta.get("base_model_class"),
        where=f"the adapter in {directory}",
    )


def _check_factors(src: _LoRA2Source) -> None:
    k, r = src.config.k, src.config.r
    for name, f in src.factors.items():
        d_in, d_out = f["p_outer"].shape[0], f["q_outer"].shape[-1]
        expected = {"p_outer": (d_in, k), "p_inner": (k, r), "lam": (r,), "q_inner": (r, k), "q_outer": (k, d_out),
                    "mask": (r,)}
        for p, shape in expected.items():
            t = f[p]
            if tuple(t.shape) != shape:
                raise ValueError(f"{name}.{p} in {src.where} has shape {tuple(t.shape)}, expected {shape} for k={k}, "
                                 f"r={r}; the adapter is corrupted or its config does not match its weights.")
            if not t.is_floating_point() or not bool(torch.isfinite(t).all()):
                raise ValueError(f"{name}.{p} in {src.where} is not a finite floating-point tensor; the adapter is broken.")


def _task_type(class_name: str | None, adapted: list[str], modules_to_save: list[str]) -> str | None:
    """PEFT's task_type for the base class, or None where PEFT's wrapper would not load the file.

    For SEQ_CLS/TOKEN_CLS (QUESTION_ANS) PEFT adds the head ``classifier``/``score`` (``qa_outputs``)
    to modules_to_save and then requires its weights in the file: so the task type is written only
    when the adapter saves that head in full. Without it ``PeftModel`` (task_type None) loads the
    same weights and runs the same forward.
    """
    task = next((t for ending, t in _TASK_TYPES if class_name and class_name.endswith(ending)), None)
    heads = _TASK_HEADS.get(task or "")
    if heads is None:
        return task
    last = {n.rsplit(".", 1)[-1] for n in modules_to_save}
    if last & heads and not {n.rsplit(".", 1)[-1] for n in adapted} & heads:
        return task
    return None


def _check_unambiguous(names: list[str]) -> None:
    """PEFT matches target_modules and rank_pattern keys as dotted suffixes: no name may end another."""
    by_last: dict[str, list[str]] = {}
    for n in names:
        by_last.setdefault(n.rsplit(".", 1)[-1], []).append(n)
    for group in by_last.values():
        for a in group:
            for b in group:
                if a != b and b.endswith("." + a):
                    raise ValueError(f"Module names {a!r} and {b!r} cannot both be told apart in a PEFT config (PEFT "
                                     "matches names as dotted suffixes); this adapter cannot be exported to PEFT.")


# -- export -----------------------------------------------------------------------------------
@dataclass
class PeftExport:
    """What ``export_to_peft`` wrote: the directory, the rank of every exported matrix, what was left out."""

    out_dir: Path
    ranks: dict[str, int]
    dropped: list[str] = field(default_factory=list)
    modules_to_save: list[str] = field(default_factory=list)
    exact_rank: bool = False


def export_to_peft(
    adapter: Any,
    out_dir: str | Path,
    *,
    exact_rank: bool = False,
    base_model_name_or_path: str | None = None,
) -> PeftExport:
    """Write a LoRA² adapter as a PEFT LoRA adapter (``adapter_config.json`` + ``adapter_model.safetensors``).

    ``adapter``: a ``LoRA2Model``, or a directory written by ``LoRA2Model.save_pretrained`` (no base
    weights needed). ``exact_rank``: write each matrix at its true rank via ``rank_pattern`` and drop
    rank-0 matrices; otherwise every matrix is a rank-k LoRA. ``base_model_name_or_path`` overrides
    the base model recorded in the adapter (e.g. a hub id instead of a local path). Load the result
    with ``peft.PeftModel.from_pretrained(base, out_dir)``.
    """
    source_dir: Path | None = None
    if isinstance(adapter, (str, Path)):
        source_dir = Path(adapter)
        src = read_lora2_adapter(source_dir)
    elif hasattr(adapter, "lora2_layers") and hasattr(adapter, "lora2_config"):
        src = _from_model(adapter)
    else:
        raise TypeError(f"export_to_peft takes a LoRA2Model or an adapter directory, not {type(adapter).__name__}.")
    _check_factors(src)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"Output {out} is a file; export_to_peft writes a directory. Choose a new or existing directory.")
    if source_dir is not None and out.exists() and out.resolve() == source_dir.resolve():
        raise ValueError(f"Output {out} is the LoRA² adapter directory itself; write the PEFT adapter to another one.")
    _check_unambiguous(list(src.factors) + src.modules_to_save)

    scaling = src.config.scaling
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    dropped: list[str] = []
    for name, f in src.factors.items():
        a, b = lora_factors(f, scaling, exact_rank=exact_rank)
        if a.shape[0] == 0:
            dropped.append(name)
            continue
        ranks[name] = a.shape[0]
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = a
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = b
    if not ranks:
        raise ValueError(f"Every adapted matrix of {src.where} has rank 0 (all singular values pruned), so an exact-rank "
                         "PEFT LoRA would adapt nothing. Export without exact_rank to get a rank-k (zero) LoRA.")
    for key, value in src.saved_tensors.items():
        tensors[PEFT_PREFIX + key] = value

    kept = list(ranks)
    rank = max(ranks.values()) if exact_rank else src.config.k
    conv = [n for n in kept if src.fan_in_fan_out[n]]
    config = {
        "peft_type": "LORA",
        "task_type": _task_type(src.base_model_class, kept, src.modules_to_save),
        "base_model_name_or_path": base_model_name_or_path or src.base_model_name_or_path,
        "revision": None,
        "inference_mode": True,
        "r": rank,
        "lora_alpha": rank,  # PEFT scaling lora_alpha / r = 1: s is folded into B
        "rank_pattern": dict(ranks) if exact_rank else {},
        "alpha_pattern": dict(ranks) if exact_rank else {},
        "use_rslora": False,
        "use_dora": False,
        "lora_bias": False,
        "bias": "none",
        "lora_dropout": src.config.dropout,
        "target_modules": kept,
        "exclude_modules": None,
        "modules_to_save": list(src.modules_to_save) or None,
        # PEFT sets this per layer from the layer type (it warns and flips it for a layer of the other
        # kind), so a mix of Conv1D and Linear loads correctly; record what most layers are.
        "fan_in_fan_out": len(conv) * 2 > len(kept),
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
    }
    meta = {"format": "pt", "exported_by": f"lora2 {__version__}", "lora2_k": str(src.config.k),
            "lora2_r": str(src.config.r), "exact_rank": str(exact_rank)}
    write_tensors(out / PEFT_WEIGHTS_NAME, tensors, metadata=meta)
    write_json(out / PEFT_CONFIG_NAME, config)  # written last: marks a complete export
    return PeftExport(out_dir=out, ranks=ranks, dropped=dropped, modules_to_save=list(src.modules_to_save),
                      exact_rank=exact_rank)


# -- import -----------------------------------------------------------------------------------
def _pattern_value(patterns: dict[str, Any], name: str, default: Any) -> Any:
    """PEFT's rank_pattern/alpha_pattern lookup: the first key that matches ``name`` as a dotted suffix."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def init_from_peft_lora(model: Any, peft_adapter_dir: str | Path) -> list[str]:
    """Set a fresh ``LoRA2Model``'s factors so that its update equals a PEFT LoRA adapter's, exactly.

    For a PEFT matrix ``scaling · B A`` of rank m (needs m ≤ k and m ≤ r): ``p_outer[:, :m] = Aᵀ``,
    ``q_outer[:m] = scaling · Bᵀ``, ``q_outer[m:] = 0``; the first m singular values get
    ``p_inner[:, i] = e_i``, ``q_inner[i] = e_iᵀ``, ``lam_i = 1/s`` (so core = I on the first m),
    the other r − m keep their random ``p_inner``/``q_inner`` with ``lam = 0`` and can still learn.
    modules_to_save tensors (e.g. a classifier) are copied too. Matrices the PEFT adapter does not
    cover are left as they are (Δ = 0 on a fresh model). Returns the names initialised.
    """
    directory = Path(peft_adapter_dir)
    if not directory.is_dir():
        raise FileNotFoundError(f"PEFT adapter directory {directory} does not exist.")
    cfg = read_json(directory / PEFT_CONFIG_NAME)
    if not isinstance(cfg, dict) or cfg.get("peft_type") != "LORA":
        raise ValueError(f"{directory / PEFT_CONFIG_NAME} is not a PEFT LoRA config (peft_type must be 'LORA').")
    unsupported = [k for k in ("use_dora", "lora_bias") if cfg.get(k)]
    if cfg.get("bias", "none") != "none":
        unsupported.append(f"bias={cfg['bias']!r}")
    if unsupported:
        raise ValueError(f"The PEFT adapter uses {unsupported}: its update is not a plain B·A, so LoRA² cannot "
                         "reproduce it.")
    if not (directory / PEFT_WEIGHTS_NAME).is_file():
        hint = " Only safetensors are read (no pickles): re-save it with a recent PEFT." \
            if (directory / "adapter_model.bin").is_file() else ""
        raise FileNotFoundError(f"Missing {directory / PEFT_WEIGHTS_NAME}.{hint}")
    if getattr(model, "_unloaded", False) or any(layer.merged for layer in model.lora2_layers.values()):
        raise RuntimeError("init_from_peft_lora needs an unmerged LoRA2Model.")
    if model.allocator.num_updates > 0 or bool((model.allocator.masks() < 1).any()):
        raise RuntimeError("init_from_peft_lora initialises a fresh LoRA2Model: this one has already pruned.")

    tensors = read_tensors(directory / PEFT_WEIGHTS_NAME)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    saved: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        name = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
        match = re.fullmatch(r"(.+)\.(lora_A|lora_B)\.weight", name)
        if match:
            pairs.setdefault(match.group(1), {})[match.group(2)] = value
        elif ".lora_" in name:
            raise ValueError(f"{key} is not a Linear LoRA weight (embedding/conv LoRA); LoRA² cannot import it.")
        else:
            saved[name] = value
    unknown = sorted(n for n in pairs if n not in model.lora2_layers)
    if unknown:
        raise ValueError(f"The PEFT adapter adapts {unknown[:3]}{' ...' if len(unknown) > 3 else ''}, which this "
                         "LoRA2Model does not adapt; add them to LoRA2Config.target_modules.")
    base = model.get_base_model()
    outside = sorted(n for n in saved if not any(n.startswith(m + ".") for m in model.modules_to_save_names))
    if outside:
        raise ValueError(f"The PEFT adapter saves {outside[:3]} (modules_to_save) but this LoRA2Model does not train "
                         "those modules; add them to LoRA2Config.modules_to_save.")
    wanted = {n: t for n, t in base.state_dict().items() if n in saved}
    for n, t in saved.items():
        if n not in wanted or tuple(wanted[n].shape) != tuple(t.shape):
            raise ValueError(f"modules_to_save tensor {n} {tuple(t.shape)} does not fit this base model.")

    alpha0, r0 = cfg.get("lora_alpha", 8), cfg.get("r", 8)
    plan = []
    for name, ab in pairs.items():
        if set(ab) != {"lora_A", "lora_B"}:
            raise ValueError(f"The PEFT adapter has only {sorted(ab)} for {name}; it is corrupted.")
        a, b = ab["lora_A"], ab["lora_B"]
        layer = model.lora2_layers[name]
        m = a.shape[0]
        if tuple(a.shape) != (m, layer.d_in) or tuple(b.shape) != (layer.d_out, m):
            raise ValueError(f"{name}: PEFT lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not fit a "
                             f"{layer.d_out}×{layer.d_in} layer.")
        if m > layer.k or m > layer.r:
            raise ValueError(f"{name}: the PEFT LoRA has rank {m}, but a LoRA² matrix with k={layer.k}, r={layer.r} "
                             f"holds rank ≤ min(k, r); use k ≥ {m} and r ≥ {m}.")
        alpha = _pattern_value(cfg.get("alpha_pattern") or {}, name, alpha0)
        r_cfg = _pattern_value(cfg.get("rank_pattern") or {}, name, r0)
        if r_cfg != m:
            raise ValueError(f"{name}: adapter_config.json says rank {r_cfg} but the weights have rank {m}; corrupted.")
        scaling = alpha / math.sqrt(m) if cfg.get("use_rslora") else alpha / m
        plan.append((layer, a, b, m, scaling))

    with torch.no_grad():
        for layer, a, b, m, scaling in plan:
            dtype, device = layer.p_outer.dtype, layer.p_outer.device
            eye = torch.eye(layer.k, m, dtype=dtype, device=device)
            layer.p_outer[:, :m] = a.T.to(device=device, dtype=dtype)
            layer.q_outer[:m] = (b.double().T * scaling).to(device=device, dtype=dtype)
            layer.q_outer[m:] = 0
            layer.p_inner[:, :m] = eye
            layer.q_inner[:m] = eye.T
            layer.lam.zero_()
            layer.lam[:m] = 1.0 / layer.scaling
        for n, t in saved.items():
            wanted[n].copy_(t.to(device=wanted[n].device, dtype=wanted[n].dtype))
    return list(pairs)
