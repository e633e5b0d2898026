"""benchmarks/update_norms.py rebuilds ΔW from saved adapter files: it must equal what the live
adapters apply (LoRA², PEFT LoRA, PEFT AdaLoRA), or its table would misreport how far a run moved."""

from __future__ import annotations

import importlib.util
import sys

import torch
from peft import AdaLoraConfig, LoraConfig, get_peft_model

from lora2 import LoRA2Config, get_lora2_model

from .conftest import BERT_TARGETS, REPO, tiny_bert

_spec = importlib.util.spec_from_file_location("benchmarks_update_norms", REPO / "benchmarks" / "update_norms.py")
norms = importlib.util.module_from_spec(_spec)
sys.modules["benchmarks_update_norms"] = norms
_spec.loader.exec_module(norms)


def _randomise(model, names):
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if any(n.endswith(x) for x in names):
                p.normal_(std=0.3)


def test_lora2_deltas_match_the_layers(tmp_path):
    model = get_lora2_model(tiny_bert(), LoRA2Config(k=2, r=4, alpha=12.0, target_modules=BERT_TARGETS, total_step=100,
                                                      init_warmup=10, final_warmup=10))
    _randomise(model, ["lam", "p_inner", "q_inner", "p_outer", "q_outer"])
    layers = dict(model.lora2_layers)
    next(iter(layers.values())).mask[1] = 0.0  # a pruned value must be left out
    model.save_pretrained(tmp_path)
    deltas = norms.lora2_deltas(tmp_path)
    assert len(deltas) == len(layers) == 12
    for name, layer in layers.items():
        torch.testing.assert_close(deltas[norms._module_key(name)], layer.get_delta_weight().double(),
                                   rtol=1e-5, atol=1e-6)


def test_peft_lora_and_adalora_deltas_match_peft(tmp_path):
    for kind, config in (("lora", LoraConfig(r=2, lora_alpha=8, target_modules=["query", "value"])),
                         ("adalora", AdaLoraConfig(init_r=3, target_r=2, lora_alpha=8, target_modules=["query", "value"],
                                                   total_step=50))):
        model = get_peft_model(tiny_bert(), config)
        _randomise(model, ["lora_A.default", "lora_B.default", "lora_E.default", "lora_A.default.weight",
                           "lora_B.default.weight"])
        model.save_pretrained(tmp_path / kind)
        deltas = norms.peft_deltas(tmp_path / kind)
        modules = {n: m for n, m in model.named_modules() if hasattr(m, "get_delta_weight") and hasattr(m, "lora_A")}
        assert len(deltas) == len(modules) == 4
        for name, module in modules.items():
            torch.testing.assert_close(deltas[norms._module_key(name)], module.get_delta_weight("default").double(),
                                       rtol=1e-5, atol=1e-6)
