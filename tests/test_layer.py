"""The adapter layer: forward = dense formula, never a d_in×d_out tensor, merge exact."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from transformers.pytorch_utils import Conv1D

from lora2 import LoRA2Layer

D_IN, D_OUT, K, R = 48, 80, 3, 6


def make_layer(kind: str = "linear", dtype=torch.float64, seed: int = 0) -> LoRA2Layer:
    torch.manual_seed(seed)
    base = nn.Linear(D_IN, D_OUT) if kind == "linear" else Conv1D(D_OUT, D_IN)
    if kind == "conv1d":
        nn.init.normal_(base.weight, std=0.2)
        nn.init.normal_(base.bias, std=0.2)
    layer = LoRA2Layer(base.to(dtype), k=K, r=R, alpha=12.0, init_std=0.3).to(dtype)
    with torch.no_grad():
        layer.lam.copy_(torch.randn(R, dtype=dtype))
        layer.mask.copy_(torch.tensor([1, 0, 1, 1, 0, 1], dtype=dtype))
    return layer


def dense_reference(layer: LoRA2Layer, x: torch.Tensor) -> torch.Tensor:
    """y = x W0ᵀ + b + s · x (P Λ Q), with P = v u and Q = 𝒰 𝒱 formed explicitly."""
    base = layer.base_layer
    w0_t = base.weight if isinstance(base, Conv1D) else base.weight.T  # (d_in, d_out)
    p = layer.p_outer @ layer.p_inner
    q = layer.q_inner @ layer.q_outer
    lam = torch.diag(layer.lam * layer.mask)
    return x @ w0_t + base.bias + layer.scaling * x @ (p @ lam @ q)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_forward_equals_dense_formula(kind):
    layer = make_layer(kind)
    x = torch.randn(3, 5, D_IN, dtype=torch.float64)
    torch.testing.assert_close(layer(x), dense_reference(layer, x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_output_equals_base_at_initialisation(kind):
    torch.manual_seed(0)
    base = nn.Linear(D_IN, D_OUT) if kind == "linear" else Conv1D(D_OUT, D_IN)
    layer = LoRA2Layer(base, k=K, r=R, alpha=16.0, init="gaussian")
    x = torch.randn(4, D_IN)
    assert torch.equal(layer(x), base(x))
    assert torch.count_nonzero(layer.get_delta_weight()) == 0
    assert layer.p_outer.std().item() == pytest.approx(0.02, rel=0.3)
    default = LoRA2Layer(base, k=K, r=R, alpha=16.0)  # orthogonal: Δ = 0 too, since lam starts at 0
    assert torch.equal(default(x), base(x)) and torch.count_nonzero(default.get_delta_weight()) == 0
    gram = default.p_outer.T @ default.p_outer
    assert torch.allclose(gram, torch.eye(K), atol=1e-5)


@pytest.mark.parametrize("k,r", [(1, 8), (3, 6), (8, 4)])
def test_orthogonal_init_starts_at_the_regularisers_target(k, r):
    """init='orthogonal': every factor's Gram over its smaller side is I (R_uv = R_UV = 0), R_PQ sits
    at its floor, and the update is still exactly zero because lam starts at zero."""
    from lora2.regularizer import layer_terms

    torch.manual_seed(0)
    base = nn.Linear(D_IN, D_OUT)
    layer = LoRA2Layer(base, k=k, r=r, alpha=16.0, init="orthogonal").double()
    for name in ("p_outer", "p_inner", "q_inner", "q_outer"):
        w = getattr(layer, name)
        gram = w.T @ w if w.shape[0] >= w.shape[1] else w @ w.T
        torch.testing.assert_close(gram, torch.eye(min(w.shape), dtype=torch.float64), atol=1e-6, rtol=0)
    terms = layer_terms(layer, ("uv", "UV", "PQ"))
    assert terms["uv"].item() == pytest.approx(0.0, abs=1e-10)
    assert terms["UV"].item() == pytest.approx(0.0, abs=1e-10)
    # PᵀP = p_innerᵀ p_inner (r×r) has min(k, r) unit eigenvalues: ‖PᵀP − I‖² = r − min(k, r), twice (P and Q)
    assert terms["PQ"].item() == pytest.approx(2 * (r - min(k, r)), abs=1e-6)
    x = torch.randn(4, D_IN, dtype=torch.float64)
    assert torch.equal(layer(x), layer.base_layer(x))
    assert torch.count_nonzero(layer.get_delta_weight()) == 0


def test_unknown_init_is_rejected():
    with pytest.raises(ValueError, match="orthogonal"):
        LoRA2Layer(nn.Linear(4, 4), k=1, r=2, alpha=2.0, init="xavier")


class AllocationRecorder(TorchDispatchMode):
    """Records the shape of every tensor an op allocates (outputs that share no input storage)."""

    def __init__(self) -> None:
        super().__init__()
        self.allocated: list[tuple[str, tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.allocated.append((str(func), tuple(t.shape)))
        return out


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_training_step_never_allocates_a_dense_update(kind):
    layer = make_layer(kind, dtype=torch.float32)
    layer.base_layer.requires_grad_(False)
    x = torch.randn(2, 3, D_IN)
    recorder = AllocationRecorder()
    with recorder:
        layer(x).square().sum().backward()
    assert recorder.allocated, "the recorder saw no op"
    biggest = max(torch.Size(s).numel() for _, s in recorder.allocated)
    assert biggest < D_IN * D_OUT, f"largest allocation {biggest} elements"
    assert layer.p_outer.grad is not None and layer.lam.grad is not None
    # the recorder does catch a dense update when one is formed
    with recorder:
        layer.get_delta_weight()
    assert any(sorted(s) == sorted((D_IN, D_OUT)) for _, s in recorder.allocated)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_merge_and_unmerge_are_exact(kind):
    layer = make_layer(kind)
    w0 = layer.base_layer.weight.detach().clone()
    x = torch.randn(7, D_IN, dtype=torch.float64)
    expected = layer(x)
    layer.merge()
    assert layer.merged
    torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)
    layer.merge()  # merging twice is a no-op
    torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)
    layer.unmerge()
    torch.testing.assert_close(layer.base_layer.weight, w0, rtol=0, atol=1e-14)
    torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_half_base_rounds_merge_and_forward_once(dtype):
    """W0 + s·Δ is formed in float32 and rounded once to the base dtype (PEFT's result); rounding s·Δ first
    put 16% of a bf16 weight's entries one ulp off."""
    torch.manual_seed(0)
    layer = LoRA2Layer(nn.Linear(64, 96), k=2, r=4, alpha=8.0)
    with torch.no_grad():
        for name in ("p_outer", "p_inner", "lam", "q_inner", "q_outer"):
            getattr(layer, name).normal_(0, 0.3)
    layer.to(dtype)
    assert layer.lam.dtype == torch.float32 and layer.base_layer.weight.dtype == dtype
    x = torch.randn(5, 64).to(dtype)
    w0 = layer.base_layer.weight.detach().clone()
    delta = layer.get_delta_weight()
    base_out = layer.base_layer(x)
    update = (x.float() @ layer.p_outer @ layer.core()) @ layer.q_outer
    assert torch.equal(layer(x), (base_out.float() + update).to(dtype))
    layer.merge()
    assert torch.equal(layer.base_layer.weight, (w0.float() + delta).to(dtype))
    layer.unmerge()
    assert torch.equal(layer.base_layer.weight, ((w0.float() + delta).to(dtype).float() - delta).to(dtype))


def test_delta_weight_layout_follows_the_base():
    lin, conv = make_layer("linear"), make_layer("conv1d")
    assert lin.get_delta_weight().shape == lin.base_layer.weight.shape == (D_OUT, D_IN)
    assert conv.get_delta_weight().shape == conv.base_layer.weight.shape == (D_IN, D_OUT)


def test_effective_rank_is_capped_by_k_and_active_values():
    layer = make_layer()
    assert layer.active_count() == 4
    assert layer.effective_rank() == min(K, 4) == int(torch.linalg.matrix_rank(layer.get_delta_weight()))
    with torch.no_grad():
        layer.mask.copy_(torch.tensor([0, 0, 1, 0, 0, 1], dtype=torch.float64))
    assert layer.effective_rank() == 2 == int(torch.linalg.matrix_rank(layer.get_delta_weight()))
    with torch.no_grad():
        layer.mask.zero_()
    assert layer.effective_rank() == 0


def test_unsupported_base_layer_is_rejected():
    with pytest.raises(TypeError, match="Embedding"):
        LoRA2Layer(nn.Embedding(10, 4), k=1, r=2, alpha=1.0)


def test_half_precision_base_keeps_float32_adapter():
    base = nn.Linear(D_IN, D_OUT).to(torch.bfloat16)
    layer = LoRA2Layer(base, k=K, r=R, alpha=8.0)
    assert layer.p_outer.dtype == torch.float32
    x = torch.randn(2, D_IN, dtype=torch.bfloat16)
    assert torch.equal(layer(x), base(x))  # Δ = 0 at initialisation, whatever the dtype
    with torch.no_grad():
        layer.lam.fill_(1.0)
    out = layer(x)
    assert out.dtype == torch.bfloat16
    expected = base(x).float() + (x.float() @ layer.p_outer) @ layer.core() @ layer.q_outer
    torch.testing.assert_close(out.float(), expected, rtol=2e-2, atol=2e-2)


# -- one source of the Δ math: LoRA2Factors ------------------------------------------------------
@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_factors_give_the_layers_delta_core_and_lora_form(kind):
    from lora2.factors import LoRA2Factors

    layer = make_layer(kind)
    f = layer.factors()
    assert isinstance(f, LoRA2Factors) and f.fan_in_fan_out == (kind == "conv1d") and f.scaling == layer.scaling
    assert not f.p_outer.requires_grad
    torch.testing.assert_close(f.core(), layer.core().detach(), rtol=0, atol=0)
    delta = layer.get_delta_weight().detach()
    torch.testing.assert_close(f.delta_weight(), delta, rtol=0, atol=0)
    pytorch_layout = delta.T if kind == "conv1d" else delta  # PEFT's B @ A is always d_out×d_in
    for exact in (False, True):
        a, b = f.as_lora(exact_rank=exact)
        assert a.shape[0] == (f.effective_rank() if exact else K)
        torch.testing.assert_close(b @ a, pytorch_layout, rtol=1e-10, atol=1e-12)
    saved = LoRA2Factors.from_tensors(f.tensors(), layer.scaling, f.fan_in_fan_out)
    assert saved.effective_rank() == layer.effective_rank() == 3
    torch.testing.assert_close(saved.to(torch.float32).delta_weight(), delta.float())


def test_set_mask_zeroes_pruned_lam_unless_restoring():
    layer = make_layer()
    lam = layer.lam.detach().clone()
    layer.set_mask(torch.tensor([1, 1, 0, 1, 0, 0], dtype=torch.float64))
    assert layer.mask.tolist() == [1, 1, 0, 1, 0, 0]
    assert torch.equal(layer.lam.detach(), lam * layer.mask)
    with torch.no_grad():
        layer.lam.copy_(lam)
    layer.set_mask(torch.ones(R, dtype=torch.float64), zero_pruned=False)
    layer.set_mask(torch.zeros(R, dtype=torch.float64), zero_pruned=False)  # a saved mask next to its saved lam
    assert torch.equal(layer.lam.detach(), lam) and layer.active_count() == 0
