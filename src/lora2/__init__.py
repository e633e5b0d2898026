"""lora2: LoRA² — multi-scale orthogonal low-rank adaptation with importance-driven rank pruning."""

__version__ = "0.2.0"

from .allocator import RankAllocator
from .config import LoRA2Config
from .export import PeftExport, export_to_peft, init_from_peft_lora
from .layer import LoRA2Layer
from .model import LoRA2Model, get_lora2_model
from .regularizer import orth_regularization
from .trainer import LoRA2Callback, LoRA2Trainer

__all__ = [
    "LoRA2Callback",
    "LoRA2Config",
    "LoRA2Layer",
    "LoRA2Model",
    "LoRA2Trainer",
    "PeftExport",
    "RankAllocator",
    "__version__",
    "export_to_peft",
    "get_lora2_model",
    "init_from_peft_lora",
    "orth_regularization",
]
