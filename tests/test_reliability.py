"""Reliability: SIGKILL during writes, hostile and careless input (property-based where it fits),
and numerical health under autocast."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from lora2 import LoRA2Config, LoRA2Layer, LoRA2Model, export_to_peft, get_lora2_model, orth_regularization
from lora2.persistence import WEIGHTS_NAME

from .conftest import BERT_TARGETS, REPO, randomize_adapters, tiny_bert

# -- SIGKILL while writing ----------------------------------------------------------------------
WRITER = r"""
import sys, torch
from torch import nn
import lora2
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(64, 64), nn.Linear(2048, 2048))
wrapped = lora2.get_lora2_model(model, lora2.LoRA2Config(k=2, r=4, target_rank=4, target_modules=["0"],
                                                          modules_to_save=["1"]))
version = 0
while True:
    version += 1
    with torch.no_grad():
        wrapped.base_model[0].lam.fill_(version)
        wrapped.base_model[1].weight.fill_(version)  # 16 MB: the write takes a while
    wrapped.save_pretrained(sys.argv[1])
    print(version, flush=True)
"""


def fresh_sequential() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 64), nn.Linear(2048, 2048))


def test_sigkill_during_saves_never_leaves_a_half_written_adapter(tmp_path):
    out = tmp_path / "adapter"
    for attempt in range(4):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(out)], stdout=subprocess.PIPE, text=True, cwd=REPO)
        assert proc.stdout.readline().strip()  # at least one complete save exists
        time.sleep(0.05 + 0.11 * attempt)  # kill at different points of a write
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        loaded = LoRA2Model.from_pretrained(fresh_sequential(), out)
        version = loaded.base_model[0].lam[0].item()
        assert version >= 1
        assert torch.all(loaded.base_model[0].lam == version)  # never a mix of two saves
        assert torch.all(loaded.base_model[1].weight == version)
    leftovers = [p.name for p in out.iterdir() if p.name not in (WEIGHTS_NAME, "lora2_config.json")]
    assert all(name.startswith(".tmp") or (name.startswith(".") and name.endswith(".tmp")) for name in leftovers), \
        leftovers  # hidden temporaries from killed writes: never read as an adapter


# -- hostile and careless adapter files ---------------------------------------------------------
@pytest.fixture
def saved(tmp_path):
    model = get_lora2_model(tiny_bert(), LoRA2Config(k=2, r=4, target_rank=4, target_modules=["query", "value"]))
    model.save_pretrained(tmp_path)
    return tmp_path


class Boom:
    def __reduce__(self):
        return (os.system, ("touch /tmp/lora2-pwned",))


def test_pickled_code_is_never_executed(saved):
    (saved / WEIGHTS_NAME).write_bytes(pickle.dumps({"x": Boom()}))
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        LoRA2Model.from_pretrained(tiny_bert(), saved)
    assert not os.path.exists("/tmp/lora2-pwned")


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [("k", "8", r"LoRA2Config\.k"), ("r", -1, r"LoRA2Config\.r"), ("target_rank", 9, r"LoRA2Config\.target_rank"),
     ("importance", "magic", r"LoRA2Config\.importance"), ("orth_terms", ["xy"], r"LoRA2Config\.orth_terms"),
     ("k", 0, r"LoRA2Config\.k"), ("scaling_rule", "alpha*100", r"LoRA2Config\.scaling_rule"),
     ("pq_form", "rank2", r"LoRA2Config\.pq_form"), ("lam_lr_ratio", -1, r"LoRA2Config\.lam_lr_ratio")],
)
def test_hostile_adapter_configs_are_rejected_by_field(saved, field, value, message):
    path = saved / "lora2_config.json"
    meta = json.loads(path.read_text())
    meta["config"][field] = value
    path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=message):
        LoRA2Model.from_pretrained(tiny_bert(), saved)


def test_a_peft_directory_is_not_mistaken_for_lora2(tmp_path):
    (tmp_path / "adapter_model.bin").write_bytes(pickle.dumps({"x": Boom()}))
    with pytest.raises(FileNotFoundError, match=r"lora2_config\.json"):
        LoRA2Model.from_pretrained(tiny_bert(), tmp_path)
    assert not os.path.exists("/tmp/lora2-pwned")


# -- property-based: configs and shapes ---------------------------------------------------------
values = st.one_of(st.none(), st.booleans(), st.integers(-3, 20), st.floats(allow_nan=True, allow_infinity=True),
                   st.text(max_size=5), st.lists(st.sampled_from(["uv", "UV", "PQ", "pq", ""]), max_size=4))
FIELDS = ["k", "r", "alpha", "dropout", "init_std", "target_rank", "target_total_rank", "init_warmup",
          "final_warmup", "mask_interval", "beta1", "beta2", "total_step", "orth_reg_weight", "orth_terms",
          "importance", "pq_form", "lam_lr_ratio", "scaling_rule"]


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(FIELDS), values, max_size=4))
def test_any_config_is_valid_or_a_valueerror_naming_its_field(data):
    try:
        cfg = LoRA2Config(**data)
    except ValueError as err:
        assert "LoRA2Config." in str(err)
        return
    assert LoRA2Config.from_dict(json.loads(cfg.to_json_string())) == cfg  # valid configs round-trip


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(d_in=st.integers(1, 24), d_out=st.integers(1, 24), k=st.integers(1, 6), r=st.integers(1, 6),
       seed=st.integers(0, 10_000))
def test_any_shape_forward_matches_the_dense_update_and_merges_exactly(d_in, d_out, k, r, seed):
    torch.manual_seed(seed)
    layer = LoRA2Layer(nn.Linear(d_in, d_out).double(), k=k, r=r, alpha=2.0 * r, init_std=0.5).double()
    with torch.no_grad():
        layer.lam.normal_()
        layer.mask.bernoulli_(0.5)
    x = torch.randn(3, d_in, dtype=torch.float64)
    dense = x @ layer.base_layer.weight.T + layer.base_layer.bias + x @ layer.get_delta_weight().T
    torch.testing.assert_close(layer(x), dense)
    expected_rank = int(torch.linalg.matrix_rank(layer.get_delta_weight()).item())
    assert layer.effective_rank() == expected_rank <= min(k, int(layer.mask.sum().item()))
    layer.merge()
    torch.testing.assert_close(layer(x), dense)


# -- numerical health ---------------------------------------------------------------------------
def test_bf16_autocast_keeps_allocator_statistics_in_float32():
    model = get_lora2_model(tiny_bert(), LoRA2Config(k=2, r=4, target_rank=1, target_modules=["query", "value"],
                                                     total_step=10, init_warmup=1, final_warmup=2, mask_interval=1))
    randomize_adapters(model, std=0.1)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    for step in range(1, 5):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=torch.randint(0, 120, (4, 7)), labels=torch.tensor([0, 1, 0, 1])).loss
        loss.backward()
        optimizer.step()
        model.update_and_allocate(step)
        optimizer.zero_grad()
    assert all(t.dtype == torch.float32 for t in (*model.allocator.ema_i.values(), *model.allocator.ema_u.values()))
    assert all(layer.lam.dtype == torch.float32 for layer in model.lora2_layers.values())
    assert model.allocator.masks().sum().item() < 4 * len(model.lora2_layers)  # it pruned


def test_casting_the_model_to_half_precision_keeps_the_adapter_in_float32():
    """model.half() / .bfloat16() after wrapping cast the base only: in bf16 most factor updates would round away."""
    model = get_lora2_model(tiny_bert(), LoRA2Config(k=2, r=4, target_modules=BERT_TARGETS, modules_to_save=["classifier"]))
    randomize_adapters(model, std=0.1)
    layer = next(iter(model.lora2_layers.values()))
    before = {n: getattr(layer, n).detach().clone() for n in ("p_outer", "lam", "mask")}
    for cast, base_dtype in (("half", torch.float16), ("bfloat16", torch.bfloat16)):
        getattr(model, cast)()
        assert layer.base_layer.weight.dtype == base_dtype
        for name, value in before.items():
            assert getattr(layer, name).dtype == torch.float32 and torch.equal(getattr(layer, name), value), name
    assert isinstance(layer.p_outer, nn.Parameter) and layer.p_outer.requires_grad
    model.train()
    optimizer = torch.optim.AdamW(model.optimizer_param_groups(1e-4))
    model(input_ids=torch.randint(1, 120, (4, 8)), labels=torch.tensor([0, 1, 0, 1])).loss.backward()
    optimizer.step()
    for name in ("p_outer", "p_inner", "q_inner", "q_outer"):  # every entry moved (in bf16 most did not)
        assert bool((getattr(layer, name) != 0).all()) and layer.p_outer.grad.dtype == torch.float32
    assert (layer.p_outer.detach() != before["p_outer"]).all()
    grads = {n: getattr(layer, n).grad.clone() for n in ("p_outer", "lam")}
    model.half()  # with the last step's gradients still there (a loop that zeroes them before backward)
    assert all(getattr(layer, n).grad.dtype == torch.float32 and torch.equal(getattr(layer, n).grad, g)
               for n, g in grads.items())
    model.double()  # a wider cast applies as usual
    assert layer.p_outer.dtype == torch.float64 and layer.base_layer.weight.dtype == torch.float64


@pytest.mark.parametrize("pq_form", ["literal", "rank"])
def test_the_regulariser_is_float32_under_bf16_autocast(pq_form):
    """Gram − I near orthogonality cancels to bf16 noise: R (and its gradient) is formed outside autocast."""
    model = get_lora2_model(tiny_bert(), LoRA2Config(k=4, r=8, pq_form=pq_form, target_modules=BERT_TARGETS,
                                                     modules_to_save=["classifier"]))
    layers = list(model.lora2_layers.values())
    with torch.no_grad():
        for layer in layers:
            for name in ("p_outer", "p_inner", "q_inner", "q_outer"):
                getattr(layer, name).add_(1e-3 * torch.randn_like(getattr(layer, name)))
    plain = orth_regularization(layers, ("uv", "UV", "PQ"), pq_form)
    grad_plain = torch.autograd.grad(plain, layers[0].p_outer)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = orth_regularization(layers, ("uv", "UV", "PQ"), pq_form)
    grad_auto = torch.autograd.grad(auto, layers[0].p_outer)[0]  # backward outside autocast, as torch advises
    assert auto.dtype == torch.float32 and float(auto) == pytest.approx(float(plain), rel=1e-6)
    torch.testing.assert_close(grad_auto, grad_plain, rtol=1e-5, atol=1e-8)


def test_schedule_mistakes_in_a_custom_loop_raise_or_warn():
    """Per-micro-batch calls overrun total_step; total_step set after wrapping may leave no pruning phase; an
    optimizer over model.parameters() ignores lam_lr_ratio."""
    def wrapped(**kw):
        cfg = LoRA2Config(k=2, r=4, target_rank=1, target_modules=["query"], modules_to_save=[], **kw)
        return get_lora2_model(tiny_bert(), cfg).train()

    def step(model, optimizer, n):
        model(input_ids=torch.randint(1, 120, (2, 6)), labels=torch.tensor([0, 1])).loss.backward()
        optimizer.step()
        model.update_and_allocate(n)
        optimizer.zero_grad()

    model = wrapped(total_step=6, init_warmup=1, final_warmup=1, mask_interval=1)
    optimizer = torch.optim.AdamW(model.optimizer_param_groups(1e-3))
    for n in range(1, 7):
        step(model, optimizer, n)
    with pytest.raises(ValueError, match=r"step=7\) beyond total_step=6.*once per optimizer step"):
        step(model, optimizer, 7)

    late = wrapped(init_warmup=5, final_warmup=10)
    late.lora2_config.total_step = 12  # set after wrapping: 12 <= 5 + 10
    with pytest.raises(ValueError, match=r"total_step=12 leaves no pruning phase"):
        step(late, torch.optim.AdamW(late.optimizer_param_groups(1e-3)), 1)

    plain = wrapped(total_step=6, init_warmup=1, final_warmup=1)
    with pytest.warns(RuntimeWarning, match=r"lam_lr_ratio=16 acts only through model.optimizer_param_groups"):
        step(plain, torch.optim.AdamW([p for p in plain.parameters() if p.requires_grad], lr=1e-3), 1)
    one_rate = wrapped(total_step=6, init_warmup=1, final_warmup=1, lam_lr_ratio=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        step(one_rate, torch.optim.AdamW([p for p in one_rate.parameters() if p.requires_grad], lr=1e-3), 1)


def test_a_config_edited_after_wrapping_is_not_saved_or_exported(tmp_path):
    model = get_lora2_model(tiny_bert(), LoRA2Config(k=2, r=4, alpha=16, target_modules=["query"], modules_to_save=[]))
    model.lora2_config.alpha = 64  # the layers keep s = 16 / 4
    with pytest.raises(ValueError, match=r"s = 4 but lora2_config now gives s = 16"):
        model.save_pretrained(tmp_path / "a")
    with pytest.raises(ValueError, match=r"alpha, r or scaling_rule changed after wrapping"):
        export_to_peft(model, tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_other_structural_edits_after_wrapping_are_refused_by_name(tmp_path):
    """target_modules, modules_to_save, k, dropout, init: the layers keep what they were built with, so a saved
    config with the new values would reload onto other modules or train differently."""
    for field, value in [("target_modules", ["key"]), ("modules_to_save", ["classifier", "pooler"]), ("k", 1),
                         ("dropout", 0.3)]:
        model = get_lora2_model(tiny_bert(), LoRA2Config(k=2, r=4, target_modules=["query"],
                                                         modules_to_save=["classifier"]))
        setattr(model.lora2_config, field, value)
        with pytest.raises(ValueError, match=rf"changed after wrapping \({field}: .* → "):
            model.save_pretrained(tmp_path / field)
        assert not (tmp_path / field).exists()


def test_a_failed_load_gives_the_base_model_back_trainable_as_it_was(tmp_path):
    model = get_lora2_model(tiny_bert(), LoRA2Config(k=2, r=4, target_modules=["query"], modules_to_save=["classifier"]))
    model.save_pretrained(tmp_path)
    base = tiny_bert(num_labels=3)  # the classifier does not fit
    before = {n: (p.requires_grad, p.clone()) for n, p in base.named_parameters()}
    with pytest.raises(ValueError, match=r"classifier.weight"):
        LoRA2Model.from_pretrained(base, tmp_path)
    after = dict(base.named_parameters())
    assert set(after) == set(before) and not any(isinstance(m, LoRA2Layer) for m in base.modules())
    assert all(after[n].requires_grad == flag and torch.equal(after[n], value) for n, (flag, value) in before.items())
    frozen = tiny_bert()
    frozen.bert.embeddings.requires_grad_(False)  # a user's own choice survives a failed wrap too
    with pytest.raises(ValueError, match="exceeds the initial budget"):
        get_lora2_model(frozen, LoRA2Config(k=2, r=4, target_modules=["query"], target_total_rank=99))
    assert [n for n, p in frozen.named_parameters() if not p.requires_grad] == \
        [n for n, _ in frozen.bert.embeddings.named_parameters(prefix="bert.embeddings")]


def test_nan_adapter_weights_are_refused_on_load(saved):
    from safetensors.torch import load_file, save_file

    tensors = load_file(saved / WEIGHTS_NAME)
    meta = json.loads((saved / "lora2_config.json").read_text())
    key = next(k for k in tensors if k.endswith("q_outer"))
    tensors[key][0, 0] = float("inf")
    save_file(tensors, saved / WEIGHTS_NAME, metadata={"format": "pt", "save_id": meta["save_id"]})
    with pytest.raises(ValueError, match=rf"{key} in the adapter .* NaN or inf"):
        LoRA2Model.from_pretrained(tiny_bert(), saved)


def test_integer_buffers_of_modules_to_save_round_trip(tmp_path):
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj, self.bn = nn.Linear(6, 6), nn.BatchNorm1d(6)

        def forward(self, x):
            return self.bn(self.proj(x))

    torch.manual_seed(0)
    model = get_lora2_model(Net(), LoRA2Config(k=2, r=2, target_modules=["proj"], modules_to_save=["bn"]))
    randomize_adapters(model)
    model.train()
    model(torch.randn(8, 6))  # running statistics and num_batches_tracked move
    model.eval()
    model.save_pretrained(tmp_path)
    torch.manual_seed(0)  # the same base weights
    loaded = LoRA2Model.from_pretrained(Net(), tmp_path)
    assert int(loaded.base_model.bn.num_batches_tracked) == 1
    x = torch.randn(4, 6)
    torch.testing.assert_close(loaded(x), model(x))


def test_weights_and_config_of_two_saves_are_never_paired(tmp_path):
    """A save into an existing adapter directory killed between its two renames leaves new weights beside the old
    config; loading or exporting that pair is refused instead of running the factors at the old settings."""
    first = get_lora2_model(tiny_bert(), LoRA2Config(k=2, r=4, alpha=32, target_modules=["query"]))
    first.save_pretrained(tmp_path / "a")
    second = get_lora2_model(tiny_bert(), LoRA2Config(k=2, r=4, alpha=4, target_modules=["query"]))
    second.save_pretrained(tmp_path / "b")
    os.replace(tmp_path / "b" / WEIGHTS_NAME, tmp_path / "a" / WEIGHTS_NAME)  # the state such a kill leaves
    with pytest.raises(ValueError, match=r"come from different saves .* interrupted"):
        LoRA2Model.from_pretrained(tiny_bert(), tmp_path / "a")
    with pytest.raises(ValueError, match="come from different saves"):
        export_to_peft(tmp_path / "a", tmp_path / "peft")
    # a kill between the two renames of save_pretrained: the new weights' config waits under its pending name
    new_config = tmp_path / "b" / "lora2_config.json"
    os.replace(new_config, tmp_path / "a" / f".lora2_config.json.{json.loads(new_config.read_text())['save_id']}.0a1b2c3d.tmp")
    loaded = LoRA2Model.from_pretrained(tiny_bert(), tmp_path / "a")
    assert loaded.lora2_config.alpha == 4 and loaded.lora2_layers["bert.encoder.layer.0.attention.self.query"].scaling == 1
    export_to_peft(tmp_path / "a", tmp_path / "peft")


def test_config_from_an_old_adapter_file_reads_as_from_pretrained_does(saved):
    path = saved / "lora2_config.json"
    meta = json.loads(path.read_text())
    for field in ("init", "lam_lr_ratio"):  # what an adapter of 0.1.0 lacked
        del meta["config"][field]
    path.write_text(json.dumps(meta))
    config = LoRA2Config.from_json_file(path)
    assert (config.init, config.lam_lr_ratio) == ("gaussian", 1.0)
    loaded = LoRA2Model.from_pretrained(tiny_bert(), saved)
    assert (loaded.lora2_config.init, loaded.lora2_config.lam_lr_ratio) == ("gaussian", 1.0)


def test_an_allocator_that_missed_the_first_steps_refuses_to_start_mid_schedule():
    """A run resumed from model.state_dict() (or accelerate's save_state) without the allocator's own state would
    restart its importance averages at zero mid-schedule."""
    model = get_lora2_model(tiny_bert(), LoRA2Config(k=1, r=4, target_rank=1, target_modules=["query"],
                                                     total_step=20, init_warmup=2, final_warmup=5, mask_interval=1))
    with pytest.raises(RuntimeError, match=r"step=7\) is this allocator's first call: steps 1-6 .*"
                                           r"register_for_checkpointing\(model.allocator\)"):
        model.update_and_allocate(7)
    resumed = get_lora2_model(tiny_bert(), LoRA2Config(k=1, r=4, target_rank=1, target_modules=["query"],
                                                       total_step=20, init_warmup=8, final_warmup=5, mask_interval=1))
    resumed.allocator.load_state_dict({**resumed.allocator.state_dict(), "step": 6, "num_updates": 6})  # restored
    resumed.train()
    resumed(input_ids=torch.randint(0, 120, (2, 6)), labels=torch.tensor([0, 1])).loss.backward()
    resumed.update_and_allocate(7)
    assert resumed.allocator.num_updates == 7


def test_save_pretrained_honours_is_main_process_and_refuses_pickles(tmp_path):
    model = get_lora2_model(tiny_bert(), LoRA2Config(k=2, r=4, target_modules=["query"]))
    model.save_pretrained(tmp_path / "rank1", is_main_process=False)
    assert not (tmp_path / "rank1").exists()
    with pytest.raises(ValueError, match="safetensors only"):
        model.save_pretrained(tmp_path / "pickle", safe_serialization=False)
    with pytest.warns(UserWarning, match=r"ignores \['state_dict'\]"):
        model.save_pretrained(tmp_path / "a", state_dict={})
    model.save_pretrained(tmp_path / "b")
    ids = [json.loads((tmp_path / d / "lora2_config.json").read_text())["save_id"] for d in ("a", "b")]
    assert ids[0] == ids[1]  # the content's hash: ranks saving one adapter together write interchangeable files
    os.replace(tmp_path / "b" / WEIGHTS_NAME, tmp_path / "a" / WEIGHTS_NAME)
    LoRA2Model.from_pretrained(tiny_bert(), tmp_path / "a")
    with torch.no_grad():
        next(iter(model.lora2_layers.values())).lam.fill_(0.5)
    model.save_pretrained(tmp_path / "c")
    assert json.loads((tmp_path / "c" / "lora2_config.json").read_text())["save_id"] != ids[0]


def test_a_merged_models_state_dict_holds_w0_and_loads_into_either_state():
    """A merged model's base weights are W0 + s·Δ; its state dict says W0 (as an unmerged one does), so any state
    dict loads correctly into a merged or an unmerged model — also through a container (DDP, torch.compile and
    accelerate call the layers' own state-dict code, never LoRA2Model's)."""
    def make(seed):
        model = get_lora2_model(tiny_bert(), LoRA2Config(k=2, r=4, target_modules=["query"], modules_to_save=[]))
        randomize_adapters(model, seed=seed)
        return model.eval()

    ids = torch.randint(1, 100, (2, 7))
    source = make(1)
    expected = source(input_ids=ids).logits
    unmerged_state = {k: v.clone() for k, v in source.state_dict().items()}
    source.merge()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        merged_state = {k: v.clone() for k, v in source.state_dict().items()}
    for key, value in unmerged_state.items():
        torch.testing.assert_close(merged_state[key], value, rtol=0, atol=1e-6)
    for state in (unmerged_state, merged_state):
        for merge_target in (False, True):
            target = make(2)
            if merge_target:
                target.merge()
            torch.nn.Sequential(target).load_state_dict({f"0.{k}": v for k, v in state.items()})
            assert all(layer.merged == merge_target for layer in target.lora2_layers.values())
            torch.testing.assert_close(target(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)
            target.unmerge()
            for key, value in unmerged_state.items():
                if key.endswith("base_layer.weight"):
                    torch.testing.assert_close(dict(target.state_dict())[key], value, rtol=0, atol=1e-6)


def test_a_regulariser_logged_under_no_grad_is_not_taken_for_one_in_the_loss():
    model = get_lora2_model(tiny_bert(), LoRA2Config(k=2, r=4, target_modules=["query"], modules_to_save=["classifier"],
                                                     total_step=10, init_warmup=2, final_warmup=2))
    model.train()
    model.regularizer_in_loss = False
    optimizer = torch.optim.AdamW(model.optimizer_param_groups(1e-3))
    model(input_ids=torch.randint(1, 120, (2, 6)), labels=torch.tensor([0, 1])).loss.backward()
    with torch.no_grad():
        logged = model.regularization_loss()  # for a progress bar only
    assert logged is not None and model.regularizer_calls == 0
    optimizer.step()
    with pytest.warns(RuntimeWarning, match="without the orthogonality regulariser"):
        model.update_and_allocate(1)


def test_partial_checkpoints_are_never_resumed_from(tmp_path):
    from lora2.glue.checkpoint import OPTIMIZER_NAME, latest_checkpoint, load_checkpoint, save_checkpoint
    from lora2.glue.methods import LoRA2Method

    method = LoRA2Method(tiny_bert(), LoRA2Config(k=1, r=2, target_rank=2, target_modules=["query"]))
    model = method.model
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    state = {"step": 4, "epoch": 0, "batches_done": 4, "history": [], "best": {}, "train_time": 1.0, "total_steps": 9}
    save_checkpoint(tmp_path / "checkpoint-4", method, optimizer, scheduler, state, torch.Generator().get_state())
    (tmp_path / ".checkpoint-8.abc123").mkdir()  # a kill during the write of checkpoint-8 leaves its temp dir
    (tmp_path / "checkpoint-12").mkdir()  # or a directory without its completion marker
    assert latest_checkpoint(tmp_path).name == "checkpoint-4"
    (tmp_path / "checkpoint-4" / OPTIMIZER_NAME).write_bytes(b"\x80\x04truncated")
    with pytest.raises(ValueError, match="cannot be read safely"):
        load_checkpoint(tmp_path / "checkpoint-4", method, optimizer, scheduler)


def test_a_float16_head_that_overflows_is_named_instead_of_the_adapter():
    """On a float16 base a ``modules_to_save`` head trains in float16, where AdamW overflows in one step; the
    adapter's NaN a step later used to be reported as a λ problem with 'lower the learning rate'."""
    cfg = LoRA2Config(k=2, r=4, alpha=8, target_modules=BERT_TARGETS, modules_to_save=["classifier"], target_rank=1,
                      init_warmup=2, final_warmup=3, mask_interval=1, total_step=10)
    model = get_lora2_model(tiny_bert(num_labels=3).half(), cfg)
    model.train()
    assert model.base_model.classifier.weight.dtype == torch.float16
    assert next(iter(model.lora2_layers.values())).lam.dtype == torch.float32
    opt = torch.optim.AdamW(model.optimizer_param_groups(lr=1e-3))
    ids = torch.randint(1, 120, (4, 12))
    with pytest.raises(FloatingPointError, match=r"classifier\.\S*weight \(torch\.float16, trained outside the adapter\)"):
        for step in range(1, 4):
            model(input_ids=ids, labels=torch.tensor([0, 1, 2, 1])).loss.backward()
            opt.step()
            model.update_and_allocate(step)
            opt.zero_grad()
