"""method.md §7: trainable parameter counts that must come out exactly (classifier head excluded)."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    AutoModelForSequenceClassification,
    DebertaV2Config,
    DebertaV2ForSequenceClassification,
    RobertaConfig,
    RobertaForSequenceClassification,
)

from lora2 import LoRA2Config, get_lora2_model

from .conftest import BERT_TARGETS

DEBERTA_ALL = ["query_proj", "key_proj", "value_proj", "attention.output.dense", "intermediate.dense", "output.dense"]


def deberta_v3_base_on_meta():
    cfg = DebertaV2Config(
        vocab_size=128100, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
        relative_attention=True, max_relative_positions=-1, position_buckets=256, norm_rel_ebd="layer_norm",
        share_att_key=True, pos_att_type=["p2c", "c2p"], position_biased_input=False, type_vocab_size=0,
        layer_norm_eps=1e-7, num_labels=2,
    )
    with torch.device("meta"):
        return DebertaV2ForSequenceClassification(cfg)


@pytest.mark.parametrize(
    ("targets", "k", "expected"),
    [
        (DEBERTA_ALL, 1, 167_616),
        (["query_proj", "key_proj"], 1, 37_440),
        (["query_proj", "value_proj"], 1, 37_440),
        (["query_proj", "key_proj", "value_proj"], 1, 56_160),
        (DEBERTA_ALL, 8, 1_336_896),
    ],
)
def test_deberta_v3_base_counts(targets, k, expected):
    model = get_lora2_model(deberta_v3_base_on_meta(), LoRA2Config(k=k, r=8, target_modules=targets))
    assert model.num_adapter_parameters() == expected
    trainable, _ = model.get_nb_trainable_parameters()
    assert trainable == expected  # nothing but the adapter is trainable without modules_to_save


def test_roberta_large_count():
    cfg = RobertaConfig(vocab_size=50265, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                        intermediate_size=4096, max_position_embeddings=514, type_vocab_size=1, num_labels=2)
    with torch.device("meta"):
        base = RobertaForSequenceClassification(cfg)
    model = get_lora2_model(base, LoRA2Config(k=1, r=8, target_modules=BERT_TARGETS))
    assert len(model.lora2_layers) == 24 * 6
    assert model.num_adapter_parameters() == 445_824


def test_minilm_count_with_real_weights(minilm_path, capsys):
    base = AutoModelForSequenceClassification.from_pretrained(minilm_path, num_labels=2)
    base_total = sum(p.numel() for p in base.parameters())
    model = get_lora2_model(base, LoRA2Config(k=1, r=8, target_modules=BERT_TARGETS, modules_to_save=["classifier"]))
    assert model.num_adapter_parameters() == 42_336
    head = 384 * 2 + 2
    trainable, total = model.get_nb_trainable_parameters()
    assert trainable == 42_336 + head
    assert total == base_total + 42_336
    model.print_trainable_parameters()
    assert "trainable params: 43,106" in capsys.readouterr().out


def test_default_targets_from_model_type_give_the_all_set():
    model = get_lora2_model(deberta_v3_base_on_meta(), LoRA2Config(k=1, r=8))
    assert model.num_adapter_parameters() == 167_616
    assert model.lora2_config.target_modules == DEBERTA_ALL
