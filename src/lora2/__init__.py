"""lora2: LoRA² — multi-scale orthogonal low-rank adaptation with importance-driven rank pruning."""

__version__ = "0.1.0"

from .allocator import RankAllocator  # noqa: E402
from .config import LoRA2Config  # noqa: E402
from .layer import LoRA2Layer  # noqa: E402
from .model import LoRA2Model, get_lora2_model  # noqa: E402
from .regularizer import orth_regularization  # noqa: E402
from .trainer import LoRA2Callback, LoRA2Trainer  # noqa: E402

__all__ = [
    "LoRA2Callback",
    "LoRA2Config",
    "LoRA2Layer",
    "LoRA2Model",
    "LoRA2Trainer",
    "RankAllocator",
    "__version__",
    "get_lora2_model",
    "orth_regularization",
]
