"""SPEC §3: each regulariser term against its definition, switchable, and added to the loss."""

from __future__ import annotations

import pytest
import torch

from lora2 import LoRA2Config, get_lora2_model
from lora2.regularizer import layer_terms, orth_regularization

from .conftest import BERT_TARGETS, randomize_adapters, tiny_bert
from .test_layer import make_layer


def frob2(m: torch.Tensor) -> torch.Tensor:
    return (m**2).sum()


def test_terms_match_their_definitions():
    layer = make_layer()  # d_in=48, k=3, r=6, d_out=80: p_outer tall, p_inner wide, q_inner tall, q_outer wide
    eye_k = torch.eye(3, dtype=torch.float64)
    eye_r = torch.eye(6, dtype=torch.float64)
    p = layer.p_outer @ layer.p_inner
    q = layer.q_inner @ layer.q_outer
    expected = {
        "uv": frob2(layer.p_outer.T @ layer.p_outer - eye_k) + frob2(layer.p_inner @ layer.p_inner.T - eye_k),
        "UV": frob2(layer.q_inner.T @ layer.q_inner - eye_k) + frob2(layer.q_outer @ layer.q_outer.T - eye_k),
        "PQ": frob2(p.T @ p - eye_r) + frob2(q @ q.T - eye_r),
    }
    got = layer_terms(layer, ["uv", "UV", "PQ"])
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, rtol=1e-10, atol=1e-10)
    assert set(layer_terms(layer, ["UV"])) == {"UV"}


def _orthonormal_factors(layer, k, r):
    with torch.no_grad():
        layer.p_outer.copy_(torch.linalg.qr(torch.randn(layer.d_in, k, dtype=torch.float64)).Q)
        layer.q_outer.copy_(torch.linalg.qr(torch.randn(layer.d_out, k, dtype=torch.float64)).Q.T)
        layer.p_inner.copy_(torch.linalg.qr(torch.randn(r, k, dtype=torch.float64)).Q.T)  # k×r, orthonormal rows
        layer.q_inner.copy_(torch.linalg.qr(torch.randn(r, k, dtype=torch.float64)).Q)  # r×k, orthonormal columns


def test_orthonormal_factors_reach_zero_except_the_pq_floor():
    layer = make_layer()  # k=3 < r=6
    _orthonormal_factors(layer, 3, 6)
    terms = layer_terms(layer, ["uv", "UV", "PQ"])
    assert terms["uv"].item() == pytest.approx(0, abs=1e-10)
    assert terms["UV"].item() == pytest.approx(0, abs=1e-10)
    # PᵀP is a rank-k projection in R^{r×r}: its floor is r − k for each of the two terms
    assert terms["PQ"].item() == pytest.approx(2 * (6 - 3), abs=1e-9)


def test_model_loss_includes_gamma_times_r():
    base = tiny_bert()
    cfg = LoRA2Config(k=2, r=4, target_modules=BERT_TARGETS, orth_reg_weight=0.3)
    model = get_lora2_model(base, cfg)
    randomize_adapters(model)
    ids = torch.randint(0, 120, (3, 9))
    labels = torch.tensor([0, 1, 1])
    model.train()
    torch.manual_seed(0)
    out = model(input_ids=ids, labels=labels)
    torch.manual_seed(0)
    plain = model.base_model(input_ids=ids, labels=labels).loss
    reg = orth_regularization(model.lora2_layers.values(), ["uv", "UV", "PQ"])
    torch.testing.assert_close(out.loss, plain + 0.3 * reg)
    torch.testing.assert_close(model.orth_regularization(), reg)
    per_layer = [sum(layer_terms(la, ["uv", "UV", "PQ"]).values()) for la in model.lora2_layers.values()]
    torch.testing.assert_close(reg, torch.stack(per_layer).mean())
    out.loss.backward()
    assert all(la.p_outer.grad is not None for la in model.lora2_layers.values())


@pytest.mark.parametrize("terms", [[], ["uv"], ["UV"], ["PQ"], ["uv", "UV"]])
def test_terms_are_switchable(terms):
    model = get_lora2_model(tiny_bert(), LoRA2Config(k=1, r=4, target_modules=["query"], orth_terms=terms))
    randomize_adapters(model)
    layers = list(model.lora2_layers.values())
    expected = sum(sum(layer_terms(la, terms).values()) for la in layers) / len(layers) if terms else 0.0
    torch.testing.assert_close(model.orth_regularization(), torch.as_tensor(expected, dtype=torch.float32))


def test_evaluation_loss_is_the_task_loss_alone():
    model = get_lora2_model(tiny_bert(), LoRA2Config(k=1, r=4, target_modules=["query"], orth_reg_weight=0.5))
    randomize_adapters(model)
    model.eval()
    ids = torch.randint(0, 120, (2, 5))
    out = model(input_ids=ids, labels=torch.tensor([0, 1]))
    torch.testing.assert_close(out.loss, model.base_model(input_ids=ids, labels=torch.tensor([0, 1])).loss)


def test_zero_weight_leaves_the_loss_alone():
    model = get_lora2_model(tiny_bert(), LoRA2Config(k=1, r=4, target_modules=["query"], orth_reg_weight=0.0))
    model.train()
    ids = torch.randint(0, 120, (2, 5))
    torch.manual_seed(0)
    out = model(input_ids=ids, labels=torch.tensor([0, 1]))
    torch.manual_seed(0)
    torch.testing.assert_close(out.loss, model.base_model(input_ids=ids, labels=torch.tensor([0, 1])).loss)
