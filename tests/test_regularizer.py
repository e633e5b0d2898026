"""method.md §3: each regulariser term against its definition, switchable, and added to the loss."""

from __future__ import annotations

import pytest
import torch

from lora2 import LoRA2Config, get_lora2_model
from lora2.regularizer import layer_terms, orth_regularization, orth_term_means

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


# -- pq_form="rank": only the singular values P and Q can have are asked to be 1 ----------------------
def brute_force_rank_pq(layer) -> torch.Tensor:
    """Σ over the top m = min(k, r) singular values of the dense P and Q of (σ² − 1)²."""
    m = min(layer.k, layer.r)
    p = (layer.p_outer @ layer.p_inner).detach().double()
    q = (layer.q_inner @ layer.q_outer).detach().double()
    return sum(((torch.linalg.svdvals(x)[:m] ** 2 - 1) ** 2).sum() for x in (p, q))


@pytest.mark.parametrize(("k", "r"), [(1, 8), (3, 6), (4, 4), (8, 4)])
def test_rank_form_is_zero_at_an_orthogonal_init(k, r):
    from torch import nn

    from lora2 import LoRA2Layer

    torch.manual_seed(0)
    layer = LoRA2Layer(nn.Linear(48, 80), k=k, r=r, alpha=16.0, init="orthogonal").double()
    assert layer_terms(layer, ["PQ"], pq_form="rank")["PQ"].item() == pytest.approx(0.0, abs=1e-10)
    literal = layer_terms(layer, ["PQ"])["PQ"].item()
    assert literal == pytest.approx(2 * max(r - k, 0), abs=1e-9)  # the literal form sits at its floor


def test_rank_form_is_the_literal_form_minus_its_floor_at_orthonormal_factors():
    layer = make_layer()  # k=3 < r=6
    _orthonormal_factors(layer, 3, 6)
    assert layer_terms(layer, ["PQ"])["PQ"].item() == pytest.approx(2 * (6 - 3), abs=1e-9)
    assert layer_terms(layer, ["PQ"], pq_form="rank")["PQ"].item() == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize(("k", "r", "seed"), [(1, 8, 0), (3, 6, 1), (2, 2, 2), (5, 3, 3), (4, 7, 4)])
def test_rank_form_matches_the_dense_singular_values_on_random_factors(k, r, seed):
    from torch import nn

    from lora2 import LoRA2Layer

    torch.manual_seed(seed)
    layer = LoRA2Layer(nn.Linear(24, 40), k=k, r=r, alpha=1.0, init_std=0.7).double()
    rank = layer_terms(layer, ["PQ"], pq_form="rank")["PQ"]
    torch.testing.assert_close(rank, brute_force_rank_pq(layer), rtol=1e-9, atol=1e-9)
    literal = layer_terms(layer, ["PQ"])["PQ"]
    torch.testing.assert_close(rank, literal - 2 * max(r - k, 0), rtol=1e-9, atol=1e-9)  # (r − k) per side


@pytest.mark.parametrize(("k", "r"), [(1, 8), (3, 8), (5, 6)])
def test_rank_and_literal_forms_give_the_same_gradients_at_every_k(k, r):
    """PᵀP has rank ≤ k, so the literal form is the rank form plus the constant r − k per side: the choice
    changes the logged value, never the update (method.md §3)."""
    from torch import nn

    from lora2 import LoRA2Layer

    torch.manual_seed(k)
    layer = LoRA2Layer(nn.Linear(24, 40), k=k, r=r, alpha=1.0).double()
    factors = [layer.p_outer, layer.p_inner, layer.q_inner, layer.q_outer]
    with torch.no_grad():
        for f in factors:  # far from any orthonormal point, so the gradients are large
            f.copy_(0.7 * torch.randn_like(f))
    grads = {}
    for form in ("literal", "rank"):
        grads[form] = torch.autograd.grad(layer_terms(layer, ["PQ"], pq_form=form)["PQ"], factors)
    assert all(g.abs().max() > 1e-3 for g in grads["rank"])  # a real gradient, not zeros on both sides
    for lit, rank in zip(grads["literal"], grads["rank"], strict=True):
        torch.testing.assert_close(lit, rank, rtol=1e-9, atol=1e-9)


def test_rank_form_in_the_model_loss_is_batched_over_matrices():
    model = get_lora2_model(tiny_bert(), LoRA2Config(k=2, r=4, target_modules=BERT_TARGETS, pq_form="rank"))
    randomize_adapters(model)
    layers = list(model.lora2_layers.values())
    expected = torch.stack([brute_force_rank_pq(la) for la in layers]).mean()
    means = orth_term_means(layers, ["PQ"], pq_form="rank")
    torch.testing.assert_close(means["PQ"].double(), expected, rtol=1e-5, atol=1e-6)
    full = model.orth_regularization()
    torch.testing.assert_close(full, orth_regularization(layers, ["uv", "UV", "PQ"], "rank"))
    assert full.item() < orth_regularization(layers, ["uv", "UV", "PQ"]).item()  # it drops the floor


# -- each term logged apart, from the forward that computed R ------------------------------------
def test_last_orth_terms_come_from_the_same_forward(monkeypatch):
    import lora2.model

    model = get_lora2_model(tiny_bert(), LoRA2Config(k=2, r=4, target_modules=BERT_TARGETS, orth_reg_weight=0.3))
    randomize_adapters(model)
    assert model.last_orth_terms == {} and model.last_orth_reg is None
    calls = []
    original = lora2.model.orth_term_means
    monkeypatch.setattr(lora2.model, "orth_term_means", lambda *a, **k: calls.append(1) or original(*a, **k))
    model.train()
    ids, labels = torch.randint(0, 120, (3, 9)), torch.tensor([0, 1, 1])
    torch.manual_seed(0)
    out = model(input_ids=ids, labels=labels)
    assert len(calls) == 1  # one computation per forward gives both R and its terms
    terms = model.last_orth_terms
    assert list(terms) == ["uv", "UV", "PQ"] and all(isinstance(v, float) for v in terms.values())
    layers = list(model.lora2_layers.values())
    for name, value in terms.items():
        expected = torch.stack([layer_terms(la, [name])[name] for la in layers]).mean()
        assert value == pytest.approx(expected.item(), rel=1e-5)  # mean over matrices, γ not applied
    assert sum(terms.values()) == pytest.approx(model.last_orth_reg.item(), rel=1e-5)
    torch.manual_seed(0)
    plain = model.base_model(input_ids=ids, labels=labels).loss
    torch.testing.assert_close(out.loss, plain + 0.3 * model.last_orth_reg)
