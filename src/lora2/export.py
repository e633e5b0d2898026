"""LoRA² → PEFT LoRA: serve a LoRA² adapter with any LoRA runtime (method.md §6).

A PEFT LoRA adds ``B A`` to the PyTorch-layout weight (``A``: rank×d_in, ``B``: d_out×rank, the
same for GPT-2's Conv1D, whose PEFT layer sets ``fan_in_fan_out``). Each matrix's (A, B) comes
from ``LoRA2Factors.as_lora`` with PEFT scaling 1:

- **rank k** (default): ``A = p_outerᵀ``, ``B = s · (core · q_outer)ᵀ`` (``lora_alpha = r``);
- **exact rank** (``exact_rank=True``): each matrix at its true rank (≤ min(k, active λ)) with
  PEFT's ``rank_pattern``/``alpha_pattern``; matrices whose rank is 0 are left out.

No d_in×d_out matrix is formed, and reading a saved adapter needs no base-model weights.
``init_from_peft_lora`` (in ``peft_import``, re-exported here) goes the other way.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .adapter_source import LoRA2Source, read_lora2_adapter, source_from_model
from .factors import LoRA2Factors
from .peft_import import init_from_peft_lora
from .persistence import PEFT_CONFIG_NAME, PEFT_PREFIX, PEFT_WEIGHTS_NAME, write_json, write_tensors
from .targets import TASK_HEADS, task_type

__all__ = ["PEFT_CONFIG_NAME", "PEFT_WEIGHTS_NAME", "PeftExport", "export_to_peft", "init_from_peft_lora", "lora_factors",
           "read_lora2_adapter"]

def lora_factors(f: LoRA2Factors | Mapping[str, torch.Tensor], scaling: float | None = None,
                 exact_rank: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of a PEFT LoRA with scaling 1 and ``B @ A`` = the PyTorch-layout update s·Δᵀ: ``LoRA2Factors.as_lora``.

    ``f``: a ``LoRA2Factors`` (its own scaling unless ``scaling`` is given), or tensors keyed by
    ``FACTOR_NAMES`` with ``scaling``.
    """
    if not isinstance(f, LoRA2Factors):
        if scaling is None:
            raise TypeError("lora_factors needs the scaling s when given a mapping of tensors.")
        f = LoRA2Factors.from_tensors(f, scaling)
    elif scaling is not None:
        f = dataclasses.replace(f, scaling=float(scaling))
    return f.as_lora(exact_rank=exact_rank)


def _task_type(class_name: str | None, adapted: list[str], modules_to_save: list[str]) -> str | None:
    """PEFT's task_type for the base class, or None where PEFT's wrapper would not load the file.

    For SEQ_CLS/TOKEN_CLS (QUESTION_ANS) PEFT adds the head ``classifier``/``score`` (``qa_outputs``)
    to modules_to_save and then requires its weights in the file: so the task type is written only
    when the adapter saves that head in full. Without it ``PeftModel`` (task_type None) loads the
    same weights and runs the same forward.
    """
    task = task_type(class_name)
    heads = TASK_HEADS.get(task or "")
    if heads is None:
        return task
    last = {n.rsplit(".", 1)[-1] for n in modules_to_save}
    if last & heads and not {n.rsplit(".", 1)[-1] for n in adapted} & heads:
        return task
    return None


def _check_saved_suffixes(adapted: list[str], modules_to_save: list[str]) -> None:
    """PEFT applies a modules_to_save entry to every module whose name ends with it, without a dot boundary:
    'classifier' also catches DistilBERT's 'pre_classifier', and PEFT refuses to load a file where that one
    is a LoRA layer."""
    for saved in modules_to_save:
        caught = [n for n in adapted if n != saved and n.endswith(saved)]
        if caught:
            raise ValueError(
                f"modules_to_save entry {saved!r} would also catch the adapted {caught[0]!r} in PEFT, which matches "
                "modules_to_save names as plain suffixes and cannot then load this export. Train without adapting "
                f"{caught[0]!r} (leave it out of target_modules) to export this model to PEFT.")


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
    src: LoRA2Source
    if isinstance(adapter, (str, Path)):
        source_dir = Path(adapter)
        src = read_lora2_adapter(source_dir)
    elif hasattr(adapter, "lora2_layers") and hasattr(adapter, "lora2_config"):
        src = source_from_model(adapter)
    else:
        raise TypeError(f"export_to_peft takes a LoRA2Model or an adapter directory, not {type(adapter).__name__}.")
    src.check()
    src.refuse_shared_paths()
    if src.tied:
        name, other = next(iter(src.tied.items()))
        warnings.warn(
            f"{name} of {src.where} adapts a weight tied to {other} ({len(src.tied)} such matrices). PEFT serves the "
            "exported adapter correctly unmerged, but PEFT's merge_and_unload() would add the update to the shared "
            f"weight and so change {other} too. Serve it unmerged, or untie the weight before training.",
            UserWarning, stacklevel=2,
        )
    if not str(out_dir).strip():
        raise ValueError("The output directory is empty (''); name the directory to write the PEFT adapter to.")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"Output {out} is a file; export_to_peft writes a directory. Choose a new or existing directory.")
    if source_dir is not None and out.exists() and out.resolve() == source_dir.resolve():
        raise ValueError(f"Output {out} is the LoRA² adapter directory itself; write the PEFT adapter to another one.")
    _check_unambiguous(list(src.factors) + src.modules_to_save)
    _check_saved_suffixes(list(src.factors), src.modules_to_save)

    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    dropped: list[str] = []
    for name, f in src.factors.items():
        a, b = f.as_lora(exact_rank=exact_rank)
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
        # (no "lora_bias"/"exclude_modules": their defaults, and fields PEFT 0.13 does not know and refuses)
        "bias": "none",
        "lora_dropout": src.config.dropout,
        "target_modules": kept,
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


