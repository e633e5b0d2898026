"""Data-parallel safety: every rank must hold the same LoRA² masks.

DDP averages gradients, so ranks compute identical importance scores and prune identically. A
rank that saw other gradients (a model not wrapped in DDP, an allocator call inside ``no_sync()``)
would silently train a different adapter; comparing the masks after each step that rebuilt them
catches it at the step it happens, at the cost of one all-gather of an (M, r) tensor per mask step.
"""

from __future__ import annotations

import torch


def is_data_parallel() -> bool:
    """True inside an initialised process group with more than one rank."""
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def check_masks_agree(masks: torch.Tensor, step: int) -> None:
    """All-gather ``masks`` and raise ``RuntimeError`` naming the ranks whose masks differ from ours."""
    dist = torch.distributed
    gathered = [torch.empty_like(masks) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, masks)
    differing = [rank for rank, other in enumerate(gathered) if not torch.equal(other, masks)]
    if differing:
        raise RuntimeError(
            f"LoRA² masks differ between rank {dist.get_rank()} and rank(s) {differing} at step {step}: the ranks "
            "saw different gradients. Wrap the model in DistributedDataParallel before training and call "
            "update_and_allocate on every rank after optimizer.step() (not inside no_sync()). Ranks that train "
            "separate models on purpose set model.mask_sync = False."
        )
