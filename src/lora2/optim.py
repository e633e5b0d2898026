"""Optimizer parameter groups of a LoRA2Model: lam at its own learning rate (``lam_lr_ratio``).

LoRA+ (Hayou et al., 2024) found that the factors of a low-rank product train best at different
rates. In LoRA² the singular values ``lam`` start at zero and are what pruning reads, so they get
their own rate: lr × ``LoRA2Config.lam_lr_ratio``. The groups are plain torch dicts, so any torch
optimizer, custom loops and the 🤗 Trainer (through ``LoRA2Trainer``) share one definition.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from typing import Any

import torch


def param_groups(model: Any, lr: float, weight_decay: float = 0.0, no_decay: Collection[str] = ()) -> list[dict[str, Any]]:
    """Every trainable parameter of ``model`` exactly once; lam at lr × lam_lr_ratio, the rest at lr.

    ``no_decay``: names (as ``model.named_parameters()`` gives them) that get weight_decay 0.
    """
    ratio = model.lora2_config.lam_lr_ratio
    lam = {id(layer.lam) for layer in model.lora2_layers.values()}
    exempt = set(no_decay)
    buckets: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
    for name, param in model.named_parameters():  # named_parameters yields a shared parameter once
        if param.requires_grad:
            buckets.setdefault((id(param) in lam, name in exempt), []).append(param)
    return [{"params": params, "lr": lr * ratio if is_lam else lr, "weight_decay": 0.0 if no_wd else weight_decay}
            for (is_lam, no_wd), params in sorted(buckets.items(), key=lambda item: item[0])]


def check_lam_lr(optimizer: Any, model: Any) -> None:
    """Raise ``ValueError`` when ``optimizer`` does not train lam at lam_lr_ratio × the others' rate
    (e.g. a plain 🤗 Trainer built it from all parameters alike): the option would be silently ignored."""
    ratio = model.lora2_config.lam_lr_ratio
    if ratio == 1 or optimizer is None:
        return
    lam = {id(layer.lam) for layer in model.lora2_layers.values()}

    def base_lr(group: dict[str, Any]) -> float:
        return group.get("initial_lr", group["lr"])  # schedulers record the rate they scale as initial_lr

    groups = optimizer.param_groups
    lam_lrs = {base_lr(g) for g in groups if any(id(p) in lam for p in g["params"])}
    other_lrs = {base_lr(g) for g in groups if any(id(p) not in lam for p in g["params"])}
    if not all(math.isclose(a, b * ratio, rel_tol=1e-6) for a in lam_lrs for b in other_lrs):
        raise ValueError(
            f"LoRA2Config.lam_lr_ratio={ratio} but the optimizer trains lam at {sorted(lam_lrs)} and the other "
            f"parameters at {sorted(other_lrs)}. Use lora2.LoRA2Trainer, or build the optimizer from "
            "model.optimizer_param_groups(lr) (e.g. Trainer(..., optimizers=(torch.optim.AdamW("
            "model.optimizer_param_groups(lr)), None)))."
        )
    model._lam_groups_built = True  # verified: the first update_and_allocate has nothing to warn about
