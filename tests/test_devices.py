"""Where the model runs: float64 work off MPS, a model spread over two devices (``device_map``-style model
parallelism), and ``torch.compile``.

The two-device test needs a CUDA device beside the CPU; without one it is skipped (the CPU-only CI cannot
place layers on two devices). The GPU sessions run it."""

from __future__ import annotations

import pytest
import torch

from lora2 import LoRA2Config, LoRA2Layer, LoRA2Model, get_lora2_model
from lora2.factors import LoRA2Factors, float64_device
from lora2.trainer import find_lora2_model

from .conftest import BERT_TARGETS, tiny_bert


def test_float64_work_leaves_mps_for_the_cpu_and_returns_to_the_adapters_device():
    assert float64_device(torch.device("mps")) == torch.device("cpu")
    assert float64_device(torch.device("cuda", 1)) == torch.device("cuda", 1)
    assert float64_device(torch.device("cpu")) == torch.device("cpu")
    gen = torch.Generator().manual_seed(0)
    f = LoRA2Factors(torch.randn(6, 2, generator=gen), torch.randn(2, 4, generator=gen), torch.randn(4, generator=gen),
                     torch.randn(4, 2, generator=gen), torch.randn(2, 5, generator=gen), torch.ones(4), scaling=0.5)
    f = f.to(torch.float16)
    for exact in (False, True):
        a, b = f.as_lora(exact_rank=exact)
        assert (a.dtype, b.dtype, a.device, b.device) == (torch.float16, torch.float16, f.p_outer.device, f.p_outer.device)
        assert torch.allclose(b.float() @ a.float(), f.to(torch.float64).delta_weight().float(), atol=2e-2)


def _follow_inputs(module: torch.nn.Module, device: torch.device) -> None:
    """What accelerate's hooks do for a device_map: move a block's tensor inputs to the block's device."""
    def move(value):
        return value.to(device) if isinstance(value, torch.Tensor) else value

    def hook(_module, args, kwargs):
        return tuple(move(a) for a in args), {k: move(v) for k, v in kwargs.items()}

    module.register_forward_pre_hook(hook, with_kwargs=True)


def _spread(model: LoRA2Model, device: torch.device) -> None:
    """Embeddings and the first encoder layer stay on the CPU; the second layer, pooler and head move to ``device``."""
    bert = model.base_model.bert
    for module in (bert.encoder.layer[1], bert.pooler, model.base_model.classifier):
        module.to(device)
        _follow_inputs(module, device)


CUDA = pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                   reason="needs a CUDA device beside the CPU"))


@pytest.mark.parametrize("second", ["cpu", CUDA])  # "cpu": the same hooks and steps on one device
@pytest.mark.parametrize("importance", ["reduced", "full"])
def test_a_model_spread_over_two_devices_trains_prunes_saves_and_reloads(tmp_path, importance, second):
    cuda = torch.device(second, 0) if second == "cuda" else torch.device("cpu")
    cfg = LoRA2Config(k=2, r=4, target_rank=1, init_warmup=2, final_warmup=2, mask_interval=1, total_step=10,
                      importance=importance, target_modules=BERT_TARGETS, modules_to_save=["classifier"])
    model = get_lora2_model(tiny_bert(), cfg)
    _spread(model, cuda)
    assert {layer.lam.device.type for layer in model.lora2_layers.values()} == {"cpu", second}
    optimizer = torch.optim.AdamW(model.optimizer_param_groups(1e-2))
    gen = torch.Generator().manual_seed(0)
    model.train()
    for step in range(1, 11):
        ids = torch.randint(1, 120, (4, 8), generator=gen)
        labels = (ids[:, 0] > 60).long().to(cuda)  # beside the logits: BERT's loss does not move them
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels)
        assert out.loss.device == cuda and torch.isfinite(out.loss)
        out.loss.backward()
        optimizer.step()
        model.update_and_allocate(step)
        optimizer.zero_grad()
    alloc = model.allocator
    assert alloc.masks().sum().item() == alloc.b_target == 12
    for layer in model.lora2_layers.values():
        assert layer.mask.device == layer.lam.device  # each mask stays beside its matrix
        assert torch.equal(layer.lam.detach() * (1 - layer.mask), torch.zeros_like(layer.lam))
    assert set(model.rank_pattern()) == set(model.lora2_layers)
    state = alloc.state_dict()
    alloc.load_state_dict(state)
    assert torch.equal(alloc.masks(), state["tensors"]["masks"])
    assert {t.device for t in (*alloc.ema_i.values(), *alloc.ema_u.values())} == {alloc.device}
    for layer, stats in zip(alloc.layers, alloc.outer_i + alloc.outer_u, strict=False):  # "full" only
        assert {t.device for t in stats.values()} == {layer.lam.device}  # beside their matrix, where EMAs add up

    model.save_pretrained(tmp_path)
    model.eval()
    ids = torch.randint(1, 120, (3, 8), generator=gen)
    with torch.no_grad():
        spread_logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.cpu()
        reloaded = LoRA2Model.from_pretrained(tiny_bert(), tmp_path).eval()
        assert torch.allclose(reloaded(input_ids=ids, attention_mask=torch.ones_like(ids)).logits, spread_logits,
                              atol=1e-4)


def test_torch_compile_traces_once_and_trains_like_eager():
    """The wrapper's per-step counters stay out of compiled graphs: a compiled model does not recompile every
    step (it used to, hitting dynamo's recompile limit and falling back to eager), and it trains exactly like
    the eager one. The eager backend shows the guards without the compiler's minutes of C++ on a CPU."""
    torch._dynamo.reset()

    def build() -> LoRA2Model:
        cfg = LoRA2Config(k=2, r=4, target_rank=1, total_step=10, init_warmup=2, final_warmup=2, mask_interval=1,
                          target_modules=BERT_TARGETS, modules_to_save=["classifier"])
        model = get_lora2_model(tiny_bert(), cfg).train()
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        return model

    compiled_model, eager = build(), build()
    eager.load_state_dict(compiled_model.state_dict())
    compiled = torch.compile(compiled_model, backend="eager")
    optimizers = [torch.optim.AdamW(m.optimizer_param_groups(1e-2)) for m in (compiled_model, eager)]
    gen = torch.Generator().manual_seed(0)
    graphs = []
    for step in range(1, 11):
        ids = torch.randint(1, 120, (4, 8), generator=gen)
        for model, forward, optimizer in zip((compiled_model, eager), (compiled, eager), optimizers, strict=True):
            forward(input_ids=ids, labels=(ids[:, 0] > 60).long()).loss.backward()
            optimizer.step()
            model.update_and_allocate(step)
            optimizer.zero_grad()
        graphs.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])
    torch._dynamo.reset()
    assert graphs[1] == graphs[-1]  # nothing compiled after step 2 (step 2 recompiles for BERT's own problem_type)
    assert compiled_model.regularizer_calls == eager.regularizer_calls == 10
    assert torch.equal(compiled_model.last_orth_reg, eager.last_orth_reg)
    assert compiled_model.active_pattern() == eager.active_pattern()
    assert compiled_model.allocator.masks().sum().item() == compiled_model.allocator.b_target
    for (name, a), b in zip(compiled_model.state_dict().items(), eager.state_dict().values(), strict=True):
        assert torch.allclose(a, b, atol=1e-6), name


def test_offloaded_layers_are_refused_before_the_model_changes():
    """accelerate leaves an offloaded layer's weight on the meta device: factors made beside it would hold no data.
    ``main_device="meta"`` takes the code path of a GPU main device with 'cpu' entries (offload), without a GPU."""
    from accelerate import dispatch_model

    device_map = {"bert.embeddings": "cpu", "bert.encoder": "cpu", "bert.pooler": "cpu", "classifier": "cpu"}
    base = dispatch_model(tiny_bert(), device_map=device_map, main_device=torch.device("meta"), force_hooks=True)
    assert base.bert.encoder.layer[0].attention.self.query.weight.device.type == "meta"
    with pytest.raises(ValueError, match=r"bert\.encoder\.layer\.0\.attention\.self\.query is offloaded"):
        get_lora2_model(base, LoRA2Config(k=2, r=4, target_modules=BERT_TARGETS, modules_to_save=["classifier"]))
    assert not any(isinstance(m, LoRA2Layer) for m in base.modules())


def test_the_callback_finds_a_compiled_model():
    model = get_lora2_model(tiny_bert(), LoRA2Config(k=2, r=4, target_modules=BERT_TARGETS, modules_to_save=["classifier"]))
    assert find_lora2_model(torch.compile(model, backend="eager")) is model
