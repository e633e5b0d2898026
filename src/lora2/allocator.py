"""Rank allocator: importance of singular values (method.md §4) and the global cubic budget (method.md §5).

The reduced score needs EMAs of ``lam``, ``p_inner`` and ``q_inner`` only; they are kept stacked
over the M adapted matrices ((M, r), (M, k, r), (M, r, k)) so one update is a handful of
vectorised ops whatever M is. Pruning keeps exactly b(t) singular values: a stable descending
sort of all M·r importances, ties broken by position, never a ``<= threshold`` rule.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence

import torch

from .config import LoRA2Config
from .layer import LoRA2Layer


def _finite(grad: torch.Tensor) -> torch.Tensor:
    """Whether every entry is finite, as one float64 sum (a NaN or ±inf anywhere makes it non-finite; finite
    float32/16 values cannot overflow it): no tensor-sized mask for a large head, and sparse gradients (an
    Embedding(sparse=True)) work. MPS has no float64: the elementwise check there."""
    values = grad.coalesce().values() if grad.is_sparse else grad
    if values.device.type == "mps":
        return torch.isfinite(values).all()
    return torch.isfinite(values.sum(dtype=torch.float64))


INNER = ("lam", "p_inner", "q_inner")
OUTER = ("p_outer", "q_outer")


class RankAllocator:
    """Owns the sensitivity statistics and decides which singular values stay active."""

    def __init__(self, names: Sequence[str], layers: Sequence[LoRA2Layer], config: LoRA2Config) -> None:
        if len(names) != len(layers) or not layers:
            raise ValueError("RankAllocator needs one name per LoRA² layer and at least one layer.")
        self.names = list(names)
        self.layers = list(layers)
        self.config = config
        self.b0, self.b_target = config.budgets(len(layers))
        self.step = 0  # last optimizer step seen
        self.num_updates = 0
        self.skipped_steps = 0  # steps whose gradients were non-finite (fp16 overflow) and were not used
        self.ema_i: dict[str, torch.Tensor] = {}
        self.ema_u: dict[str, torch.Tensor] = {}
        self.outer_i: list[dict[str, torch.Tensor]] = []  # "full" importance only: per-layer shapes differ
        self.outer_u: list[dict[str, torch.Tensor]] = []
        # True when the last update_and_allocate rebuilt the masks: a mask step, or the final phase forcing bT.
        self.masks_recomputed = False
        # An adapter loaded already pruned to train further: its masks are kept (applied each step), never re-grown.
        self.frozen = False
        self.resumed_from: dict[str, object] | None = None  # total_step and config of the state last loaded
        self._warned_gap = self._warned_frozen = False
        self._last_lam: torch.Tensor | None = None  # λ as the last call left it (no-optimizer-step check)
        self.unchanged_lam_steps: list[int] = []  # steps whose call found λ unchanged since the previous one

    # -- schedule -----------------------------------------------------------------------------
    @property
    def prunes(self) -> bool:
        """False when the target budget equals the initial one (nothing to allocate) or the masks are frozen."""
        return self.b_target < self.b0 and not self.frozen

    def _total_step(self) -> int:
        total = self.config.total_step
        if total is None:
            raise ValueError(
                "LoRA2Config.total_step is not set, so the budget schedule is undefined. Set total_step to the "
                "number of optimizer steps, or train with lora2.LoRA2Callback(), which takes it from the Trainer."
            )
        return total

    def phase(self, step: int) -> str:
        """'warmup' (t ≤ t_init), 'pruning' (t_init < t ≤ T − t_final) or 'final'."""
        total = self._total_step()
        if step <= self.config.init_warmup:
            return "warmup"
        if step > total - self.config.final_warmup:
            return "final"
        return "pruning"

    def budget(self, step: int) -> int:
        """b(t) of method.md §5, in exact integer arithmetic so the floor never drifts by one."""
        cfg = self.config
        phase = self.phase(step)
        if phase == "warmup":
            return self.b0
        if phase == "final":
            return self.b_target
        span = self._total_step() - cfg.init_warmup - cfg.final_warmup
        left = span - (step - cfg.init_warmup)
        return self.b_target + ((self.b0 - self.b_target) * left**3) // span**3

    def is_mask_step(self, step: int) -> bool:
        """Prune every Δt steps in the pruning phase, and always at T − t_final so that bT holds."""
        if self.phase(step) != "pruning":
            return False
        return step % self.config.mask_interval == 0 or step == self._total_step() - self.config.final_warmup

    # -- statistics ---------------------------------------------------------------------------
    def tracked_entries(self) -> int:
        """How many parameter entries get a sensitivity each step (the paper's 98.5% claim)."""
        n = sum(getattr(layer, name).numel() for layer in self.layers for name in INNER)
        if self.config.importance == "full":
            n += sum(getattr(layer, name).numel() for layer in self.layers for name in OUTER)
        return n

    @property
    def device(self) -> torch.device:
        """Where the statistics live: the first adapted matrix's device. A model spread over several devices
        (``device_map="auto"``) has its per-matrix tensors gathered here; on one device every move is a no-op."""
        return self.layers[0].lam.device

    def _sensitivity(self, params: list[torch.Tensor]) -> torch.Tensor:
        home = self.device
        theta = torch.stack([p.detach().to(home) for p in params]).float()
        grad = torch.stack([(p.grad if p.grad is not None else torch.zeros_like(p)).to(home) for p in params]).float()
        return (theta * grad).abs_()

    def _warn_about_gaps_and_frozen_layers(self, step: int, phase: str) -> None:
        """Once each: steps that never reached the allocator (a loop calling it every few steps misses pruning
        steps and the schedule then catches up in one cut), and adapters frozen by the user, whose zero gradients
        read as zero importance, so they are pruned first and their λ zeroed."""
        if not self._warned_gap and self.num_updates > 0 and step > self.step + 1 and phase != "final":
            self._warned_gap = True
            warnings.warn(
                f"update_and_allocate(step={step}) after step {self.step}: steps {self.step + 1}-{step - 1} never "
                "reached the allocator, so their importance is missing and pruning steps in between are skipped (the "
                "budget then drops in one cut). Call it once per optimizer step.",
                RuntimeWarning, stacklevel=4,
            )
        if not self._warned_frozen and phase != "final":
            frozen = [n for n, layer in zip(self.names, self.layers, strict=True) if not layer.lam.requires_grad]
            if frozen:
                self._warned_frozen = True
                warnings.warn(
                    f"{len(frozen)} of {len(self.names)} adapted matrices have a frozen lam (requires_grad=False), "
                    f"e.g. {frozen[0]}: without gradients their importance decays to 0, so the allocator prunes them "
                    "first and zeroes their lam. Unfreeze them, or leave those modules out of target_modules.",
                    RuntimeWarning, stacklevel=4,
                )

    def check_gradients(self, step: int, extra_grads: Sequence[torch.Tensor] = ()) -> bool:
        """Validate the tracked entries before using them. False: skip this step (non-finite gradients,
        e.g. an fp16 GradScaler overflow that also skipped the optimizer step). Raises on NaN/inf
        parameters and when no gradient exists at all (called after zero_grad)."""
        names = INNER + (OUTER if self.config.importance == "full" else ())
        params = {n: [getattr(layer, n) for layer in self.layers] for n in names}
        if all(p.grad is None for ps in params.values() for p in ps):
            raise ValueError(
                f"update_and_allocate(step={step}) found no gradients: call it after optimizer.step() and before "
                "optimizer.zero_grad(), while the gradients of this step still exist."
            )
        # One batched check and one host sync in the common case; the loops only run to name a culprit.
        home = self.device
        values = [p.detach().reshape(-1).to(home) for ps in params.values() for p in ps]
        grads = [p.grad.reshape(-1).to(home) for ps in params.values() for p in ps if p.grad is not None]
        lam_grads = [p.grad.reshape(-1).to(home) for p in params["lam"] if p.grad is not None]
        no = torch.zeros((), dtype=torch.bool, device=home)
        lam_now = torch.cat([p.detach().reshape(-1).to(home) for p in params["lam"]])
        last = self._last_lam
        yes = torch.ones((), dtype=torch.bool, device=home)
        others = torch.stack([_finite(g).to(home) for g in extra_grads]).all() if extra_grads else yes
        flags = torch.stack([torch.isfinite(torch.cat(values)).all(), torch.isfinite(torch.cat(grads)).all(),
                             torch.cat(lam_grads).any() if lam_grads else no,
                             (lam_now == last).all() if last is not None and last.shape == lam_now.shape else no,
                             others])
        values_finite, grads_finite, lam_nonzero, lam_unchanged, others_finite = flags.tolist()
        if not values_finite:
            for name, ps in params.items():
                for layer_name, p in zip(self.names, ps, strict=True):
                    if not bool(torch.isfinite(p.detach()).all()):
                        low = p.dtype in (torch.float16, torch.bfloat16)
                        raise FloatingPointError(
                            f"{name} of {layer_name} holds NaN/inf at step {step}: training has diverged. "
                            + (f"The adapter is in {p.dtype} (set after wrapping?): train it in float32. " if low else "")
                            + "Lower the learning rate or enable gradient clipping; the allocator refuses to build a "
                            "mask from it."
                        )
        if not grads_finite:
            for name, ps in params.items():
                bad = [ln for ln, p in zip(self.names, ps, strict=True)
                       if p.grad is not None and not bool(torch.isfinite(p.grad).all())]
                if bad:
                    self._skip_step(f"non-finite gradient of {name} in {bad[0]} at step {step}")
                    return False
        if grads_finite and not others_finite:  # the head overflowed: a GradScaler skipped the optimizer step
            self._skip_step(f"non-finite gradient outside the adapter (a modules_to_save part) at step {step}")
            return False
        if not lam_nonzero:
            warnings.warn(
                f"update_and_allocate(step={step}): every gradient of lam is zero. If zero_grad() ran before this call, "
                "importance is meaningless and pruning would follow position; call it before zero_grad(). (Reentrant "
                "gradient checkpointing on a model whose inputs do not require grad does the same: LoRA2Model's forward "
                "turns that on for 🤗 models; a custom model needs its first block's input to require grad.)",
                RuntimeWarning, stacklevel=4,
            )
        if lam_unchanged and any(p.requires_grad for p in params["lam"]):
            self._note_unchanged_lam(step)
        return True

    def _skip_step(self, what: str) -> None:
        """Count a step whose statistics are skipped; say so the first time (an fp16 GradScaler backs off every
        few thousand steps for a whole run: one line each would be noise; ``skipped_steps`` keeps the count)."""
        self.skipped_steps += 1
        if self.skipped_steps == 1:
            warnings.warn(f"LoRA² allocator: {what}; the step's statistics are skipped (expected when an fp16 "
                          "GradScaler skips an optimizer step). Later skips are counted in allocator.skipped_steps, "
                          "not said again.", RuntimeWarning, stacklevel=5)

    def _note_unchanged_lam(self, step: int) -> None:
        """λ bit-for-bit as the previous call left it: no optimizer step came in between (a loop calling this per
        micro-batch inside accelerate's ``accumulate()``, whose optimizer.step() is a no-op there, or twice per
        step). Once is allowed (a warm-up starting at lr 0); the third time is said, once."""
        self.unchanged_lam_steps.append(step)
        if len(self.unchanged_lam_steps) == 3:
            listed = ", ".join(map(str, self.unchanged_lam_steps))
            warnings.warn(
                f"update_and_allocate() found every lam unchanged since its previous call at steps {listed}: no "
                "optimizer step came in between, so the schedule runs ahead of training and importance averages "
                "count the same gradients again. Call it once per optimizer step, after optimizer.step(): under "
                "accelerate's accumulate(), only when accelerator.sync_gradients is True; with gradient accumulation, "
                "with the optimizer step number, not per micro-batch. (An fp16 GradScaler that skipped those steps "
                "for an overflow in parameters LoRA² does not see does the same; then ignore this.)",
                RuntimeWarning, stacklevel=4,
            )

    def _remember_lam(self) -> None:
        """λ as this call leaves it (after pruning zeroed some), for the next call's no-optimizer-step check."""
        home = self.device
        self._last_lam = torch.cat([layer.lam.detach().reshape(-1).to(home) for layer in self.layers])

    @staticmethod
    def _ema(ema_i: torch.Tensor, ema_u: torch.Tensor, s: torch.Tensor, beta1: float, beta2: float) -> None:
        ema_i.mul_(beta1).add_(s, alpha=1 - beta1)
        ema_u.mul_(beta2).add_((s - ema_i).abs_(), alpha=1 - beta2)

    @torch.no_grad()
    def update_scores(self, step: int) -> None:
        """One EMA step of Ī and Ū for every tracked entry (method.md §4)."""
        b1, b2 = self.config.beta1, self.config.beta2
        for name in INNER:
            s = self._sensitivity([getattr(layer, name) for layer in self.layers])
            if name not in self.ema_i:
                self.ema_i[name] = torch.zeros_like(s)
                self.ema_u[name] = torch.zeros_like(s)
            self._ema(self.ema_i[name], self.ema_u[name], s, b1, b2)
        if self.config.importance != "full":
            return
        if not self.outer_i:
            self.outer_i = [{n: torch.zeros_like(getattr(la, n), dtype=torch.float32) for n in OUTER} for la in self.layers]
            self.outer_u = [{n: torch.zeros_like(getattr(la, n), dtype=torch.float32) for n in OUTER} for la in self.layers]
        for idx, layer in enumerate(self.layers):
            for name in OUTER:
                p = getattr(layer, name)
                s = (p.detach().float() * (p.grad.float() if p.grad is not None else 0.0)).abs()
                self._ema(self.outer_i[idx][name], self.outer_u[idx][name], s, b1, b2)

    def importance(self) -> torch.Tensor:
        """(M, r) importance of every singular value: reduced (Eq. 9) or full (Eq. 8)."""
        if not self.ema_i:
            if self.skipped_steps:
                raise RuntimeError(
                    f"No importance scores: all {self.skipped_steps} steps before the final phase had non-finite "
                    "gradients and were skipped (an fp16 GradScaler that never found a usable scale, or a diverged "
                    "run), so there is nothing to prune by. Check the loss scale and the learning rate."
                )
            raise RuntimeError("No sensitivities yet: call update_and_allocate after at least one backward pass.")
        score = {n: self.ema_i[n] * self.ema_u[n] for n in INNER}
        imp = score["lam"] + score["p_inner"].mean(dim=1) + score["q_inner"].mean(dim=2)
        if self.config.importance == "full":
            k = self.config.k
            const = torch.stack([
                (sum((self.outer_i[i][n] * self.outer_u[i][n]).sum() for n in OUTER) / k).to(imp.device)
                for i in range(len(self.layers))
            ])
            imp = imp + const[:, None]
        return imp

    # -- masks --------------------------------------------------------------------------------
    def masks(self) -> torch.Tensor:
        home = self.device
        return torch.stack([layer.mask.to(home) for layer in self.layers])

    def active_counts(self) -> list[int]:
        """Active singular values per matrix, in ``names`` order (one host sync, no decomposition)."""
        return [int(c) for c in self.masks().sum(dim=1).tolist()]

    def set_masks(self, masks: torch.Tensor) -> None:
        """One row per matrix, through ``LoRA2Layer.set_mask`` (which also zeroes pruned lam)."""
        for layer, row in zip(self.layers, masks, strict=True):
            layer.set_mask(row)

    def apply_masks(self) -> None:
        """Re-zero the lam of pruned singular values (the forward also multiplies by the mask)."""
        self.set_masks(self.masks())

    @torch.no_grad()
    def mask_to_budget(self, budget: int, step: int) -> None:
        imp = self.importance()
        if not bool(torch.isfinite(imp).all()):
            raise FloatingPointError(f"Non-finite importance score at step {step}; refusing to prune on it.")
        order = torch.sort(imp.flatten(), descending=True, stable=True).indices
        keep = torch.zeros(imp.numel(), dtype=self.layers[0].mask.dtype, device=imp.device)
        keep[order[:budget]] = 1
        self.set_masks(keep.view_as(imp))  # each row is copied to its layer's device

    def update_and_allocate(self, step: int, extra_grads: Sequence[torch.Tensor] = ()) -> int | None:
        """Run once per optimizer step (after backward, before zero_grad). Returns b(t) or None. ``extra_grads``:
        gradients of the other trained parameters (a head); a non-finite one means the optimizer step was
        skipped (fp16 GradScaler), so the step's statistics are too."""
        if not isinstance(step, int) or isinstance(step, bool) or step < 1:
            raise ValueError(f"update_and_allocate expects the optimizer step as an integer >= 1, got {step!r}.")
        if step <= self.step:
            raise ValueError(
                f"update_and_allocate(step={step}) after step {self.step}: it must run exactly once per optimizer "
                "step with increasing step numbers (is it called both in your loop and by LoRA2Callback, or once per "
                "micro-batch under gradient accumulation?)."
            )
        if self.prunes and self.num_updates == 0 and step > 1:
            raise RuntimeError(
                f"update_and_allocate(step={step}) is this allocator's first call: steps 1-{step - 1} never reached it, "
                "so its place in the schedule and its importance averages are missing (a run resumed from "
                "model.state_dict() or accelerate's save_state without the allocator?). Save model.allocator.state_dict() "
                "with your checkpoint and load_state_dict() it on resume (accelerate: "
                "accelerator.register_for_checkpointing(model.allocator)); a new run counts its steps from 1."
            )
        if self.prunes:  # once per step, not in every phase/budget lookup; also catches total_step set after wrapping
            self.config.check_schedule(self._total_step())
        if self.prunes and step > self._total_step():
            raise ValueError(
                f"update_and_allocate(step={step}) beyond total_step={self.config.total_step}: the budget schedule is "
                "over, so a longer run would have compressed it. With gradient accumulation call it once per optimizer "
                "step (not per micro-batch) with the optimizer step number; to train longer, set total_step to the "
                "number of optimizer steps you train."
            )
        self.masks_recomputed = False
        if not self.prunes:
            self.step, self.num_updates = step, self.num_updates + 1
            if self.frozen:
                with torch.no_grad():
                    self.apply_masks()  # momentum may move a pruned lam; keep exports clean
            return None
        phase = self.phase(step)
        self._warn_about_gaps_and_frozen_layers(step, phase)
        usable = phase == "final" or self.check_gradients(step, extra_grads)  # validate before any state changes
        self.step, self.num_updates = step, self.num_updates + 1
        if not usable:
            self._remember_lam()
            return self.budget(step)
        if phase == "final":
            if int(self.masks().sum().item()) != self.b_target:  # entered the final phase without a last prune
                self.mask_to_budget(self.b_target, step)
                self.masks_recomputed = True
            self.apply_masks()
            return self.b_target
        self.update_scores(step)
        budget = self.budget(step)
        if self.is_mask_step(step):
            self.mask_to_budget(budget, step)
            self.masks_recomputed = True
        self._remember_lam()  # once per step, after any pruning changed λ
        return budget

    # -- reporting ----------------------------------------------------------------------------
    def rank_pattern(self) -> dict[str, dict[str, int]]:
        """Active singular values and effective rank of Δ per adapted matrix."""
        return {
            name: {"active": active, "effective_rank": layer.effective_rank()}
            for name, layer, active in zip(self.names, self.layers, self.active_counts(), strict=True)
        }

    # -- checkpointing ------------------------------------------------------------------------
    def state_dict(self) -> dict[str, object]:
        """Everything needed to continue identically: step, counters, EMAs and masks."""
        tensors: dict[str, torch.Tensor] = {"masks": self.masks().detach().clone()}
        for n, t in self.ema_i.items():
            tensors[f"ema_i.{n}"] = t.clone()
            tensors[f"ema_u.{n}"] = self.ema_u[n].clone()
        for i, (d_i, d_u) in enumerate(zip(self.outer_i, self.outer_u, strict=True)):
            for n in OUTER:
                tensors[f"outer_i.{i}.{n}"] = d_i[n].clone()
                tensors[f"outer_u.{i}.{n}"] = d_u[n].clone()
        return {"step": self.step, "num_updates": self.num_updates, "names": list(self.names),
                "importance": self.config.importance, "frozen": self.frozen, "total_step": self.config.total_step,
                "config": self.config.to_dict(), "tensors": tensors}

    def check_resumable(self, state: dict[str, object], total_step: int | None, steps_name: str = "total_step") -> None:
        """Refuse a saved state that this allocator would not continue identically: one made for another number
        of optimizer steps (the budget schedule would be reshaped and pruned values re-grown) or with other
        LoRA² settings (α rescales the restored adapter, β or the schedule fractions change the scores).
        Fields a later lora2 added are not compared; ``total_step`` None: not known yet, checked later."""
        if not self.prunes:
            return
        saved_total = state.get("total_step")
        if saved_total is not None and total_step is not None and saved_total != total_step:
            raise ValueError(
                f"The saved allocator state's pruning schedule was made for {saved_total} optimizer steps, this run "
                f"has {steps_name}={total_step}: resuming would reshape the budget schedule and re-grow pruned values. "
                "Resume with the same number of optimizer steps (🤗 Trainer: the same max_steps, or num_train_epochs, "
                "batch size and gradient_accumulation_steps)."
            )
        saved = state.get("config")
        if not isinstance(saved, dict):
            return
        live = json.loads(json.dumps(self.config.to_dict()))

        def same(key: str) -> bool:
            old, new = saved[key], live.get(key)
            return sorted(old) == sorted(new) if key == "orth_terms" and old and new else old == new

        changed = [f"{k}: {saved[k]!r} → {live.get(k)!r}" for k in sorted(saved) if k != "total_step" and not same(k)]
        if changed:
            raise ValueError(
                "This model's LoRA2Config differs from the one the checkpoint was trained with ("
                + "; ".join(changed) + "): the resumed run would not continue it. Wrap the base model with the "
                "checkpoint's settings."
            )

    def load_state_dict(self, state: dict[str, object], check_total_step: bool = True) -> None:
        """Restore a ``state_dict()``; refused (nothing changed) if it was saved for another schedule or config
        (``check_resumable``). ``check_total_step=False``: the run's step count is not known yet (the 🤗 Trainer
        sets it from max_steps later and checks then)."""
        self.check_resumable(state, self.config.total_step if check_total_step else None)
        names = state.get("names")
        if names != self.names:
            raise ValueError("Allocator state was saved for different adapted matrices than this model has.")
        if state.get("importance") != self.config.importance:
            raise ValueError(
                f"Allocator state uses importance={state.get('importance')!r} but the config says "
                f"{self.config.importance!r}."
            )
        tensors: dict[str, torch.Tensor] = state["tensors"]  # type: ignore[assignment]
        masks = tensors["masks"]
        if tuple(masks.shape) != (len(self.layers), self.config.r):
            raise ValueError(f"Allocator masks have shape {tuple(masks.shape)}, expected {(len(self.layers), self.config.r)}.")
        device = self.device
        # copies (as torch.optim does): the EMAs update in place, and a state kept in memory (an early-stopping
        # snapshot, one state loaded into two models) must not change under the caller
        self.ema_i = {n: tensors[f"ema_i.{n}"].to(device, copy=True) for n in INNER if f"ema_i.{n}" in tensors}
        self.ema_u = {n: tensors[f"ema_u.{n}"].to(device, copy=True) for n in INNER if f"ema_u.{n}" in tensors}
        self.outer_i, self.outer_u = [], []
        if "outer_i.0.p_outer" in tensors:
            for i in range(len(self.layers)):
                own = self.layers[i].lam.device  # per-matrix statistics stay beside their matrix
                self.outer_i.append({n: tensors[f"outer_i.{i}.{n}"].to(own, copy=True) for n in OUTER})
                self.outer_u.append({n: tensors[f"outer_u.{i}.{n}"].to(own, copy=True) for n in OUTER})
        self.step = int(state["step"])  # type: ignore[arg-type]
        self.num_updates = int(state["num_updates"])  # type: ignore[arg-type]
        self.frozen = bool(state.get("frozen", False))
        self.resumed_from = {"total_step": state.get("total_step"), "config": state.get("config")}
        self._last_lam = None  # the next call compares with the λ it finds, not with this process's last one
        for layer, row in zip(self.layers, masks, strict=True):
            layer.set_mask(row, zero_pruned=False)  # lam was saved with this mask: leave it as it was
