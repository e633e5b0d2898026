"""Model families beyond BERT: layers whose owners read ``.weight`` (T5's ``wo``, torch's MultiheadAttention),
task heads with other names (BART, XLNet), and a PEFT export PEFT could not load (DistilBERT)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from transformers import (
    BartConfig,
    BartForSequenceClassification,
    DistilBertConfig,
    DistilBertForSequenceClassification,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
)

import lora2
from lora2 import LoRA2Config, get_lora2_model


def test_t5_feed_forward_output_is_adapted_and_runs():
    """T5 casts to ``self.wo.weight.dtype``: the layer shows its base layer's weight and bias."""
    torch.manual_seed(0)
    t5 = T5ForConditionalGeneration(T5Config(vocab_size=50, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2,
                                             decoder_start_token_id=0, pad_token_id=0)).eval()
    ids = torch.tensor([[1, 2, 3]])
    expected = t5(input_ids=ids, labels=ids).loss
    model = get_lora2_model(t5, LoRA2Config(target_modules=["q", "v", "wi", "wo"], modules_to_save=[]))
    wo = model.lora2_layers["encoder.block.0.layer.1.DenseReluDense.wo"]
    assert wo.weight is wo.base_layer.weight and wo.bias is None
    torch.testing.assert_close(model(input_ids=ids, labels=ids).loss, expected)  # Δ = 0 at init (λ = 0)


def test_multihead_attention_out_proj_is_left_out_with_a_warning():
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
            self.out_proj = nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out_proj(self.attn(x, x, x)[0])

    with pytest.warns(UserWarning, match=r"matched \['attn.out_proj'\].*MultiheadAttention.*Left out"):
        model = get_lora2_model(Block(), LoRA2Config(target_modules=["out_proj"], modules_to_save=[]))
    assert list(model.lora2_layers) == ["out_proj"]


def test_fused_expert_weights_under_a_target_name_are_named_in_a_warning():
    """Qwen2-MoE keeps its routed experts as 3-D parameters ``experts.gate_up_proj`` / ``experts.down_proj``:
    ``down_proj`` adapts the shared expert's Linear only, and the user is told which weights stay frozen."""
    torch.manual_seed(0)
    moe = Qwen2MoeForCausalLM(Qwen2MoeConfig(
        vocab_size=50, hidden_size=16, intermediate_size=32, moe_intermediate_size=8, shared_expert_intermediate_size=32,
        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2))
    with pytest.warns(UserWarning, match=r"names 1 parameter\(s\).*'model.layers.0.mlp.experts.down_proj' "
                                         r"\(a \(4, 16, 8\) tensor of Qwen2MoeExperts\).*stay frozen"):
        model = get_lora2_model(moe, LoRA2Config(target_modules=["q_proj", "down_proj"], modules_to_save=[]))
    assert sorted(model.lora2_layers) == ["model.layers.0.mlp.shared_expert.down_proj",
                                          "model.layers.0.self_attn.q_proj"]
    with warnings.catch_warnings():  # a target that names Linear layers only: no warning
        warnings.simplefilter("error")
        get_lora2_model(Qwen2MoeForCausalLM(moe.config), LoRA2Config(target_modules=["q_proj"], modules_to_save=[]))


def test_heads_with_other_names_warn_when_left_frozen():
    def bart() -> BartForSequenceClassification:
        return BartForSequenceClassification(BartConfig(
            vocab_size=50, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
            decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=32))

    with pytest.warns(UserWarning, match=r"head 'classification_head' stays frozen"):
        get_lora2_model(bart(), LoRA2Config(target_modules=["q_proj", "v_proj"]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        get_lora2_model(bart(), LoRA2Config(target_modules=["q_proj", "v_proj"], modules_to_save=["classification_head"]))


def test_export_refuses_a_modules_to_save_name_peft_would_also_apply_to_an_adapted_layer(tmp_path):
    db = DistilBertForSequenceClassification(DistilBertConfig(vocab_size=50, dim=16, n_layers=1, n_heads=2,
                                                              hidden_dim=32))
    model = get_lora2_model(db, LoRA2Config(target_modules=["q_lin", "pre_classifier"], modules_to_save=["classifier"]))
    with pytest.raises(ValueError, match=r"'classifier' would also catch the adapted 'pre_classifier'"):
        lora2.export_to_peft(model, tmp_path / "peft")
    assert not (tmp_path / "peft").exists()


def test_readme_lists_the_model_types_with_a_default_target_set():
    import re
    from pathlib import Path

    from lora2.config import DEFAULT_TARGET_MODULES

    row = next(line for line in (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8").splitlines()
               if line.startswith("| `target_modules` |"))
    listed = re.search(r'"ALL" set \(([^;]+);', row).group(1).split(", ")
    assert listed == list(DEFAULT_TARGET_MODULES)


def test_a_layer_registered_under_two_parents_is_adapted_at_both(tmp_path):
    """One ``nn.Linear`` object at two paths (a weight-shared projection) gets one LoRA² layer at both paths: the
    paths stay equal, merging into the shared weight reproduces the adapted model, and unloading restores both."""
    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            proj = nn.Linear(8, 8)
            self.a, self.b = nn.Sequential(proj, nn.Tanh()), nn.Sequential(proj, nn.ReLU())

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.a(x) + self.b(x)

    torch.manual_seed(0)
    base = Shared()
    proj = base.a[0]
    model = get_lora2_model(base, LoRA2Config(target_modules=["a.0"], modules_to_save=[], k=2, r=2, init="orthogonal"))
    assert list(model.lora2_layers) == ["a.0"] and base.b[0] is base.a[0] is model.lora2_layers["a.0"]
    with torch.no_grad():
        model.lora2_layers["a.0"].lam.fill_(0.5)
    x = torch.randn(3, 8)
    adapted = model(x)
    assert not torch.allclose(adapted, base.a[1](proj(x)) + base.b[1](proj(x)))  # Δ ≠ 0, and it runs at both paths
    with pytest.raises(ValueError, match=r"a.0 in the LoRA2Model is one layer registered at 2 paths \(a.0, b.0\).*"
                                         r"merge_and_unload"):
        lora2.export_to_peft(model, tmp_path / "peft")
    model.save_pretrained(tmp_path / "adapter")  # the saved adapter says so too
    with pytest.raises(ValueError, match=r"a.0 in the adapter in .* registered at 2 paths \(a.0, b.0\)"):
        lora2.export_to_peft(tmp_path / "adapter", tmp_path / "peft")
    assert not (tmp_path / "peft").exists()
    torch.manual_seed(0)  # the same base weights
    again = lora2.LoRA2Model.from_pretrained(Shared(), tmp_path / "adapter")
    assert again.base_model.a[0] is again.base_model.b[0]
    torch.testing.assert_close(again(x), adapted)
    plain = model.merge_and_unload()
    assert plain.a[0] is plain.b[0] is proj
    torch.testing.assert_close(plain(x), adapted)
