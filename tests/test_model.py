"""LoRA2Model: targeting, freezing, pass-through, merge, save/load — on BERT, Llama and GPT-2 (Conv1D)."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers.pytorch_utils import Conv1D

from lora2 import LoRA2Config, LoRA2Layer, LoRA2Model, get_lora2_model, orth_regularization
from lora2.persistence import WEIGHTS_NAME

from .conftest import BERT_TARGETS, LLAMA_TARGETS, randomize_adapters, tiny_bert, tiny_gpt2, tiny_llama

ARCHS = {
    "bert": (tiny_bert, BERT_TARGETS, ["classifier"], 12),
    "llama": (tiny_llama, LLAMA_TARGETS, None, 14),
    "gpt2": (tiny_gpt2, ["c_attn", "c_proj", "c_fc"], None, 8),
}


def inputs_for(arch: str) -> dict[str, torch.Tensor]:
    torch.manual_seed(3)
    ids = torch.randint(0, 120, (2, 11))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def build(arch: str, seed: int = 0, **overrides) -> tuple[nn.Module, LoRA2Model]:
    make, targets, save, _ = ARCHS[arch]
    base = make(seed=seed)
    reference = make(seed=seed)
    fields = {"k": 2, "r": 4, "target_rank": 4, "target_modules": targets, "modules_to_save": save}
    cfg = LoRA2Config(**{**fields, **overrides})
    return reference, get_lora2_model(base, cfg)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_targets_are_replaced_and_everything_else_frozen(arch):
    _, model = build(arch)
    assert len(model.lora2_layers) == ARCHS[arch][3]
    if arch == "gpt2":
        assert all(isinstance(la.base_layer, Conv1D) for la in model.lora2_layers.values())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    adapter = {n for n in trainable if n.rsplit(".", 1)[-1] in {"p_outer", "p_inner", "lam", "q_inner", "q_outer"}}
    assert len(adapter) == 5 * ARCHS[arch][3]
    assert trainable - adapter == ({"base_model.classifier.weight", "base_model.classifier.bias"}
                                   if arch == "bert" else set())


@pytest.mark.parametrize("arch", list(ARCHS))
def test_output_equals_base_at_step_zero(arch):
    reference, model = build(arch)
    batch = inputs_for(arch)
    assert torch.equal(model(**batch).logits, reference(**batch).logits)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_merge_and_unload_is_exact(arch):
    reference, model = build(arch)
    randomize_adapters(model, std=0.2)
    batch = inputs_for(arch)
    unmerged = model(**batch).logits
    assert (unmerged - reference(**batch).logits).abs().max() > 1e-4
    model.merge()
    torch.testing.assert_close(model(**batch).logits, unmerged, rtol=1e-5, atol=1e-5)
    model.unmerge()
    torch.testing.assert_close(model(**batch).logits, unmerged, rtol=1e-5, atol=1e-5)
    plain = model.merge_and_unload()
    assert type(plain) is type(reference)
    assert not any(isinstance(m, LoRA2Layer) for m in plain.modules())
    assert set(plain.state_dict()) == set(reference.state_dict())
    torch.testing.assert_close(plain(**batch).logits, unmerged, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="unloaded"):
        model(**batch)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_save_and_load_round_trip(arch, tmp_path):
    _, model = build(arch)
    randomize_adapters(model)
    with torch.no_grad():
        next(iter(model.lora2_layers.values())).mask[1] = 0
    if arch == "bert":
        with torch.no_grad():
            model.base_model.classifier.weight.add_(1.0)
    model.eval()
    batch = inputs_for(arch)
    expected = model(**batch).logits
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lora2_adapter.safetensors", "lora2_config.json"]
    fresh_base, _ = build(arch)
    loaded = LoRA2Model.from_pretrained(fresh_base, tmp_path)
    torch.testing.assert_close(loaded(**batch).logits, expected, rtol=0, atol=0)
    assert loaded.rank_pattern() == model.rank_pattern()
    assert not any(p.requires_grad for p in loaded.parameters())
    trainable = LoRA2Model.from_pretrained(build(arch)[0], tmp_path, is_trainable=True)
    assert trainable.get_nb_trainable_parameters()[0] == model.get_nb_trainable_parameters()[0]
    meta = json.loads((tmp_path / "lora2_config.json").read_text())
    assert meta["config"]["k"] == 2 and meta["rank_pattern"][next(iter(model.lora2_layers))]["active"] == 3


def test_an_adapter_from_before_a_field_existed_keeps_the_settings_it_trained_with(tmp_path):
    """0.2.0 changed the defaults of init and lam_lr_ratio; an adapter whose config predates those fields trained
    with the Gaussian init and one learning rate, and reloading it to train further must not switch λ to ×16."""
    _, model = build("bert")
    model.save_pretrained(tmp_path)
    meta = json.loads((tmp_path / "lora2_config.json").read_text())
    assert meta["config"]["lam_lr_ratio"] == 16.0  # written explicitly today
    del meta["config"]["lam_lr_ratio"], meta["config"]["init"]
    (tmp_path / "lora2_config.json").write_text(json.dumps(meta))
    old = LoRA2Model.from_pretrained(build("bert")[0], tmp_path, is_trainable=True).lora2_config
    assert (old.lam_lr_ratio, old.init) == (1.0, "gaussian")
    assert LoRA2Config().lam_lr_ratio == 16.0 and LoRA2Config().init == "orthogonal"  # new configs: the defaults


def test_an_adapter_from_a_newer_lora2_names_the_upgrade(tmp_path):
    """A field this lora2 does not have may change the math: refused, naming the saving version and the upgrade
    (from_pretrained and LoRA2Config.from_json_file); the same field in an adapter of this version is corruption."""
    from lora2 import __version__

    _, model = build("bert")
    model.save_pretrained(tmp_path)
    meta = json.loads((tmp_path / "lora2_config.json").read_text())
    meta["config"]["pissa_init"] = True
    meta["version"] = "99.1.0"
    (tmp_path / "lora2_config.json").write_text(json.dumps(meta))
    upgrade = (rf"saved by lora2 99\.1\.0, whose config field\(s\) \['pissa_init'\] the installed lora2 "
               rf"{re.escape(__version__)} does not have; upgrade lora2 \(pip install -U 'lora2>=99\.1\.0'\)")
    with pytest.raises(ValueError, match=upgrade):
        LoRA2Model.from_pretrained(build("bert")[0], tmp_path)
    with pytest.raises(ValueError, match=upgrade):
        LoRA2Config.from_json_file(tmp_path / "lora2_config.json")
    meta["version"] = __version__
    (tmp_path / "lora2_config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"Unknown LoRA2Config field\(s\) \['pissa_init'\]"):
        LoRA2Model.from_pretrained(build("bert")[0], tmp_path)


def test_forward_is_a_bound_method_that_accelerates_mixed_precision_can_unwrap():
    """accelerate's bf16 prepare wraps ``forward.__func__``; ``unwrap_model(keep_fp32_wrapper=False)`` binds the
    innermost function to the model again. A forward without ``self`` then got the model as its first input
    ("got multiple values for argument 'input_ids'")."""
    import inspect

    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    _, model = build("bert")
    randomize_adapters(model, std=0.1)
    model.eval()
    ids = torch.randint(1, 100, (2, 8))
    expected = model(input_ids=ids).logits
    assert list(inspect.signature(model.forward).parameters)[:2] == ["input_ids", "attention_mask"]
    try:
        accelerator = Accelerator(mixed_precision="bf16", cpu=True)
        prepared = accelerator.prepare(model)
        assert prepared(input_ids=ids).logits.dtype == torch.float32
        plain = accelerator.unwrap_model(prepared, keep_fp32_wrapper=False)
        torch.testing.assert_close(plain(input_ids=ids).logits, expected, rtol=0, atol=0)
        torch.testing.assert_close(plain(ids).logits, expected, rtol=0, atol=0)
    finally:
        AcceleratorState._reset_state(True)


def test_generate_passes_through():
    _, model = build("llama")
    randomize_adapters(model, std=0.1)
    ids = torch.randint(0, 128, (1, 5))
    out = model.generate(input_ids=ids, max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 9)
    merged = model.merge_and_unload()
    assert torch.equal(merged.generate(input_ids=ids, max_new_tokens=4, do_sample=False), out)


def test_attribute_access_and_config_pass_through():
    _, model = build("bert")
    assert model.config.model_type == "bert"
    assert model.num_labels == 2
    assert model.lora2_config.k == 2
    assert model.get_base_model() is model.base_model


def test_disable_adapter_gives_the_base_output():
    reference, model = build("bert")
    randomize_adapters(model)
    batch = inputs_for("bert")
    with model.disable_adapter():
        torch.testing.assert_close(model(**batch).logits, reference(**batch).logits, rtol=0, atol=0)
    assert (model(**batch).logits - reference(**batch).logits).abs().max() > 1e-4


def test_disable_adapter_gives_the_loaded_modules_to_save_back():
    """modules_to_save train in place; inside disable_adapter() the model must still be the base as loaded (PEFT
    keeps the original module; a DPO reference model relies on it): the trained head differed by 0.04."""
    reference, model = build("bert")  # modules_to_save=["classifier"]
    assert model.modules_to_save_names == ["classifier"]
    randomize_adapters(model)
    with torch.no_grad():
        model.base_model.classifier.weight.add_(0.5)  # stands in for training the head
    trained = model.base_model.classifier.weight.detach().clone()
    batch = inputs_for("bert")
    with model.disable_adapter():
        torch.testing.assert_close(model(**batch).logits, reference(**batch).logits, rtol=0, atol=0)
        with pytest.raises(RuntimeError, match=r"merge\(\) while the adapter is disabled \(inside disable_adapter"):
            model.merge()
        with pytest.raises(RuntimeError, match=r"merge_and_unload\(\) while the adapter is disabled.*enable_adapter"):
            model.merge_and_unload()
    assert torch.equal(model.base_model.classifier.weight, trained)  # the trained head is back
    model.to(torch.float64)  # the kept originals follow the model
    with model.disable_adapter():
        assert model.base_model.classifier.weight.dtype == torch.float64
        torch.testing.assert_close(model.base_model.classifier.weight,
                                   reference.classifier.weight.to(torch.float64), rtol=0, atol=0)
    model.restore_base()  # the base as loaded, head included
    assert torch.equal(model.base_model.classifier.weight, reference.classifier.weight.to(torch.float64))


def test_while_disabled_saving_reads_and_casting_moves_the_trained_modules_to_save(tmp_path):
    """Between disable_adapter_layers() and enable_adapter_layers() the kept originals sit in the head: a save
    there wrote the pre-training head, and a cast left the trained one behind in the old dtype. Inside the
    block the originals are frozen (no optimizer step moves them)."""
    _, model = build("bert")
    with torch.no_grad():
        model.base_model.classifier.weight.add_(0.5)
    trained = model.base_model.classifier.weight.detach().clone()
    model.disable_adapter_layers()
    assert not model.base_model.classifier.weight.requires_grad
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / WEIGHTS_NAME)
    assert torch.equal(saved["classifier.weight"], trained)
    model.double()
    model.enable_adapter_layers()
    assert model.base_model.classifier.weight.dtype == torch.float64 and model.base_model.classifier.weight.requires_grad
    assert torch.equal(model.base_model.classifier.weight, trained.double())
    model(**inputs_for("bert"))
    # a copy of the model (deepcopy, pickle: the kept copies are found by path, not by object id) runs the base
    import copy
    import pickle

    reference = build("bert")[0].double()
    batch = inputs_for("bert")
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        with clone.disable_adapter():
            torch.testing.assert_close(clone(**batch).logits, reference(**batch).logits, rtol=0, atol=0)
    # a cast while disabled converts the trained head's gradient too; torch's overwrite mode makes new parameters
    model.train()
    model(**batch, labels=torch.tensor([0, 1])).loss.backward()
    model.disable_adapter_layers()
    try:
        torch.__future__.set_overwrite_module_params_on_conversion(True)
        model.float()
    finally:
        torch.__future__.set_overwrite_module_params_on_conversion(False)
    model.enable_adapter_layers()
    head = model.base_model.classifier.weight
    assert head.dtype == head.grad.dtype == torch.float32
    model.eval()
    with model.disable_adapter():
        assert model.base_model.classifier.weight.dtype == torch.float32
        torch.testing.assert_close(model(**batch).logits, reference.float()(**batch).logits, rtol=0, atol=1e-6)


def test_a_backward_inside_disable_adapter_reaches_the_trained_head_and_a_resize_after_wrapping_is_named():
    """The kept copies stand in as modules; the trained ones stay untouched, so the policy's graph built before
    the block backpropagates into them (a .data swap dropped the head's gradient and would have used the
    originals' weights). Resizing the embeddings after wrapping leaves the kept copy at the old size: refused."""
    _, model = build("llama", modules_to_save=["lm_head"])
    randomize_adapters(model)
    model.train()
    ids = torch.randint(0, 128, (2, 6))
    loss = model(input_ids=ids, labels=ids).loss
    with model.disable_adapter():
        with torch.no_grad():
            model(input_ids=ids)
        loss.backward()
    head = model.base_model.lm_head.weight
    assert head.grad is not None and head.requires_grad
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model(input_ids=ids, labels=ids).loss.backward()
    for name, p in model.named_parameters():
        if name in grads:
            torch.testing.assert_close(p.grad, grads[name], rtol=1e-5, atol=1e-7)
    _, resized = build("llama", modules_to_save=["lm_head"])
    resized.resize_token_embeddings(136)
    with pytest.raises(RuntimeError, match=r"lm_head.weight is \(136, 48\) now but \(128, 48\) when the model was "
                                           r"wrapped \(resize_token_embeddings after get_lora2_model\?\)"):
        with resized.disable_adapter():
            pass
    assert not any(layer.disabled for layer in resized.lora2_layers.values())  # refused before anything moved
    _, bert = build("bert", modules_to_save=["classifier", "word_embeddings"])
    bert.resize_token_embeddings(136)  # transformers 5.24 keeps the Parameter object and swaps its data
    with pytest.raises(RuntimeError, match=r"word_embeddings.weight is \(136, 48\) now but \(120, 48\)"):
        bert.disable_adapter_layers()
    assert "LoRA2Model(" in repr(resized)[:20] and resized._get_name() == "LlamaForCausalLM"


def test_disable_adapter_reaches_every_holder_of_a_tied_head_and_keeps_hooks(tmp_path):
    """Parameters, not modules, are exchanged inside the block: BART's lm_head shares one tensor with three
    embedding modules (a module copy missed two: 0.61 off); an adapted partner (GPT-2's lm_head while wte is
    saved) holds it in its base layer (a module copy was refused); the modules and their hooks stay; a load,
    save or export inside the block goes to the trained values; a sparse head gradient passes the allocator."""
    import copy

    from transformers import BartConfig, BartForConditionalGeneration

    torch.manual_seed(0)
    bart = BartForConditionalGeneration(BartConfig(
        vocab_size=96, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48, max_position_embeddings=64)).eval()
    reference = copy.deepcopy(bart)
    with pytest.warns(UserWarning, match="modules_to_save trains lm_head.weight in place"):
        model = get_lora2_model(bart, LoRA2Config(k=2, r=4, target_rank=4, target_modules=["q_proj", "v_proj"],
                                                  modules_to_save=["lm_head"]))
    with torch.no_grad():
        model.base_model.lm_head.weight.add_(0.5)  # trains the embeddings too, through the tie
    calls = []
    model.base_model.lm_head.register_forward_hook(lambda *a: calls.append(1))
    ids = torch.randint(3, 96, (2, 7))
    with model.disable_adapter(), torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids, decoder_input_ids=ids).logits,
                                   reference(input_ids=ids, decoder_input_ids=ids).logits, rtol=0, atol=0)
    assert calls == [1]

    gpt2 = tiny_gpt2()
    plain = copy.deepcopy(gpt2)
    with pytest.warns(UserWarning, match="modules_to_save trains transformer.wte.weight in place"):
        tied = get_lora2_model(gpt2, LoRA2Config(k=2, r=4, target_rank=4, target_modules=["c_attn", "lm_head"],
                                                 modules_to_save=["wte"]))
    randomize_adapters(tied)
    with torch.no_grad():
        tied.base_model.transformer.wte.weight.add_(0.5)
    trained = tied.base_model.transformer.wte.weight.detach().clone()
    ids = torch.randint(0, 128, (2, 6))
    tied.disable_adapter_layers()
    torch.testing.assert_close(tied(input_ids=ids).logits, plain(input_ids=ids).logits, rtol=0, atol=0)
    tied.load_state_dict(tied.state_dict())  # a checkpoint round trip while disabled: into the trained values
    tied.save_pretrained(tmp_path)
    assert torch.equal(load_file(tmp_path / WEIGHTS_NAME)["transformer.wte.weight"], trained)
    torch.testing.assert_close(tied(input_ids=ids).logits, plain(input_ids=ids).logits, rtol=0, atol=0)
    tied.enable_adapter_layers()
    assert torch.equal(tied.base_model.transformer.wte.weight, trained)
    both = get_lora2_model(tiny_gpt2(), LoRA2Config(k=2, r=4, target_rank=4, target_modules=["c_attn"],
                                                    modules_to_save=["wte", "lm_head"]))
    with torch.no_grad():
        both.base_model.lm_head.weight.add_(0.5)
    both.load_state_dict({k: v.clone() for k, v in both.state_dict().items()}, assign=True)  # unties the two
    assert both.base_model.lm_head.weight is not both.base_model.transformer.wte.weight
    with both.disable_adapter():  # each former holder gets the kept copy
        torch.testing.assert_close(both(input_ids=ids).logits, plain(input_ids=ids).logits, rtol=0, atol=0)

    sparse = get_lora2_model(tiny_llama(), LoRA2Config(k=2, r=4, target_rank=2, total_step=20, init_warmup=2,
                                                       final_warmup=2, target_modules=["q_proj"],
                                                       modules_to_save=["embed_tokens"]))
    sparse.base_model.model.embed_tokens.sparse = True
    sparse.train()
    sparse(input_ids=ids, labels=ids).loss.backward()
    assert sparse.base_model.model.embed_tokens.weight.grad.is_sparse
    sparse.update_and_allocate(1)  # crashed: isfinite of a sparse tensor


def test_peft_names_for_disabling_merging_and_unloading():
    reference, model = build("bert")
    randomize_adapters(model)
    with torch.no_grad():
        model.base_model.classifier.weight.add_(0.5)  # a trained head
    batch = inputs_for("bert")
    adapted = model(**batch).logits
    model.disable_adapter_layers()
    torch.testing.assert_close(model(**batch).logits, reference(**batch).logits, rtol=0, atol=0)
    with model.disable_adapter():  # nested: the block leaves the layers disabled as it found them
        pass
    torch.testing.assert_close(model(**batch).logits, reference(**batch).logits, rtol=0, atol=0)
    model.enable_adapter_layers()
    torch.testing.assert_close(model(**batch).logits, adapted, rtol=0, atol=0)
    model.merge_adapter()
    assert all(layer.merged for layer in model.lora2_layers.values())
    torch.testing.assert_close(model(**batch).logits, adapted, rtol=1e-5, atol=1e-5)
    model.unmerge_adapter()
    trained_head = model.base_model.classifier.weight.detach().clone()
    plain = model.unload()
    assert not any(isinstance(m, LoRA2Layer) for m in plain.modules())
    for name in model.lora2_layers:  # no Δ folded in
        torch.testing.assert_close(plain.get_submodule(name).weight, reference.get_submodule(name).weight, rtol=0, atol=1e-6)
    assert torch.equal(plain.classifier.weight, trained_head)  # as PEFT's unload: the trained head stays
    for report in (model.rank_pattern, model.print_trainable_parameters):
        with pytest.raises(RuntimeError, match=r"was unloaded \(merge_and_unload\(\), unload\(\)"):
            report()


def test_transformers_own_adapter_api_is_not_reached_through_the_wrapper():
    """Attribute access falls through to the wrapped 🤗 model, whose add_adapter/load_adapter/... are transformers'
    PEFT integration: it would act behind LoRA²'s back (and fail with an unrelated "PEFT >= ..." message)."""
    _, model = build("bert")
    for name in ("add_adapter", "load_adapter", "set_adapter", "disable_adapters", "active_adapters"):
        with pytest.raises(AttributeError, match=rf"LoRA2Model has no {name}: .*does not know LoRA² layers"):
            getattr(model, name)
    assert model.num_parameters() == model.base_model.num_parameters()  # other attributes still pass through


def test_push_to_hub_uploads_the_adapter_alone_and_says_so_offline(tmp_path, monkeypatch):
    import huggingface_hub

    _, model = build("bert")
    calls = {}

    class FakeApi:
        def __init__(self, token=None):
            calls["token"] = token

        def create_repo(self, repo_id, private=None, exist_ok=False):
            calls["repo"] = (repo_id, private, exist_ok)

        def upload_folder(self, repo_id, folder_path, revision=None, create_pr=False, commit_message=None):
            calls["files"] = sorted(p.name for p in Path(folder_path).iterdir())
            calls["upload"] = (repo_id, revision, create_pr, commit_message)
            return "commit-info"

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RuntimeError, match=r"push_to_hub\('me/ada'\): the Hub is off \(HF_HUB_OFFLINE is set\)"):
        model.push_to_hub("me/ada")
    assert calls == {}
    with pytest.raises(FileNotFoundError, match=r"No adapter directory 'me/ada' here, and as a Hub repo id the Hub is "
                                                r"off \(HF_HUB_OFFLINE is set\) and it is not in the local cache"):
        LoRA2Model.from_pretrained(tiny_bert(), "me/ada")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    with pytest.raises(ValueError, match="needs a Hub repo id"):
        model.push_to_hub("not a repo id")
    assert model.push_to_hub("me/ada", private=True, token="t") == "commit-info"
    assert calls == {"token": "t", "repo": ("me/ada", True, True),
                     "files": ["lora2_adapter.safetensors", "lora2_config.json"],
                     "upload": ("me/ada", None, False, "Upload LoRA² adapter")}


def test_a_peft_model_is_refused_with_the_two_ways_forward(tmp_path):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    for target in (["q_proj"], ["o_proj"]):  # o_proj wrapped silently before, freezing PEFT's lora_A/lora_B
        with pytest.raises(ValueError, match=r"holds PEFT adapter parts \(PeftModel\); LoRA² does not stack "
                                             r"on them.*merge_and_unload\(\).*init_from_peft_lora"):
            get_lora2_model(peft_model, LoRA2Config(target_modules=target))
    assert all(p.requires_grad for n, p in peft_model.named_parameters() if "lora_" in n)  # untouched
    peft_model.save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"It holds a PEFT adapter \(adapter_config.json\): load it with "
                                                r"peft.PeftModel.from_pretrained"):
        LoRA2Model.from_pretrained(tiny_llama(), tmp_path)


def test_a_tied_module_to_save_warns_that_its_partner_trains_too(tmp_path):
    with pytest.warns(UserWarning, match=r"modules_to_save trains lm_head.weight in place, and it is the same tensor "
                                         r"as transformer.wte.weight"):
        model = get_lora2_model(tiny_gpt2(), LoRA2Config(target_modules=["c_attn"], modules_to_save=["lm_head"]))
    assert model.base_model.transformer.wte.weight.requires_grad
    model.save_pretrained(tmp_path)
    with warnings.catch_warnings(record=True) as caught:  # loaded for inference nothing trains: nothing to say
        warnings.simplefilter("always")
        LoRA2Model.from_pretrained(tiny_gpt2(), tmp_path)
    assert not [w for w in caught if "modules_to_save trains" in str(w.message)]


@pytest.mark.parametrize(("arch", "count", "left_out"), [("bert", 13, "classifier"), ("llama", 14, "lm_head"),
                                                        ("gpt2", 8, "lm_head")])
def test_all_linear_adapts_the_backbone_and_leaves_the_head_out(arch, count, left_out):
    """PEFT's target_modules='all-linear': every Linear/Conv1D of the backbone (BERT's pooler included), never the
    task head or the output embeddings; saved as written and resolved again on load."""
    _, model = build(arch, target_modules="all-linear", modules_to_save=None if arch == "bert" else [])
    assert len(model.lora2_layers) == count and not any(n.startswith(left_out) for n in model.lora2_layers)
    assert model.lora2_config.target_modules == "all-linear"
    if arch == "bert":  # with part of the backbone in modules_to_save: no warning about entries nobody wrote
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            saved = get_lora2_model(tiny_bert(), LoRA2Config(target_modules=["all-linear"],  # a CLI's one-item list
                                                             modules_to_save=["classifier", "pooler"]))
        assert len(saved.lora2_layers) == 12 and saved.lora2_config.target_modules == "all-linear"
        from transformers import T5Config, T5ForQuestionAnswering  # base_model_prefix 'transformer' is no attribute

        t5 = T5ForQuestionAnswering(T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2))
        qa = get_lora2_model(t5, LoRA2Config(target_modules="all-linear", modules_to_save=["qa_outputs"]))
        assert len(qa.lora2_layers) == 16 and not any(n.startswith("qa_outputs") for n in qa.lora2_layers)
        custom = nn.Module()  # not a 🤗 model: every linear layer, whatever its name (as PEFT)
        custom.encoder, custom.projector, custom.proj_out = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2)
        plain = get_lora2_model(custom, LoRA2Config(k=1, r=2, target_modules="all-linear"))
        assert sorted(plain.lora2_layers) == ["encoder", "proj_out", "projector"]


def test_orth_regularization_takes_the_model():
    _, model = build("bert", orth_terms=["uv", "PQ"], pq_form="rank")
    randomize_adapters(model)
    layers = list(model.lora2_layers.values())
    torch.testing.assert_close(orth_regularization(model), model.orth_regularization(), rtol=0, atol=0)
    torch.testing.assert_close(orth_regularization(model, ["UV"]), orth_regularization(layers, ["UV"], "rank"))
    torch.testing.assert_close(orth_regularization(model, pq_form="literal"),
                               orth_regularization(layers, ["uv", "PQ"], "literal"))
    assert float(orth_regularization(model, pq_form="literal")) > float(orth_regularization(model)) + 1  # r − k more
    torch.testing.assert_close(orth_regularization(layers), orth_regularization(layers, ["uv", "UV", "PQ"]))
    with pytest.raises(ValueError, match="at least one LoRA² layer"):
        orth_regularization([])


def test_no_matching_target_lists_what_the_model_has():
    with pytest.raises(ValueError, match=r"matched no module of BertForSequenceClassification") as err:
        get_lora2_model(tiny_bert(), LoRA2Config(target_modules=["q_proj"]))
    assert "'query'" in str(err.value) and "'dense'" in str(err.value)


def test_regex_target_matches_full_names():
    model = get_lora2_model(tiny_bert(), LoRA2Config(target_modules=r".*layer\.0\.attention\.self\.(query|value)"))
    assert sorted(model.lora2_layers) == ["bert.encoder.layer.0.attention.self.query",
                                          "bert.encoder.layer.0.attention.self.value"]


def test_disable_adapter_on_a_merged_model_gives_the_base_output():
    reference, model = build("bert")
    randomize_adapters(model)
    batch = inputs_for("bert")
    merged_out = model(**batch).logits
    model.merge()
    with model.disable_adapter():
        torch.testing.assert_close(model(**batch).logits, reference(**batch).logits, rtol=1e-5, atol=1e-6)
    assert all(layer.merged for layer in model.lora2_layers.values())
    torch.testing.assert_close(model(**batch).logits, merged_out, rtol=1e-5, atol=1e-6)


def test_targets_only_inside_modules_to_save_are_explained():
    with pytest.raises(ValueError, match="only matched modules inside modules_to_save"):
        get_lora2_model(tiny_bert(), LoRA2Config(target_modules=["classifier"], modules_to_save=["classifier"]))


def test_unsupported_module_type_is_rejected():
    with pytest.raises(TypeError, match=r"'bert.embeddings.word_embeddings', a Embedding"):
        get_lora2_model(tiny_bert(), LoRA2Config(target_modules=["word_embeddings"]))


def test_partially_unmatched_targets_warn():
    with pytest.warns(UserWarning, match=r"\['q_proj'\] matched no module"):
        get_lora2_model(tiny_bert(), LoRA2Config(target_modules=["query", "q_proj"]))
    with pytest.warns(UserWarning, match=r"\['classifier'\] match only modules in modules_to_save") as caught:
        get_lora2_model(tiny_bert(), LoRA2Config(target_modules=["query", "classifier"], modules_to_save=["classifier"]))
    assert not any("matched no module" in str(w.message) for w in caught)


def test_unknown_modules_to_save_is_rejected():
    with pytest.raises(ValueError, match=r"modules_to_save \['head'\] matched no module"):
        get_lora2_model(tiny_bert(), LoRA2Config(target_modules=["query"], modules_to_save=["head"]))


def test_wrapping_twice_is_rejected():
    _, model = build("bert")
    with pytest.raises(ValueError, match="already has LoRA"):
        get_lora2_model(model, LoRA2Config(target_modules=["query"]))


def test_loading_onto_a_different_shape_is_a_clear_error(tmp_path):
    _, model = build("bert")
    model.save_pretrained(tmp_path)
    bigger = tiny_bert(num_labels=3)
    with pytest.raises(ValueError, match=r"Shape mismatch for classifier.weight.*\(2, 48\).*\(3, 48\)"):
        LoRA2Model.from_pretrained(bigger, tmp_path)
    with pytest.raises(ValueError, match="trained on a BertForSequenceClassification, not LlamaForCausalLM"):
        LoRA2Model.from_pretrained(tiny_llama(), tmp_path)


def test_corrupted_weights_fail_to_load(tmp_path):
    _, model = build("bert")
    model.save_pretrained(tmp_path)
    data = (tmp_path / WEIGHTS_NAME).read_bytes()
    (tmp_path / WEIGHTS_NAME).write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated, corrupted"):
        LoRA2Model.from_pretrained(tiny_bert(), tmp_path)


def test_saving_leaves_no_temporary_files(tmp_path):
    _, model = build("gpt2")
    model.save_pretrained(tmp_path / "out")
    model.save_pretrained(tmp_path / "out")  # overwrite in place
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["lora2_adapter.safetensors", "lora2_config.json"]


def test_forgotten_allocator_is_loud(tmp_path):
    _, model = build("bert", target_rank=2, total_step=1000, init_warmup=10, final_warmup=10)
    model.train()
    batch = {**inputs_for("bert"), "labels": torch.tensor([0, 1])}
    with pytest.warns(RuntimeWarning, match="update_and_allocate\\(\\) was never called"):
        for _ in range(200):
            model(**batch)
    _, idle = build("bert", target_rank=2, total_step=1000, init_warmup=10, final_warmup=10)  # eval, as loaded
    with pytest.warns(RuntimeWarning, match="was never called.*also in eval mode.*call model.train"):
        for _ in range(200):
            idle(**batch)
    randomize_adapters(model)
    with pytest.warns(RuntimeWarning, match="no singular value is pruned"):
        model.save_pretrained(tmp_path)
    # no pruning asked for, but λ's own rate (lam_lr_ratio=16) exists only through optimizer_param_groups(): a loop
    # that builds AdamW(model.parameters()) and never calls the allocator trained λ at the common rate unwarned
    _, plain = build("bert", target_rank=4)  # r = 4: nothing to prune
    plain.train()
    assert not plain.allocator.prunes and plain.lora2_config.lam_lr_ratio == 16
    with pytest.warns(RuntimeWarning, match=r"nothing has checked that λ trains at lr × lam_lr_ratio=16"):
        for _ in range(200):
            plain(**batch)
    for quiet in (build("bert", target_rank=4, lam_lr_ratio=1)[1], build("bert", target_rank=4)[1]):
        quiet.train()
        if quiet.lora2_config.lam_lr_ratio != 1:
            quiet.optimizer_param_groups(1e-3)  # λ's rate set up: nothing to say
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            for _ in range(200):
                quiet(**batch)


def test_no_warning_when_pruning_is_off():
    _, model = build("bert")
    model.optimizer_param_groups(1e-3)  # λ's own rate is set up (else the idle warning names that)
    model.train()
    batch = {**inputs_for("bert"), "labels": torch.tensor([0, 1])}
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        for _ in range(210):
            model(**batch)


def _max_gram_error(model) -> float:
    worst = 0.0
    for layer in model.lora2_layers.values():
        for name in ("p_outer", "p_inner", "q_inner", "q_outer"):
            w = getattr(layer, name).detach().double()
            gram = w.T @ w if w.shape[0] >= w.shape[1] else w @ w.T
            worst = max(worst, (gram - torch.eye(min(w.shape), dtype=torch.float64)).abs().max().item())
    return worst


def test_factor_init_reaches_every_layer_through_the_wrappers():
    """init/init_std travel from LoRA2Config and from the GLUE options to every layer."""
    from lora2.glue.args import GlueArgs
    from lora2.glue.methods import build_method

    cfg = dict(k=2, r=4, target_modules=BERT_TARGETS, total_step=100, init_warmup=10, final_warmup=10)
    assert _max_gram_error(get_lora2_model(tiny_bert(), LoRA2Config(init="orthogonal", **cfg))) < 1e-6
    assert _max_gram_error(get_lora2_model(tiny_bert(), LoRA2Config(**cfg))) < 1e-6  # the default
    assert _max_gram_error(get_lora2_model(tiny_bert(), LoRA2Config(init="gaussian", **cfg))) > 0.5  # std 0.02
    glue = dict(task="rte", target_modules=",".join(BERT_TARGETS))
    handle = build_method(GlueArgs(**glue, lora2=dict(k=2, r=4, init="orthogonal", init_warmup=10, final_warmup=10)),
                          tiny_bert(), total_steps=100)
    assert _max_gram_error(handle.model) < 1e-6
    wide = build_method(GlueArgs(**glue, lora2=dict(k=2, r=4, init="gaussian", init_std=0.5, init_warmup=10,
                                                    final_warmup=10)),
                        tiny_bert(), total_steps=100)
    stds = [layer.p_outer.std().item() for layer in wide.model.lora2_layers.values()]
    assert 0.35 < sum(stds) / len(stds) < 0.65


def test_active_pattern_counts_without_any_decomposition(monkeypatch):
    """active_pattern is a mask sum (cheap enough to log every step); rank_pattern adds the effective rank."""
    _, model = build("bert")
    randomize_adapters(model)
    masks = torch.ones(len(model.lora2_layers), 4)
    masks[0, :3] = 0
    masks[5, 1] = 0
    model.allocator.set_masks(masks)
    ranks = model.rank_pattern()
    expected = {n: v["active"] for n, v in ranks.items()}
    assert list(expected.values())[:6] == [1, 4, 4, 4, 4, 3]

    def refuse(*args, **kwargs):
        raise AssertionError("active_pattern must not decompose anything")

    for name in ("qr", "svd", "svdvals", "matrix_rank"):
        monkeypatch.setattr(torch.linalg, name, refuse)
    assert model.active_pattern() == expected
    monkeypatch.undo()
    from lora2.trainer import log_values

    logged = log_values(model)
    assert logged["lora2_active_sv"] == sum(expected.values()) == 4 * 12 - 4
    assert logged["lora2_effective_rank"] == sum(v["effective_rank"] for v in ranks.values())
    assert logged["lora2_effective_rank"] == sum(min(model.lora2_config.k, a) for a in expected.values())


def test_optimizer_param_groups_put_lam_at_its_own_rate():
    _, model = build("bert", lam_lr_ratio=4.0)
    randomize_adapters(model)
    groups = model.optimizer_param_groups(1e-3, weight_decay=0.1, no_decay=["base_model.classifier.bias"])
    trainable = [p for p in model.parameters() if p.requires_grad]
    grouped = [p for g in groups for p in g["params"]]
    assert len(grouped) == len(trainable) == len({id(p) for p in grouped})  # every trainable parameter exactly once
    assert {id(p) for p in grouped} == {id(p) for p in trainable}
    lam = {id(layer.lam) for layer in model.lora2_layers.values()}
    for group in groups:
        is_lam = {id(p) in lam for p in group["params"]}
        assert len(is_lam) == 1
        assert group["lr"] == pytest.approx(4e-3 if is_lam.pop() else 1e-3)
        bias = any(p is model.base_model.classifier.bias for p in group["params"])
        assert group["weight_decay"] == (0.0 if bias else 0.1)
    # one plain SGD step moves lam by lr·ratio·grad and everything else by lr·grad
    model.train()
    model(**inputs_for("bert"), labels=torch.tensor([0, 1])).loss.backward()
    before = {id(p): (p.detach().clone(), p.grad.clone()) for p in trainable}
    torch.optim.SGD(model.optimizer_param_groups(1e-3)).step()
    for p in trainable:
        old, grad = before[id(p)]
        rate = 4e-3 if id(p) in lam else 1e-3
        torch.testing.assert_close(p.detach(), old - rate * grad, rtol=0, atol=1e-7)
    assert len(get_lora2_model(tiny_bert(), LoRA2Config(target_modules=["query"])).optimizer_param_groups(1.0)) == 2


def test_a_base_that_already_holds_lora2_layers_is_rejected():
    base = tiny_bert()
    get_lora2_model(base, LoRA2Config(target_modules=["query"], modules_to_save=["classifier"]))  # in place
    with pytest.raises(ValueError, match=r"already holds LoRA² layers.*Load a fresh base model"):
        get_lora2_model(base, LoRA2Config(target_modules=["value"], modules_to_save=["classifier"]))


def test_fields_set_after_construction_are_validated_at_wrap():
    cfg = LoRA2Config(target_modules=["query"], modules_to_save=["classifier"])
    cfg.k = 0
    with pytest.raises(ValueError, match=r"LoRA2Config.k must be an integer >= 1, got 0"):
        get_lora2_model(tiny_bert(), cfg)


def test_the_wrapper_follows_the_base_models_mode_and_touches_no_submodule():
    _, model = build("bert")  # tiny_bert() is in eval mode, as from_pretrained leaves it
    assert not model.training and not any(m.training for m in model.modules())
    model.train()
    assert all(m.training for m in model.modules())
    base = tiny_bert().train()
    base.bert.embeddings.eval()  # kept without dropout on purpose
    base.bert.encoder.layer[1].eval()
    model = get_lora2_model(base, LoRA2Config(target_modules=["query"], modules_to_save=["classifier"], dropout=0.1))
    assert model.training and base.training and not base.bert.embeddings.training
    layers = model.lora2_layers
    assert layers["bert.encoder.layer.0.attention.self.query"].dropout.training  # as its base layer
    assert not layers["bert.encoder.layer.1.attention.self.query"].training
    assert not layers["bert.encoder.layer.1.attention.self.query"].dropout.training


def test_a_failed_wrap_or_load_leaves_the_base_model_unchanged(tmp_path):
    base = tiny_bert()
    with pytest.raises(ValueError, match="target_total_rank=1000 exceeds"):
        get_lora2_model(base, LoRA2Config(target_modules=["query"], modules_to_save=["classifier"],
                                          target_total_rank=1000))
    assert not any(isinstance(m, LoRA2Layer) for m in base.modules())
    _, model = build("bert")
    model.save_pretrained(tmp_path)
    wrong = tiny_bert(num_labels=3)
    with pytest.raises(ValueError, match="Shape mismatch"):
        LoRA2Model.from_pretrained(wrong, tmp_path)
    assert not any(isinstance(m, LoRA2Layer) for m in wrong.modules())
    cfg = LoRA2Config(modules_to_save=["classifier"])
    cfg.target_modules = ("query", "value")  # a tuple set after construction is taken like a list
    assert len(get_lora2_model(base, cfg).lora2_layers) == 4


def test_a_training_forward_on_a_merged_model_is_refused():
    _, model = build("bert")
    randomize_adapters(model)
    batch = inputs_for("bert")
    model.merge()
    model.train()
    with pytest.raises(RuntimeError, match=r"merged LoRA2Model.*Call unmerge"):
        model(**batch)
    with torch.no_grad():
        model(**batch)  # inference in training mode (e.g. MC dropout) is fine
    model.eval()
    model(**batch)


def test_loading_an_adapter_into_a_merged_model_keeps_the_base_weights(tmp_path):
    reference, model = build("bert")
    randomize_adapters(model, seed=1)
    model.save_pretrained(tmp_path)
    batch = inputs_for("bert")
    expected = model(**batch).logits
    _, other = build("bert")
    randomize_adapters(other, seed=2)
    other.merge()
    other.load_adapter_state(model.adapter_state_dict())
    assert all(layer.merged for layer in other.lora2_layers.values())
    torch.testing.assert_close(other(**batch).logits, expected, rtol=1e-5, atol=1e-5)
    other.unmerge()
    for name, layer in other.lora2_layers.items():
        torch.testing.assert_close(layer.base_layer.weight, reference.get_submodule(name).weight, rtol=0, atol=1e-6)


def test_load_state_dict_into_a_merged_model_keeps_the_adapter_and_w0():
    """nn.Module.load_state_dict wrote the unmerged base weights over W0 + Δ while the layers stayed flagged
    merged: the adapter vanished from the output, and unmerge() then left W0 − Δ."""
    reference, model = build("bert")
    randomize_adapters(model, seed=1)
    batch = inputs_for("bert")
    expected = model(**batch).logits
    state = {k: v.clone() for k, v in model.state_dict().items()}  # an unmerged checkpoint
    _, other = build("bert")
    randomize_adapters(other, seed=2)
    other.merge()
    other.load_state_dict(state)
    assert all(layer.merged for layer in other.lora2_layers.values())
    torch.testing.assert_close(other(**batch).logits, expected, rtol=1e-5, atol=1e-5)
    other.unmerge()
    torch.testing.assert_close(other(**batch).logits, expected, rtol=1e-5, atol=1e-5)
    for name, layer in other.lora2_layers.items():
        torch.testing.assert_close(layer.base_layer.weight, reference.get_submodule(name).weight, rtol=0, atol=1e-6)


def test_a_task_head_left_frozen_warns_unless_chosen():
    with pytest.warns(UserWarning, match=r"head 'classifier' stays frozen.*modules_to_save=\['classifier'\]"):
        get_lora2_model(tiny_bert(), LoRA2Config(target_modules=["query"]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for save in ([], ["classifier"]):
            get_lora2_model(tiny_bert(), LoRA2Config(target_modules=["query"], modules_to_save=save))
        get_lora2_model(tiny_bert(), LoRA2Config(target_modules=["query", "classifier"]))  # the head is adapted


def _one_step(model, batch, loss_outside: bool = False, step: int = 1) -> None:
    """One optimizer step; ``loss_outside``: the loop computes the loss from the logits (the model sees no labels)."""
    optimizer = torch.optim.SGD(model.optimizer_param_groups(1e-3))
    if loss_outside:
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        loss = nn.functional.cross_entropy(logits, batch["labels"])
    else:
        loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    model.update_and_allocate(step)


def test_a_step_without_the_regulariser_or_in_eval_mode_warns_once():
    batch = {**inputs_for("bert"), "labels": torch.tensor([0, 1])}
    _, model = build("bert")
    model.train()
    with pytest.warns(RuntimeWarning, match="without the orthogonality regulariser.*model.regularization_loss"):
        _one_step(model, batch, loss_outside=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _one_step(model, batch, loss_outside=True, step=2)  # once only
        _, fresh = build("bert")
        fresh.train()
        _one_step(fresh, batch)  # the model's own loss carries γ·R: no warning
        model.regularizer_in_loss = False
        loss = nn.functional.cross_entropy(model(**batch).logits, batch["labels"]) + model.regularization_loss()
        loss.backward()
        model.update_and_allocate(3)
        loss = nn.functional.cross_entropy(model(**batch).logits, batch["labels"]) + 0.1 * model.orth_regularization()
        loss.backward()
        model.update_and_allocate(4)
    _, idle = build("bert")  # left in eval mode, as loaded
    with pytest.warns(RuntimeWarning, match="in eval mode.*Call model.train"):
        _one_step(idle, batch)


def test_k_above_r_warns_and_a_string_target_explains_itself():
    with pytest.warns(UserWarning, match=r"k=16 exceeds r=4.*Use k <= r"):
        LoRA2Config(k=16, r=4)
    with pytest.raises(ValueError, match=r"A string is one regular expression.*pass a list, e\.g\. \['query', 'value'\]"):
        get_lora2_model(tiny_bert(), LoRA2Config(target_modules="query,value", modules_to_save=["classifier"]))


def test_saving_or_merging_a_run_cut_before_its_budget_warns(tmp_path):
    _, model = build("bert", target_rank=1, total_step=100, init_warmup=2, final_warmup=10, mask_interval=1)
    model.train()
    batch = {**inputs_for("bert"), "labels": torch.tensor([0, 1])}
    optimizer = torch.optim.SGD(model.optimizer_param_groups(1e-2))
    for step in range(1, 21):
        model(**batch).loss.backward()
        optimizer.step()
        model.update_and_allocate(step)
        model.zero_grad()
    with pytest.warns(RuntimeWarning, match=r"save_pretrained: the adapter is at step 20 of a 100-step schedule.*"
                                            r"not the micro-batches"):
        model.save_pretrained(tmp_path)  # e.g. total_step counted micro-batches under gradient accumulation
    with pytest.warns(RuntimeWarning, match=r"at step 20 of a 100-step schedule, before pruning reached its "
                                            r"target \(\d+ singular values active, target 12\)"):
        model.merge_and_unload()


def test_calls_without_an_optimizer_step_between_them_are_named_once():
    """accelerate's accumulate() makes optimizer.step() a no-op on non-sync micro-batches; a loop calling
    update_and_allocate per micro-batch there ran the schedule 4× too fast on half-accumulated gradients without a
    word. λ unchanged since the previous call means no step came in between: the third time warns (a warm-up at
    lr 0 gives one such call, which must not)."""
    def run(micro_batches: int, warmup_at_zero: bool = False) -> list[str]:
        _, model = build("bert", target_rank=1, total_step=60, init_warmup=2, final_warmup=10, mask_interval=1)
        model.train()
        batch = {**inputs_for("bert"), "labels": torch.tensor([0, 1])}
        optimizer = torch.optim.AdamW(model.optimizer_param_groups(1e-2))
        calls = 0
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for step in range(1, 13):
                for micro in range(1, micro_batches + 1):
                    model(**batch).loss.backward()
                    if micro == micro_batches:  # the sync micro-batch: the only real step
                        for group in optimizer.param_groups:
                            group["lr"] = 0.0 if warmup_at_zero and step == 1 else 1e-2
                        optimizer.step()
                    calls += 1
                    model.update_and_allocate(calls)  # wrong when micro_batches > 1: per micro-batch
                optimizer.zero_grad()
        return [str(w.message) for w in caught if "unchanged since its previous call" in str(w.message)]

    found = run(micro_batches=2)
    assert len(found) == 1 and "at steps 3, 5, 7:" in found[0] and "accelerator.sync_gradients" in found[0]
    assert run(micro_batches=1, warmup_at_zero=True) == []


@pytest.mark.parametrize("enable", ["before wrapping", "after wrapping"])
def test_reentrant_gradient_checkpointing_still_trains_lam(enable):
    """Reentrant checkpointing keeps a block's gradients only if its input requires grad; with frozen patch
    embeddings nothing did, and every λ got no task gradient (loss looked normal). The wrapper now makes the input
    embeddings' output require grad once checkpointing is on, as PEFT does."""
    from transformers import ViTConfig, ViTForImageClassification

    def build():
        torch.manual_seed(0)
        cfg = ViTConfig(image_size=16, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=40, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        return ViTForImageClassification(cfg)

    def grads(checkpointing: bool) -> dict[str, torch.Tensor]:
        base = build()
        names = ["q_proj", "v_proj", "fc1", "query", "value", "intermediate.dense"]  # transformers 5's and 4's ViT
        config = LoRA2Config(k=2, r=4, target_modules=names, modules_to_save=["classifier"])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # transformers 5 renames gradient_checkpointing_enable
            if checkpointing and enable == "before wrapping":
                base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
            model = get_lora2_model(base, config)
            if checkpointing and enable == "after wrapping":
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
        model.train()
        randomize_adapters(model)
        torch.manual_seed(1)
        out = model(pixel_values=torch.randn(2, 3, 16, 16), labels=torch.tensor([0, 2]))
        out.loss.backward()
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    plain, checkpointed = grads(False), grads(True)
    lam = [n for n in plain if n.endswith(".lam")]
    assert len(lam) == 6 and all(checkpointed[n] is not None and checkpointed[n].abs().max() > 0 for n in lam)
    for name, g in plain.items():
        torch.testing.assert_close(checkpointed[name], g, rtol=1e-5, atol=1e-7)
