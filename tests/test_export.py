"""Export to PEFT LoRA (method.md §6) and import from it: PEFT loads the export and gives the LoRA² logits.

Masks carry pruned singular values and some matrices are fully pruned, so `exact_rank` has
something to do: ranks below k, and matrices dropped altogether.
"""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForSequenceClassification, GPT2Config, GPT2ForSequenceClassification

from lora2 import LoRA2Config, LoRA2Model, get_lora2_model
from lora2.export import PEFT_CONFIG_NAME, PEFT_WEIGHTS_NAME, export_to_peft, init_from_peft_lora
from lora2.persistence import WEIGHTS_NAME

from .conftest import BERT_TARGETS, LLAMA_TARGETS, randomize_adapters, tiny_bert, tiny_gpt2, tiny_llama

K, R = 4, 6
GPT2_TARGETS = ["c_attn", "c_proj", "c_fc"]


def tiny_gpt2_classifier(seed: int = 0) -> GPT2ForSequenceClassification:
    """Conv1D blocks plus an nn.Linear head (``score``): a model mixing both layer kinds."""
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=128, n_embd=48, n_layer=2, n_head=4, n_positions=64, num_labels=3, pad_token_id=0)
    return GPT2ForSequenceClassification(cfg).eval()


ARCHS = {
    "gpt2": (tiny_gpt2, GPT2_TARGETS, None),
    "llama": (tiny_llama, LLAMA_TARGETS, None),
    "bert": (tiny_bert, BERT_TARGETS, ["classifier"]),
    "gpt2-mixed": (tiny_gpt2_classifier, ["c_attn", "c_fc", "score"], None),
}


def batch() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(1, 120, (2, 11), generator=gen)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def prune(model: LoRA2Model) -> list[int]:
    """Active singular values per matrix cycle through 0, 1, 2, K, R: ranks 0, 1, 2, K, K."""
    counts = [[0, 1, 2, K, R][i % 5] for i in range(len(model.lora2_layers))]
    masks = torch.zeros(len(counts), R)
    for row, c in zip(masks, counts, strict=True):
        row[torch.randperm(R, generator=torch.Generator().manual_seed(len(counts) + c))[:c]] = 1
    with torch.no_grad():
        model.allocator.set_masks(masks)
    return counts


def trained_lora2(arch: str, seed: int = 0) -> LoRA2Model:
    make, targets, save = ARCHS[arch]
    model = get_lora2_model(make(seed=seed), LoRA2Config(k=K, r=R, alpha=12, target_rank=2, target_modules=targets,
                                                         modules_to_save=save))
    randomize_adapters(model, std=0.3)
    prune(model)
    if save:
        with torch.no_grad():
            model.base_model.get_submodule(save[0]).weight.add_(0.5)  # a head the fresh base does not have
    return model.eval()


def load_peft(make, directory, seed: int = 0) -> PeftModel:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's fan_in_fan_out notice on mixed models, deprecations
        return PeftModel.from_pretrained(make(seed=seed), directory).eval()


def lora_shapes(peft_model: PeftModel) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
    prefix = "base_model.model."
    return {name[len(prefix):]: (tuple(m.lora_A["default"].weight.shape), tuple(m.lora_B["default"].weight.shape))
            for name, m in peft_model.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}


def true_rank(layer) -> int:
    return int(torch.linalg.matrix_rank(layer.get_delta_weight().double(), rtol=1e-6))


# -- export: PEFT reproduces the LoRA² model ---------------------------------------------------
@pytest.mark.parametrize("exact_rank", [False, True])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_peft_loads_the_export_with_the_same_logits(arch, exact_rank, tmp_path):
    model = trained_lora2(arch)
    model.save_pretrained(tmp_path / "lora2")
    export_to_peft(tmp_path / "lora2", tmp_path / "peft", exact_rank=exact_rank)
    peft_model = load_peft(ARCHS[arch][0], tmp_path / "peft")  # a fresh base: its BERT head differs
    torch.testing.assert_close(peft_model(**batch()).logits, model(**batch()).logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_merged_weights_match_peft_merge(arch, tmp_path):
    model = trained_lora2(arch)
    export_to_peft(model, tmp_path)
    peft_merged = load_peft(ARCHS[arch][0], tmp_path).merge_and_unload().state_dict()
    lora2_merged = model.merge_and_unload().state_dict()
    assert set(peft_merged) == set(lora2_merged)
    for key, value in lora2_merged.items():
        torch.testing.assert_close(peft_merged[key], value, rtol=0, atol=1e-6, msg=key)


def test_minilm_with_its_classifier(minilm_path, tmp_path):
    def make(seed: int = 0):
        torch.manual_seed(seed)
        return AutoModelForSequenceClassification.from_pretrained(minilm_path, num_labels=2).eval()

    model = get_lora2_model(make(0), LoRA2Config(k=K, r=R, alpha=16, target_modules=BERT_TARGETS,
                                                 modules_to_save=["classifier"]))
    randomize_adapters(model, std=0.05)
    counts = prune(model)
    model.eval().save_pretrained(tmp_path / "lora2")
    for exact in (False, True):
        out = tmp_path / f"peft-{exact}"
        export_to_peft(tmp_path / "lora2", out, exact_rank=exact)
        peft_model = load_peft(make, out, seed=7)
        assert not torch.equal(peft_model.base_model.model.classifier.original_module.weight,
                               model.base_model.classifier.weight)  # the head comes from the export
        torch.testing.assert_close(peft_model(**batch()).logits, model(**batch()).logits, rtol=0, atol=1e-5)
    cfg = json.loads((tmp_path / "peft-True" / PEFT_CONFIG_NAME).read_text())
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "SEQ_CLS" and cfg["modules_to_save"] == ["classifier"]
    assert cfg["base_model_name_or_path"] == minilm_path and cfg["use_rslora"] is False
    assert len(cfg["target_modules"]) == sum(c > 0 for c in counts) == 36 - counts.count(0)


def test_rank_k_export_is_spec_6(tmp_path):
    """A = p_outerᵀ, B = s·(core·q_outer)ᵀ, lora_alpha = r = k: PEFT scaling 1."""
    model = trained_lora2("llama")
    export_to_peft(model, tmp_path)
    cfg = json.loads((tmp_path / PEFT_CONFIG_NAME).read_text())
    assert (cfg["r"], cfg["lora_alpha"], cfg["rank_pattern"], cfg["bias"]) == (K, K, {}, "none")
    assert cfg["task_type"] == "CAUSAL_LM" and cfg["fan_in_fan_out"] is False
    tensors = load_file(str(tmp_path / PEFT_WEIGHTS_NAME))
    name, layer = next(iter(model.lora2_layers.items()))
    torch.testing.assert_close(tensors[f"base_model.model.{name}.lora_A.weight"], layer.p_outer.detach().T)
    torch.testing.assert_close(tensors[f"base_model.model.{name}.lora_B.weight"],
                               (layer.core() @ layer.q_outer).detach().T)
    assert len(tensors) == 2 * len(model.lora2_layers)  # a fully pruned matrix is kept at rank k (B = 0)


def test_exact_rank_writes_each_matrix_at_its_rank_and_drops_rank_zero(tmp_path):
    model = trained_lora2("llama")
    counts = prune(model)
    info = export_to_peft(model, tmp_path, exact_rank=True)
    expected = {n: min(K, c) for n, c in zip(model.lora2_layers, counts, strict=True)}
    assert {n: true_rank(la) for n, la in model.lora2_layers.items()} == expected  # ranks 0, 1, 2, 4 all occur
    assert info.ranks == {n: e for n, e in expected.items() if e > 0}
    assert info.dropped == [n for n, e in expected.items() if e == 0] != []
    cfg = json.loads((tmp_path / PEFT_CONFIG_NAME).read_text())
    assert cfg["rank_pattern"] == cfg["alpha_pattern"] == info.ranks and cfg["r"] == cfg["lora_alpha"] == K
    assert sorted(cfg["target_modules"]) == sorted(info.ranks)
    shapes = lora_shapes(load_peft(tiny_llama, tmp_path))
    assert {n: a[0] for n, (a, _) in shapes.items()} == info.ranks  # dropped matrices are not LoRA layers


def test_exact_rank_equals_rank_pattern(tmp_path):
    model = trained_lora2("llama")
    info = export_to_peft(model, tmp_path, exact_rank=True)
    pattern = model.rank_pattern()
    assert info.ranks == {n: v["effective_rank"] for n, v in pattern.items() if v["effective_rank"] > 0}


def test_gpt2_conv1d_export_sets_fan_in_fan_out(tmp_path):
    model = trained_lora2("gpt2")
    export_to_peft(model, tmp_path)
    assert json.loads((tmp_path / PEFT_CONFIG_NAME).read_text())["fan_in_fan_out"] is True
    peft_model = load_peft(tiny_gpt2, tmp_path)
    layer = peft_model.base_model.model.transformer.h[0].attn.c_attn
    assert layer.fan_in_fan_out and layer.is_target_conv_1d_layer
    assert lora_shapes(peft_model)["transformer.h.0.attn.c_attn"] == ((K, 48), (144, K))  # (r, in), (out, r)


def test_export_from_model_and_from_directory_are_identical(tmp_path):
    model = trained_lora2("bert")
    model.save_pretrained(tmp_path / "lora2")
    export_to_peft(model, tmp_path / "a", exact_rank=True)
    export_to_peft(tmp_path / "lora2", tmp_path / "b", exact_rank=True, base_model_name_or_path="org/tiny-bert")
    a, b = load_file(str(tmp_path / "a" / PEFT_WEIGHTS_NAME)), load_file(str(tmp_path / "b" / PEFT_WEIGHTS_NAME))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "b" / PEFT_CONFIG_NAME).read_text())["base_model_name_or_path"] == "org/tiny-bert"
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == [PEFT_CONFIG_NAME, PEFT_WEIGHTS_NAME]


# -- export: errors ---------------------------------------------------------------------------
@pytest.fixture
def saved(tmp_path):
    directory = tmp_path / "lora2"
    trained_lora2("bert").save_pretrained(directory)
    return directory


def test_missing_adapter_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        export_to_peft(tmp_path / "nope", tmp_path / "out")


# LoraConfig's fields in PEFT 0.13.2, the oldest PEFT pyproject allows: an unknown key makes its from_pretrained fail
PEFT_013_LORA_FIELDS = {
    "alpha_pattern", "auto_mapping", "base_model_name_or_path", "bias", "fan_in_fan_out", "inference_mode",
    "init_lora_weights", "layer_replication", "layers_pattern", "layers_to_transform", "loftq_config", "lora_alpha",
    "lora_dropout", "megatron_config", "megatron_core", "modules_to_save", "peft_type", "r", "rank_pattern",
    "revision", "runtime_config", "target_modules", "task_type", "use_dora", "use_rslora"}


def test_the_exported_config_loads_in_the_oldest_supported_peft(tmp_path):
    for exact in (False, True):
        export_to_peft(trained_lora2("bert"), tmp_path / str(exact), exact_rank=exact)
        keys = set(json.loads((tmp_path / str(exact) / PEFT_CONFIG_NAME).read_text()))
        assert keys <= PEFT_013_LORA_FIELDS, keys - PEFT_013_LORA_FIELDS


def test_directory_without_lora2_config_points_at_peft(tmp_path):
    export_to_peft(trained_lora2("bert"), tmp_path / "peft")
    with pytest.raises(FileNotFoundError,
                       match=r"no lora2_config.json.*holds a PEFT adapter \(adapter_config.json\): it needs no export"):
        export_to_peft(tmp_path / "peft", tmp_path / "out")


def test_corrupted_config_and_weights(saved, tmp_path):
    (saved / WEIGHTS_NAME).write_bytes((saved / WEIGHTS_NAME).read_bytes()[:100])
    with pytest.raises(ValueError, match="truncated, corrupted"):
        export_to_peft(saved, tmp_path / "out")
    (saved / "lora2_config.json").write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        export_to_peft(saved, tmp_path / "out")


def test_a_config_of_something_else_or_without_its_module_list_is_refused(saved, tmp_path):
    meta = json.loads((saved / "lora2_config.json").read_text())
    (saved / "lora2_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    with pytest.raises(ValueError, match="is not a LoRA² adapter config"):
        export_to_peft(saved, tmp_path / "out")
    (saved / "lora2_config.json").write_text(json.dumps({k: v for k, v in meta.items() if k != "adapted_modules"}))
    with pytest.raises(ValueError, match="no usable 'adapted_modules'"):
        export_to_peft(saved, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("damage", ["shape", "nan"])
def test_a_factor_of_the_wrong_shape_or_not_finite_is_named(saved, tmp_path, damage):
    tensors = load_file(str(saved / WEIGHTS_NAME))
    key = "bert.encoder.layer.0.attention.self.query.p_inner"
    tensors[key] = tensors[key][:, :-1].contiguous() if damage == "shape" else tensors[key].fill_(float("nan"))
    save_file(tensors, str(saved / WEIGHTS_NAME))
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        export_to_peft(saved, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_module_names_that_end_one_another_cannot_be_exported(tmp_path):
    """PEFT matches target names as dotted suffixes: 'dense' would also adapt 'block.dense'."""
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.dense, self.block = nn.Linear(8, 8), nn.Module()
            self.block.dense = nn.Linear(8, 8)

        def forward(self, x):
            return self.block.dense(self.dense(x))

    model = get_lora2_model(Two(), LoRA2Config(k=1, r=2, target_modules=["dense"]))
    assert sorted(model.lora2_layers) == ["block.dense", "dense"]
    with pytest.raises(ValueError, match=r"'dense' and 'block\.dense' cannot both be told apart"):
        export_to_peft(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_missing_tensor_is_named(saved, tmp_path):
    tensors = load_file(str(saved / WEIGHTS_NAME))
    del tensors["bert.encoder.layer.0.attention.self.query.q_outer"]
    save_file(tensors, str(saved / WEIGHTS_NAME))
    with pytest.raises(ValueError, match=r"lacks \['bert.encoder.layer.0.attention.self.query.q_outer'\]"):
        export_to_peft(saved, tmp_path / "out")


def test_old_metadata_without_fan_in_fan_out(saved, tmp_path):
    meta = json.loads((saved / "lora2_config.json").read_text())
    del meta["fan_in_fan_out"]
    (saved / "lora2_config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"fan_in_fan_out.*LoRA2Model.from_pretrained"):
        export_to_peft(saved, tmp_path / "out")


def test_output_that_is_a_file_or_the_source(saved, tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        export_to_peft(saved, tmp_path / "file")
    with pytest.raises(ValueError, match="LoRA² adapter directory itself"):
        export_to_peft(saved, saved)


def test_all_pruned_has_nothing_to_export_at_exact_rank(tmp_path):
    model = trained_lora2("llama")
    with torch.no_grad():
        model.allocator.set_masks(torch.zeros(len(model.lora2_layers), R))
    with pytest.raises(ValueError, match=r"rank 0.*without exact_rank"):
        export_to_peft(model, tmp_path, exact_rank=True)
    assert export_to_peft(model, tmp_path).ranks == dict.fromkeys(model.lora2_layers, K)


def test_unloaded_model_and_wrong_type(tmp_path):
    model = trained_lora2("llama")
    model.merge_and_unload()
    with pytest.raises(ValueError, match="unloaded"):
        export_to_peft(model, tmp_path)
    with pytest.raises(TypeError, match="LoRA2Model or an adapter directory"):
        export_to_peft(tiny_llama(), tmp_path)


# -- import: a LoRA² model that starts as a PEFT LoRA -------------------------------------------
def peft_lora(make, targets, tmp_path, save=None, **kwargs) -> PeftModel:
    cfg = LoraConfig(r=3, lora_alpha=7, target_modules=targets, modules_to_save=save, **kwargs)
    peft_model = get_peft_model(make(seed=0), cfg)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    peft_model.save_pretrained(tmp_path)
    return peft_model.eval()


@pytest.mark.parametrize("rslora", [False, True])
def test_init_from_peft_lora_reproduces_its_logits(rslora, tmp_path):
    pattern = {"model.layers.0.self_attn.q_proj": 1}
    peft_model = peft_lora(tiny_llama, ["q_proj", "v_proj", "down_proj"], tmp_path, use_rslora=rslora,
                           rank_pattern=pattern, alpha_pattern={"model.layers.1.mlp.down_proj": 2})
    model = get_lora2_model(tiny_llama(seed=0), LoRA2Config(k=K, r=R, alpha=12, target_modules=LLAMA_TARGETS))
    names = init_from_peft_lora(model, tmp_path)
    assert len(names) == 6
    torch.testing.assert_close(model(**batch()).logits, peft_model(**batch()).logits, rtol=0, atol=1e-5)
    assert model.lora2_layers["model.layers.0.self_attn.q_proj"].effective_rank() == 1


def test_init_from_peft_lora_copies_the_classifier(tmp_path):
    peft_model = peft_lora(tiny_bert, ["query", "value"], tmp_path, save=["classifier"])
    model = get_lora2_model(tiny_bert(seed=0), LoRA2Config(k=K, r=R, target_modules=BERT_TARGETS,
                                                           modules_to_save=["classifier"]))
    with torch.no_grad():
        model.base_model.classifier.weight.add_(1.0)  # the import must overwrite it
    init_from_peft_lora(model, tmp_path)
    torch.testing.assert_close(model(**batch()).logits, peft_model(**batch()).logits, rtol=0, atol=1e-5)


def test_export_then_import_is_the_identity(tmp_path):
    model = trained_lora2("gpt2")
    export_to_peft(model, tmp_path)
    fresh = get_lora2_model(tiny_gpt2(seed=0), LoRA2Config(k=K, r=R, alpha=12, target_modules=GPT2_TARGETS))
    init_from_peft_lora(fresh, tmp_path)
    torch.testing.assert_close(fresh(**batch()).logits, model(**batch()).logits, rtol=0, atol=1e-5)


def test_imported_model_can_still_learn_every_singular_value(tmp_path):
    peft_lora(tiny_llama, ["q_proj"], tmp_path)
    model = get_lora2_model(tiny_llama(seed=0), LoRA2Config(k=K, r=R, target_modules=["q_proj"]))
    init_from_peft_lora(model, tmp_path)
    model.train()  # γ·R joins the loss in training mode only
    model(**batch(), labels=batch()["input_ids"]).loss.backward()
    for layer in model.lora2_layers.values():
        assert bool((layer.lam.grad[3:] != 0).all())  # the r − m values not used by the import
        assert bool((layer.q_outer.grad[3:] != 0).any())  # the k − m zero rows of q_outer


def test_import_errors(tmp_path):
    peft_lora(tiny_llama, ["q_proj", "k_proj"], tmp_path)
    small = get_lora2_model(tiny_llama(seed=0), LoRA2Config(k=2, r=R, target_modules=["q_proj", "k_proj"]))
    with pytest.raises(ValueError, match=r"rank 3.*use k ≥ 3"):
        init_from_peft_lora(small, tmp_path)
    narrow = get_lora2_model(tiny_llama(seed=0), LoRA2Config(k=K, r=R, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match=r"does not adapt; add them to LoRA2Config\.target_modules"):
        init_from_peft_lora(narrow, tmp_path)
    pruned = get_lora2_model(tiny_llama(seed=0), LoRA2Config(k=K, r=R, target_modules=["q_proj", "k_proj"]))
    prune(pruned)
    with pytest.raises(RuntimeError, match="already pruned"):
        init_from_peft_lora(pruned, tmp_path)
    cfg = json.loads((tmp_path / PEFT_CONFIG_NAME).read_text())
    (tmp_path / PEFT_CONFIG_NAME).write_text(json.dumps({**cfg, "use_dora": True}))
    with pytest.raises(ValueError, match="use_dora"):
        init_from_peft_lora(copy.deepcopy(narrow), tmp_path)
    for variant, said in (({"init_lora_weights": "pissa_niter_4"}, "replaces the base weight"),
                          ({"init_lora_weights": "olora"}, "replaces the base weight"),
                          ({"alora_invocation_tokens": [5, 6]}, "activated LoRA"),
                          ({"use_bdlora": {"lora_a_is_blockdiagonal": True}}, "BD-LoRA"),
                          ({"kasa_config": {"use_kasa": True}}, "KaSA"),
                          ({"layer_replication": [[0, 2], [1, 2]]}, "duplicated layers"),
                          ({"trainable_token_indices": [3, 4]}, "not a LoRA")):
        (tmp_path / PEFT_CONFIG_NAME).write_text(json.dumps({**cfg, **variant}))
        with pytest.raises(ValueError, match=said):
            init_from_peft_lora(copy.deepcopy(narrow), tmp_path)


def test_a_head_tied_to_the_embeddings_is_never_merged_exported_or_imported_untied(tmp_path):
    """GPT-2's lm_head shares the input embeddings: merging into it, exporting it as a PEFT modules_to_save copy,
    or importing a PEFT copy into it would each change the embeddings as well."""
    head = get_lora2_model(tiny_gpt2(), LoRA2Config(k=K, r=R, target_modules=["c_attn", "lm_head"]))
    randomize_adapters(head)
    embeddings = head.base_model.transformer.wte.weight.detach().clone()
    for merge in (head.merge, head.merge_and_unload):
        with pytest.raises(RuntimeError, match=r"lm_head\.weight is tied to transformer\.wte\.weight"):
            merge()
    assert torch.equal(head.base_model.transformer.wte.weight, embeddings)
    # the unmerged adapter exports as usual, from the model and from its directory, with a word about PEFT's merge
    head.save_pretrained(tmp_path / "lora2")
    for source in (head, tmp_path / "lora2"):
        with pytest.warns(UserWarning, match=r"lm_head of .* tied to transformer\.wte\.weight .*merge_and_unload"):
            export_to_peft(source, tmp_path / "unmerged")

    saved = get_lora2_model(tiny_gpt2(), LoRA2Config(k=K, r=R, target_modules=["c_attn"], modules_to_save=["lm_head"]))
    with pytest.raises(ValueError, match=r"lm_head\.weight \(modules_to_save\) is tied to transformer\.wte\.weight.*"
                                         r"Add 'transformer\.wte' to modules_to_save"):
        export_to_peft(saved, tmp_path / "a")
    saved.save_pretrained(tmp_path / "adapter")  # LoRA² itself reloads it fine; the export from disk refuses too
    with pytest.raises(ValueError, match=r"tied to transformer\.wte\.weight"):
        export_to_peft(tmp_path / "adapter", tmp_path / "b")
    both = get_lora2_model(tiny_gpt2(), LoRA2Config(k=K, r=R, target_modules=["c_attn"],
                                                    modules_to_save=["lm_head", "wte"]))
    export_to_peft(both, tmp_path / "c")

    peft_lora(tiny_gpt2, ["c_attn"], tmp_path / "peft", save=["lm_head"])
    model = get_lora2_model(tiny_gpt2(), LoRA2Config(k=K, r=R, target_modules=["c_attn"], modules_to_save=["lm_head"]))
    embeddings = model.base_model.transformer.wte.weight.detach().clone()
    with pytest.raises(ValueError, match=r"lm_head\.weight is tied to transformer\.wte\.weight"):
        init_from_peft_lora(model, tmp_path / "peft")
    assert torch.equal(model.base_model.transformer.wte.weight, embeddings)


def test_lora2_export_command(tmp_path, capsys):
    from lora2.cli import main

    model = trained_lora2("llama")
    model.save_pretrained(tmp_path / "adapter")
    assert main(["export", "--adapter", str(tmp_path / "adapter"), "--out", str(tmp_path / "peft"), "--exact-rank"]) == 0
    out = capsys.readouterr().out
    assert "PEFT LoRA adapter written to" in out and "exact ranks" in out
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    expected = {n: v["effective_rank"] for n, v in model.rank_pattern().items() if v["effective_rank"] > 0}
    assert config["rank_pattern"] == expected
    assert main(["export", "--adapter", str(tmp_path / "missing"), "--out", str(tmp_path / "x")]) == 2
    assert "does not exist" in capsys.readouterr().err


# -- scaling_rule: layers, saved adapters and exports all use the config's s --------------------------
@pytest.mark.parametrize(("rule", "s"), [("alpha/r", 12 / R), ("alpha/k", 12 / K), ("alpha/sqrt(r)", 12 / R**0.5)])
def test_scaling_rule_reaches_layers_saved_adapters_and_the_export(rule, s, tmp_path):
    model = get_lora2_model(tiny_llama(), LoRA2Config(k=K, r=R, alpha=12, target_modules=LLAMA_TARGETS,
                                                      scaling_rule=rule))
    randomize_adapters(model, std=0.3)
    prune(model)
    model.eval()
    assert [layer.scaling for layer in model.lora2_layers.values()] == pytest.approx([s] * len(model.lora2_layers))
    layer = next(iter(model.lora2_layers.values()))
    p = layer.p_outer @ layer.p_inner
    q = layer.q_inner @ layer.q_outer
    dense = s * (p @ torch.diag(layer.lam * layer.mask) @ q)  # s · P Λ Q, paper layout
    torch.testing.assert_close(layer.get_delta_weight(), dense.T, rtol=1e-5, atol=1e-6)
    model.save_pretrained(tmp_path / "lora2")
    loaded = LoRA2Model.from_pretrained(tiny_llama(), tmp_path / "lora2")
    assert loaded.lora2_config.scaling_rule == rule
    assert [la.scaling for la in loaded.lora2_layers.values()] == pytest.approx([s] * len(model.lora2_layers))
    torch.testing.assert_close(loaded(**batch()).logits, model(**batch()).logits, rtol=0, atol=0)
    export_to_peft(tmp_path / "lora2", tmp_path / "peft", exact_rank=True)
    torch.testing.assert_close(load_peft(tiny_llama, tmp_path / "peft")(**batch()).logits, model(**batch()).logits,
                               rtol=0, atol=1e-5)
    fresh = get_lora2_model(tiny_llama(), LoRA2Config(k=K, r=R, alpha=12, target_modules=LLAMA_TARGETS,
                                                      scaling_rule=rule))
    init_from_peft_lora(fresh, tmp_path / "peft")  # the import sets lam = 1/s with this layer's s
    torch.testing.assert_close(fresh(**batch()).logits, model(**batch()).logits, rtol=0, atol=1e-5)


def test_a_block_registered_twice_is_not_a_tie_but_a_second_module_on_the_weight_is():
    """Weight-shared depth (one block at two positions) reaches the same LoRA² layer by two paths: merging is exact.
    Another module holding the adapted layer's weight is a tie: merging would change its output too."""
    from torch import nn

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(6, 6)

        def forward(self, x):
            return torch.relu(self.lin(x))

    block = Block()
    model = get_lora2_model(nn.Sequential(block, block), LoRA2Config(k=2, r=4, target_modules=["lin"],
                                                                     modules_to_save=[]))
    randomize_adapters(model)
    model.eval()
    x = torch.randn(3, 6)
    with torch.no_grad():
        expected = model(x)
        model.merge()
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-6)

    linear, other = nn.Linear(6, 6), nn.Linear(6, 6)
    other.weight = linear.weight  # e.g. an output projection tied to an input one
    bare = get_lora2_model(nn.Sequential(linear, nn.ReLU(), other), LoRA2Config(k=2, r=4, target_modules=["0"],
                                                                                modules_to_save=[]))
    with pytest.raises(RuntimeError, match=r"0\.weight is tied to 2\.weight"):
        bare.merge()


def test_cli_errors_name_the_cause(tmp_path, capsys, monkeypatch):
    from lora2.cli import main

    model = trained_lora2("llama")
    model.save_pretrained(tmp_path / "adapter")
    assert main(["export", "--adapter", str(tmp_path / "adapter"), "--out", ""]) == 2
    assert "output directory is empty" in capsys.readouterr().err
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["export", "--adapter", str(tmp_path / "adapter"), "--out", str(blocker / "sub")]) == 2
    assert "lora2 export: error:" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["glue", "--task", "rte", "--device", "cuda", "--max-steps", "1",
                     "--output-dir", str(tmp_path / "run")]) == 2
        assert "sees no CUDA device; use --device cpu" in capsys.readouterr().err
    monkeypatch.setenv("LORA2_GLUE_DIR", str(tmp_path / "nowhere"))
    from lora2.glue.data import load_split

    with pytest.raises(FileNotFoundError, match=r"LORA2_GLUE_DIR .*nowhere does not exist"):
        load_split("rte", "train")


def test_an_adapter_loaded_onto_another_model_class_says_so(tmp_path):
    from transformers import BertForTokenClassification

    model = get_lora2_model(tiny_bert(), LoRA2Config(k=K, r=R, target_modules=BERT_TARGETS, modules_to_save=["classifier"]))
    model.save_pretrained(tmp_path)
    torch.manual_seed(0)
    other = BertForTokenClassification(tiny_bert().config)
    with pytest.warns(UserWarning, match=r"trained on a BertForSequenceClassification; it is loaded onto a "
                                         r"BertForTokenClassification"):
        LoRA2Model.from_pretrained(other, tmp_path)


def test_a_module_peft_catches_by_plain_suffix_is_written_with_its_weights(tmp_path):
    """PEFT matches modules_to_save names as plain suffixes: 'classifier' also catches DistilBERT's frozen
    'pre_classifier', and PeftModel.from_pretrained then failed with KeyError on its weights. An export from the
    live model writes them as they are."""
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    def base():
        torch.manual_seed(0)
        return DistilBertForSequenceClassification(DistilBertConfig(vocab_size=50, dim=16, n_layers=1, n_heads=2,
                                                                    hidden_dim=32)).eval()

    model = get_lora2_model(base(), LoRA2Config(k=2, r=4, target_rank=4, target_modules=["q_lin", "v_lin"],
                                                modules_to_save=["classifier"]))
    with torch.no_grad():
        for layer in model.lora2_layers.values():
            layer.lam.fill_(0.3)
        model.base_model.classifier.weight.add_(0.2)
    model.eval()
    export_to_peft(model, tmp_path)
    assert "base_model.model.pre_classifier.weight" in load_file(tmp_path / "adapter_model.safetensors")
    ids = torch.randint(0, 50, (2, 6))
    peft_model = PeftModel.from_pretrained(base(), tmp_path).eval()
    torch.testing.assert_close(peft_model(input_ids=ids).logits, model(input_ids=ids).logits, rtol=1e-5, atol=1e-6)
