"""method.md §4–5: importance scores, the cubic budget, exact-count pruning, frozen final mask, resume."""

from __future__ import annotations

import copy
import math
import warnings
from fractions import Fraction

import pytest
import torch
from torch import nn

from lora2 import LoRA2Config, LoRA2Layer, RankAllocator
from lora2.persistence import load_allocator_state, save_allocator_state


def make_layers(m: int, k: int, r: int, d: int = 7, seed: int = 0) -> list[LoRA2Layer]:
    torch.manual_seed(seed)
    return [LoRA2Layer(nn.Linear(d, d + i), k=k, r=r, alpha=1.0) for i in range(m)]


def set_state(layers, step: int, seed: int = 0, nan: bool = False) -> None:
    """Deterministic parameters and gradients for a given step (stands in for forward/backward/optimizer)."""
    gen = torch.Generator().manual_seed(seed * 100_003 + step)
    with torch.no_grad():
        for layer in layers:
            for name in ("p_outer", "p_inner", "lam", "q_inner", "q_outer"):
                p = getattr(layer, name)
                p.copy_(torch.randn(p.shape, generator=gen))
                p.grad = torch.randn(p.shape, generator=gen)
    if nan:
        layers[-1].q_inner.grad[0, 0] = float("nan")


def allocator(layers, **overrides) -> RankAllocator:
    fields = {"k": layers[0].k, "r": layers[0].r, "target_rank": 1, "init_warmup": 10, "final_warmup": 20,
              "mask_interval": 3, "total_step": 60, "beta1": 0.85, "beta2": 0.7}
    fields.update(overrides)
    return RankAllocator([f"m{i}" for i in range(len(layers))], layers, LoRA2Config(**fields))


def manual_scores(history, beta1, beta2):
    """Plain-Python EMA of s = |θ·g| over a list of (θ, g) float lists."""
    ema_i = [0.0] * len(history[0][0])
    ema_u = [0.0] * len(history[0][0])
    for theta, grad in history:
        for j, (t, g) in enumerate(zip(theta, grad, strict=True)):
            s = abs(t * g)
            ema_i[j] = beta1 * ema_i[j] + (1 - beta1) * s
            ema_u[j] = beta2 * ema_u[j] + (1 - beta2) * abs(s - ema_i[j])
    return [a * b for a, b in zip(ema_i, ema_u, strict=True)]


def test_reduced_importance_equals_the_formula_on_hand_made_tensors():
    k, r = 2, 3
    layers = make_layers(2, k, r)
    alloc = allocator(layers)
    hist: dict[tuple[int, str], list] = {}
    for step in (1, 2, 3):
        set_state(layers, step)
        for i, layer in enumerate(layers):
            for name in ("lam", "p_inner", "q_inner"):
                p = getattr(layer, name)
                hist.setdefault((i, name), []).append((p.detach().flatten().tolist(), p.grad.flatten().tolist()))
        alloc.update_scores(step)
    got = alloc.importance()
    for i in range(2):
        lam = manual_scores(hist[(i, "lam")], 0.85, 0.7)
        p_in = manual_scores(hist[(i, "p_inner")], 0.85, 0.7)  # row-major k×r
        q_in = manual_scores(hist[(i, "q_inner")], 0.85, 0.7)  # row-major r×k
        for sv in range(r):
            expected = lam[sv] + sum(p_in[j * r + sv] for j in range(k)) / k + sum(q_in[sv * k + j] for j in range(k)) / k
            assert got[i, sv].item() == pytest.approx(expected, rel=1e-5)


def test_full_importance_differs_by_a_per_matrix_constant():
    k, r = 2, 4
    reduced_layers = make_layers(3, k, r)
    full_layers = copy.deepcopy(reduced_layers)
    reduced, full = allocator(reduced_layers), allocator(full_layers, importance="full")
    outer_hist: dict[tuple[int, str], list] = {}
    for step in (1, 2):
        set_state(reduced_layers, step)
        set_state(full_layers, step)
        for i, layer in enumerate(full_layers):
            for name in ("p_outer", "q_outer"):
                p = getattr(layer, name)
                outer_hist.setdefault((i, name), []).append((p.detach().flatten().tolist(), p.grad.flatten().tolist()))
        reduced.update_scores(step)
        full.update_scores(step)
    diff = full.importance() - reduced.importance()
    for i in range(3):
        const = (sum(manual_scores(outer_hist[(i, "p_outer")], 0.85, 0.7))
                 + sum(manual_scores(outer_hist[(i, "q_outer")], 0.85, 0.7))) / k
        torch.testing.assert_close(diff[i], torch.full((r,), const), rtol=1e-4, atol=1e-7)
    assert diff[:, 0].std() > 0  # the constant differs between matrices, so global rankings can differ


def reference_budget(step, b0, bt, t_init, t_final, total):
    if step <= t_init:
        return b0
    if step > total - t_final:
        return bt
    frac = 1 - Fraction(step - t_init, total - t_init - t_final)
    return bt + math.floor((b0 - bt) * frac**3)


def test_budget_schedule_matches_spec_at_its_checkpoints():
    layers = make_layers(10, 1, 8)
    alloc = allocator(layers, target_rank=2, init_warmup=100, final_warmup=300, total_step=1000, mask_interval=1)
    assert (alloc.b0, alloc.b_target) == (80, 20)
    assert alloc.budget(100) == 80  # t_init
    assert alloc.budget(101) == 79
    assert alloc.budget(400) == 27  # mid-way: 20 + floor(60 · 0.5³) = 27
    assert alloc.budget(700) == 20  # T − t_final
    assert alloc.budget(701) == 20
    for step in range(1, 1001):
        assert alloc.budget(step) == reference_budget(step, 80, 20, 100, 300, 1000)
    assert [alloc.phase(s) for s in (100, 101, 700, 701)] == ["warmup", "pruning", "pruning", "final"]


def test_pruning_keeps_exactly_the_budget_and_freezes_the_final_mask():
    layers = make_layers(4, 2, 5)
    alloc = allocator(layers)  # b0 = 20, bT = 4, T = 60, t_init = 10, t_final = 20, Δt = 3
    final_mask = None
    for step in range(1, 61):
        set_state(layers, step)
        ema_before = alloc.ema_i.get("lam", torch.zeros(1)).clone()
        budget = alloc.update_and_allocate(step)
        masks = alloc.masks()
        if step <= 10:
            assert masks.sum().item() == 20
        elif alloc.is_mask_step(step):
            assert masks.sum().item() == budget == alloc.budget(step)
            lam = torch.stack([la.lam.detach() for la in layers])
            assert torch.count_nonzero(lam[masks == 0]) == 0  # pruned λ are zero
        if step > 40:
            final_mask = masks.clone() if final_mask is None else final_mask
            assert torch.equal(masks, final_mask)
            assert masks.sum().item() == 4
            assert torch.equal(alloc.ema_i["lam"], ema_before)  # scores stop updating
            lam = torch.stack([la.lam.detach() for la in layers])
            assert torch.count_nonzero(lam[masks == 0]) == 0
    assert alloc.is_mask_step(40) and alloc.budget(40) == 4


def test_pruning_keeps_the_highest_scores_and_breaks_ties_by_position():
    layers = make_layers(2, 1, 4)
    alloc = allocator(layers, init_warmup=0, final_warmup=0, total_step=10)
    for layer in layers:
        layer.lam.grad = torch.zeros(4)
        layer.p_inner.grad = torch.zeros(1, 4)
        layer.q_inner.grad = torch.zeros(4, 1)
    alloc.update_scores(1)
    alloc.mask_to_budget(3, step=1)  # all importances tie at 0
    assert alloc.masks().flatten().tolist() == [1, 1, 1, 0, 0, 0, 0, 0]
    alloc.ema_i["lam"] = torch.tensor([[1.0, 5.0, 2.0, 7.0], [3.0, 5.0, 0.5, 6.0]])
    alloc.ema_u["lam"] = torch.ones(2, 4)
    alloc.mask_to_budget(4, step=2)
    assert alloc.masks().tolist() == [[0, 1, 0, 1], [0, 1, 0, 1]]  # 7, 6, then the tie 5/5 both fit
    alloc.mask_to_budget(2, step=3)
    assert alloc.masks().tolist() == [[0, 0, 0, 1], [0, 0, 0, 1]]


def test_reduced_score_tracks_98_5_percent_fewer_entries():
    layer = LoRA2Layer(nn.Linear(768, 768), k=1, r=8, alpha=32.0)
    assert sum(p.numel() for p in (layer.p_outer, layer.p_inner, layer.lam, layer.q_inner, layer.q_outer)) == 1560
    reduced = RankAllocator(["q"], [layer], LoRA2Config())
    full = RankAllocator(["q"], [layer], LoRA2Config(importance="full"))
    assert (reduced.tracked_entries(), full.tracked_entries()) == (24, 1560)
    assert 1 - 24 / 1560 == pytest.approx(0.985, abs=5e-4)


def test_state_dict_resume_continues_identically(tmp_path):
    layers_a = make_layers(3, 2, 4)
    layers_b = copy.deepcopy(layers_a)
    full_run = allocator(layers_a, importance="full")
    first_half = allocator(layers_b, importance="full")
    for step in range(1, 26):  # stop in the pruning phase
        set_state(layers_a, step)
        full_run.update_and_allocate(step)
        set_state(layers_b, step)
        first_half.update_and_allocate(step)
    save_allocator_state(tmp_path, first_half.state_dict())
    layers_c = make_layers(3, 2, 4, seed=99)  # a fresh process: different init, masks all ones
    resumed = allocator(layers_c, importance="full")
    resumed.load_state_dict(load_allocator_state(tmp_path))
    assert torch.equal(resumed.masks(), full_run.masks())
    for step in range(26, 61):
        set_state(layers_a, step)
        full_run.update_and_allocate(step)
        set_state(layers_c, step)
        resumed.update_and_allocate(step)
        assert torch.equal(resumed.masks(), full_run.masks())
    for name in ("lam", "p_inner", "q_inner"):
        assert torch.equal(resumed.ema_i[name], full_run.ema_i[name])
        assert torch.equal(resumed.ema_u[name], full_run.ema_u[name])
    assert resumed.outer_u[2]["q_outer"].equal(full_run.outer_u[2]["q_outer"])
    assert (resumed.step, resumed.num_updates) == (60, 60)


def test_a_state_saved_for_another_schedule_or_config_is_refused_before_anything_moves():
    """A custom loop (accelerate's save_state/load_state) resuming with another total_step re-grew pruned values
    (the budget 9 → 15) and with another β or target rank changed the scores, without a word; only the 🤗 Trainer
    compared them."""
    layers = make_layers(3, 2, 4)
    alloc = allocator(layers)
    for step in range(1, 21):
        set_state(layers, step)
        alloc.update_and_allocate(step)
    state = alloc.state_dict()
    for overrides, message in (({"total_step": 80}, r"made for 60 optimizer steps, this run has total_step=80"),
                               ({"beta1": 0.5}, r"differs from the one the checkpoint was trained with \(beta1: 0.85 → 0.5\)"),
                               ({"target_rank": 2}, r"target_rank: 1 → 2")):
        other_layers = make_layers(3, 2, 4, seed=7)
        other = allocator(other_layers, **overrides)
        masks_before = other.masks().clone()
        with pytest.raises(ValueError, match=message):
            other.load_state_dict(state)
        assert torch.equal(other.masks(), masks_before) and other.step == 0  # nothing moved
    later = allocator(make_layers(3, 2, 4, seed=7), total_step=None)  # not known yet: checked when it is
    later.load_state_dict(state)
    with pytest.raises(ValueError, match=r"this run has max_steps=80"):
        later.check_resumable(later.resumed_from, 80, steps_name="max_steps")
    allocator(make_layers(3, 2, 4, seed=7)).load_state_dict(state)  # the same settings resume


def test_a_head_that_overflowed_skips_the_step_instead_of_looking_like_a_missed_optimizer_step():
    """fp16 GradScaler skips the optimizer step when any gradient overflowed, e.g. only the head's: λ is then
    unchanged with finite adapter gradients, which read as "no optimizer step in between"."""
    layers = make_layers(2, 2, 4)
    alloc = allocator(layers)
    head_grad = torch.ones(3)
    for step in range(1, 13):
        if step % 3 == 0:  # the scaler skipped: parameters as the previous call left them, the head's grad inf
            for layer in layers:
                layer.lam.grad = torch.randn(layer.lam.shape)
            head_grad = torch.full((3,), float("inf"))
        else:
            set_state(layers, step)
            head_grad = torch.ones(3)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            alloc.update_and_allocate(step, [head_grad])
        said = [w for w in caught if "outside the adapter" in str(w.message)]
        assert len(said) == (step == 3)  # the first skip is said, the later ones counted
    assert alloc.unchanged_lam_steps == [] and alloc.skipped_steps == 4


def test_a_loaded_state_is_copied_not_shared():
    """The EMAs update in place; a state kept in memory (an early-stopping snapshot) must not change under the
    caller once it is loaded, as with torch.optim's load_state_dict."""
    layers = make_layers(3, 2, 4)
    alloc = allocator(layers, importance="full")
    for step in range(1, 6):
        set_state(layers, step)
        alloc.update_and_allocate(step)
    snapshot = alloc.state_dict()
    kept = {name: t.clone() for name, t in snapshot["tensors"].items()}
    alloc.load_state_dict(snapshot)
    for step in range(6, 9):
        set_state(layers, step)
        alloc.update_and_allocate(step)
    assert not torch.equal(alloc.ema_i["lam"], kept["ema_i.lam"])  # the allocator did move on
    for name, t in snapshot["tensors"].items():
        assert torch.equal(t, kept[name]), name


def test_steps_that_never_reach_the_allocator_are_named_once():
    layers = make_layers(2, 1, 4)
    alloc = allocator(layers)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # consecutive steps: no warning
        for step in (1, 2):
            set_state(layers, step)
            alloc.update_and_allocate(step)
    set_state(layers, 5)
    with pytest.warns(RuntimeWarning, match=r"after step 2: steps 3-4 never reached the allocator"):
        alloc.update_and_allocate(5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once
        set_state(layers, 9)
        alloc.update_and_allocate(9)


def test_a_frozen_adapter_is_named_before_it_is_pruned_for_lack_of_gradients():
    layers = make_layers(3, 1, 4)
    layers[1].lam.requires_grad_(False)
    alloc = allocator(layers)
    set_state(layers, 1)
    with pytest.warns(RuntimeWarning, match=r"1 of 3 adapted matrices have a frozen lam .*e\.g\. m1"):
        alloc.update_and_allocate(1)


def test_a_run_whose_every_step_was_skipped_says_so_when_it_must_prune():
    layers = make_layers(2, 1, 4)
    alloc = allocator(layers, init_warmup=2, final_warmup=3, mask_interval=1, total_step=8)
    with pytest.warns(RuntimeWarning, match="non-finite gradient"):
        for step in range(1, 6):
            set_state(layers, step, nan=True)
            alloc.update_and_allocate(step)
    set_state(layers, 6)
    with pytest.raises(RuntimeError, match=r"all 5 steps before the final phase had non-finite gradients"):
        alloc.update_and_allocate(6)


def test_missing_total_step_is_a_clear_error():
    layers = make_layers(2, 1, 4)
    alloc = allocator(layers, total_step=None)
    set_state(layers, 1)
    with pytest.raises(ValueError, match="total_step is not set"):
        alloc.update_and_allocate(1)


def test_steps_must_increase():
    layers = make_layers(2, 1, 4)
    alloc = allocator(layers)
    set_state(layers, 1)
    alloc.update_and_allocate(1)
    with pytest.raises(ValueError, match="exactly once per optimizer step"):
        alloc.update_and_allocate(1)
    with pytest.raises(ValueError, match="integer >= 1"):
        alloc.update_and_allocate(0)


def test_non_finite_gradients_skip_the_step_with_a_warning():
    layers = make_layers(3, 1, 4)
    alloc = allocator(layers)
    set_state(layers, 1)
    alloc.update_and_allocate(1)
    before = {n: t.clone() for n, t in alloc.ema_i.items()}
    set_state(layers, 2, nan=True)  # e.g. an fp16 GradScaler overflow: the optimizer skipped this step too
    with pytest.warns(RuntimeWarning, match=r"non-finite gradient of q_inner in m2 at step 2"):
        alloc.update_and_allocate(2)
    assert alloc.skipped_steps == 1 and alloc.step == 2
    assert all(torch.equal(alloc.ema_i[n], before[n]) for n in before)


def test_non_finite_parameters_are_reported_with_step_and_matrix():
    layers = make_layers(3, 1, 4)
    alloc = allocator(layers)
    set_state(layers, 5)
    with torch.no_grad():
        layers[1].p_inner[0, 2] = float("inf")
    with pytest.raises(FloatingPointError, match=r"p_inner of m1 holds NaN/inf at step 1"):
        alloc.update_and_allocate(1)
    assert (alloc.step, alloc.num_updates) == (0, 0)  # nothing advanced: the state stays usable


def test_calling_after_zero_grad_is_refused():
    layers = make_layers(2, 1, 4)
    alloc = allocator(layers)
    set_state(layers, 1)
    for layer in layers:
        for p in layer.parameters():
            p.grad = None  # optimizer.zero_grad() (set_to_none) ran first
    with pytest.raises(ValueError, match=r"before optimizer\.zero_grad"):
        alloc.update_and_allocate(1)
    set_state(layers, 1)
    for layer in layers:
        for name in ("p_outer", "p_inner", "lam", "q_inner", "q_outer"):
            getattr(layer, name).grad.zero_()  # zero_grad(set_to_none=False)
    with pytest.warns(RuntimeWarning, match="every gradient of lam is zero"):
        alloc.update_and_allocate(1)


def test_no_pruning_when_target_equals_r():
    layers = make_layers(2, 1, 4)
    alloc = allocator(layers, target_rank=4, total_step=None)
    assert not alloc.prunes
    set_state(layers, 1)
    assert alloc.update_and_allocate(1) is None
    assert alloc.masks().sum().item() == 8 and not alloc.ema_i


def test_masks_change_only_through_the_layers_set_mask(monkeypatch):
    """The allocator never writes a layer's buffers itself: every mask change is LoRA2Layer.set_mask
    (which also zeroes the pruned lam), and a restored state goes through it without touching lam."""
    layers = make_layers(3, 2, 4)
    alloc = allocator(layers)
    calls: list[tuple[int, bool]] = []
    original = LoRA2Layer.set_mask

    def spy(self, row, zero_pruned=True):
        calls.append((id(self), zero_pruned))
        original(self, row, zero_pruned)

    monkeypatch.setattr(LoRA2Layer, "set_mask", spy)
    for step in range(1, 61):
        set_state(layers, step)
        before, n_calls = alloc.masks().clone(), len(calls)
        alloc.update_and_allocate(step)
        assert alloc.masks_recomputed == alloc.is_mask_step(step)
        rewritten = {i for i, _ in calls[n_calls:]}
        for layer, old, new in zip(layers, before, alloc.masks(), strict=True):
            assert torch.equal(old, new) or id(layer) in rewritten, step
        if alloc.masks_recomputed or alloc.phase(step) == "final":
            lam = torch.stack([la.lam.detach() for la in layers])
            assert torch.count_nonzero(lam[alloc.masks() == 0]) == 0  # set_mask zeroed what it pruned
    assert calls and all(zero for _, zero in calls)
    fresh = allocator(make_layers(3, 2, 4, seed=5))
    lam = [la.lam.detach().clone() for la in fresh.layers]
    calls.clear()
    fresh.load_state_dict(alloc.state_dict())
    assert calls == [(id(la), False) for la in fresh.layers]  # restored as saved, lam untouched
    assert all(torch.equal(la.lam.detach(), v) for la, v in zip(fresh.layers, lam, strict=True))
    assert torch.equal(fresh.masks(), alloc.masks())
    assert fresh.active_counts() == [int(c) for c in alloc.masks().sum(1).tolist()]
    assert sum(fresh.active_counts()) == fresh.b_target == 3
