"""`LoRA2Model`: puts LoRA² layers into any `nn.Module`, freezes the rest, and owns the allocator.

The data path reads straight through: ``forward`` runs the wrapped model and adds γ·R to its
loss; ``update_and_allocate`` runs the allocator once per optimizer step; ``merge_and_unload``
returns the plain model with Δ folded in. Files are ``persistence``'s job, the cross-rank mask
check ``distributed``'s, the advertised forward signature ``forward_signature``'s.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import logging
import math
import warnings
from collections.abc import Collection, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import persistence
from .allocator import RankAllocator
from .config import LoRA2Config
from .distributed import check_masks_agree, is_data_parallel
from .forward_signature import ForwardWithBaseSignature
from .layer import ADAPTER_PARAMETERS, LoRA2Layer
from .optim import param_groups
from .regularizer import orth_regularization, orth_term_means
from .targets import (
    TASK_HEADS,
    causal_lm_loss,
    default_targets,
    find_modules_to_save,
    find_targets,
    loss_uses_item_count,
    swap_module,
    task_type,
    tied_adapted,
    tied_outside,
)

logger = logging.getLogger(__name__)

# transformers' own adapter API on PreTrainedModel (PEFT-backed): reached through the fall-through it would act on
# the wrapped model behind LoRA²'s back (and push_to_hub would upload the whole base model)
TRANSFORMERS_ADAPTER_API = frozenset({"add_adapter", "load_adapter", "set_adapter", "delete_adapter", "enable_adapters",
                                      "disable_adapters", "active_adapters", "get_adapter_state_dict"})

# Training forwards without one allocator call before we shout (generous: covers accumulation).
IDLE_FORWARDS_WARNING = 200


def _refuse_offloaded(found: list[tuple[str, nn.Module]]) -> None:
    """accelerate's offloading (a ``device_map`` entry 'cpu' or 'disk' beside a GPU) leaves a layer's weight on
    the meta device and loads it for each forward: factors created beside it would hold no data. A model built
    on the meta device on purpose (shapes and counts) has no such hook and is wrapped as usual."""
    for name, module in found:
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.device.type == "meta" and hasattr(module, "_hf_hook"):
            raise ValueError(
                f"{name} is offloaded by accelerate (a device_map with 'cpu' or 'disk' entries beside a GPU): its "
                "weight lives on the meta device between forwards. LoRA² creates its factors beside the base "
                "weights and cannot train offloaded layers: load the model with a device_map that places every "
                "adapted layer on a GPU (max_memory, or fewer layers per GPU), or the whole model on the CPU."
            )


class LoRA2Model(nn.Module):
    """A model with LoRA² adapters; attribute access falls through to the wrapped model."""

    forward = ForwardWithBaseSignature()

    def __init__(self, model: nn.Module, config: LoRA2Config) -> None:
        super().__init__()
        if isinstance(model, LoRA2Model):
            raise ValueError("This model already has LoRA² adapters; call merge_and_unload() before wrapping again.")
        if any(isinstance(m, LoRA2Layer) for m in model.modules()):
            raise ValueError(
                f"This {type(model).__name__} already holds LoRA² layers: get_lora2_model wraps the base model in "
                "place, so a base that was wrapped before carries that adapter. Load a fresh base model, or use the "
                "model returned by merge_and_unload()."
            )
        peft_layer = next(((n, type(m).__name__) for n, m in model.named_modules()
                           if type(m).__module__.split(".")[0] == "peft"), None)
        if peft_layer is not None:
            where = f" at {peft_layer[0]!r}" if peft_layer[0] else ""
            raise ValueError(
                f"This model holds PEFT adapter parts ({peft_layer[1]}{where}); LoRA² does not stack on them (it would "
                "freeze them, or refuse their layers as targets). Merge them into the base first "
                "(peft_model.merge_and_unload()), or start a LoRA² adapter from a PEFT LoRA with "
                "lora2.init_from_peft_lora(get_lora2_model(base, config), peft_dir)."
            )
        config = copy.deepcopy(config)
        config.validate()  # fields may have been set after the config was built
        if config.target_modules is None:
            config.target_modules = default_targets(model)
        self.base_model = model
        self.lora2_config = config
        self._forward_signature = inspect.signature(model.forward)
        self.modules_to_save_names = find_modules_to_save(model, config.modules_to_save)
        self.lora2_layers: dict[str, LoRA2Layer] = {}
        found = find_targets(model, config.target_modules, self.modules_to_save_names)
        config.budgets(len(found))  # a budget that cannot fit fails before the base model is changed
        _refuse_offloaded(found)
        # what wrapping changes, so that a failed wrap or load can give the base model back as it was
        self._base_requires_grad = [(p, p.requires_grad) for p in model.parameters()]
        # modules_to_save train in place; their loaded values are what disable_adapter() and restore_base() give back
        # (PEFT keeps the original module beside a trained copy)
        self._mts_originals = self._snapshot_modules_to_save(model)
        # (module, key, trained parameter) while the kept copies stand in for them (disable_adapter())
        self._mts_trained: list[tuple[nn.Module, str, nn.Parameter]] | None = None
        self._wrapped_config = copy.deepcopy(config)  # save_pretrained refuses later edits the layers do not follow
        try:
            self._inject(found)
            self._freeze()
            self.allocator = RankAllocator(list(self.lora2_layers), list(self.lora2_layers.values()), config)
            if self.allocator.prunes and config.total_step is not None:
                config.check_schedule(config.total_step)
        except BaseException:
            self.restore_base()
            raise
        self.last_orth_reg: torch.Tensor | None = None
        # False: forward returns the task loss alone and the loop adds regularization_loss() itself
        self.regularizer_in_loss = True
        self._last_orth_terms: dict[str, torch.Tensor] = {}  # detached: read (and synced) only when logged
        self._idle_forwards = 0
        self._warned_idle_state_dict = False
        self._unloaded = False
        self.mask_sync_checks = 0  # cross-rank mask comparisons done (data-parallel training)
        # compare masks across ranks at pruning steps: None = whenever a process group has several ranks; False for
        # ranks that train separate models in one group (a sweep), where masks may differ and rank 0 may train alone
        self.mask_sync: bool | None = None
        self._trained_since_update = False  # a training forward ran since the last update_and_allocate
        self._reg_since_update = False  # ... and γ·R was computed for it (in the loss or regularization_loss())
        self._warned_no_reg = False
        self._warned_eval = False
        self.regularizer_calls = 0  # γ·R computations for a loss (LoRA2Trainer checks each step has one)
        self._lam_groups_built = False  # optimizer_param_groups() built (or check_lam_lr verified) λ's rate
        self._warn_if_head_frozen(model)
        for inside, outside in tied_outside(model, self.modules_to_save_names):
            warnings.warn(
                f"modules_to_save trains {inside} in place, and it is the same tensor as {outside}: training it trains "
                f"{outside} too (PEFT would train an untied copy). Intended for tied embeddings; otherwise untie the "
                "weights first, or adapt the module with LoRA² instead of listing it in modules_to_save.",
                UserWarning, stacklevel=3)
        # Whether the 🤗 Trainer may pass num_items_in_batch and skip dividing by gradient accumulation: only when the
        # base loss really uses it (a causal LM's token-weighted loss). Classification heads take **kwargs but
        # ignore it (transformers#47688): the Trainer must average their per-micro-batch means itself.
        self.accepts_loss_kwargs = loss_uses_item_count(model)
        self._loss_shifts_labels = causal_lm_loss(model)
        # A 🤗 model loads in eval mode: the wrapper follows the base, each new layer its own base layer, and no
        # submodule's mode is touched (a part kept in eval on purpose stays so).
        self.training = model.training
        self._input_grads_hooked = False
        self._checkpointable: list[nn.Module] | None = None  # modules with a gradient_checkpointing flag
        for layer in self.lora2_layers.values():
            layer.training = layer.base_layer.training
            layer.dropout.train(layer.base_layer.training)

    # -- surgery ------------------------------------------------------------------------------
    def _inject(self, found: list[tuple[str, nn.Module]]) -> None:
        cfg = self.lora2_config
        for name, module in found:
            layer = LoRA2Layer(module, cfg.k, cfg.r, cfg.alpha, cfg.dropout, cfg.init_std, cfg.init, cfg.scaling)
            swap_module(self.base_model, module, layer)
            self.lora2_layers[name] = layer

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        if self.allocator.prunes and self.allocator.num_updates == 0 and self._idle_forwards and \
                not self._warned_idle_state_dict:  # e.g. a plain 🤗 Trainer without LoRA2Callback saving its model
            self._warned_idle_state_dict = True
            warnings.warn(f"state_dict() of a LoRA2Model trained for {self._idle_forwards} forward passes without "
                          "update_and_allocate(): nothing was pruned, so this is a plain (unpruned) run. With the 🤗 "
                          "Trainer pass callbacks=[lora2.LoRA2Callback()] or use lora2.LoRA2Trainer.",
                          RuntimeWarning, stacklevel=2)
        with self._modules_to_save_as_trained():  # inside disable_adapter() too: the trained modules
            return super().state_dict(*args, **kwargs)  # a merged layer writes W0, not W0 + s·Δ (LoRA2Layer's hooks)

    def _snapshot_modules_to_save(self, model: nn.Module) -> dict[str, nn.Parameter]:
        """Path of each modules_to_save parameter (``<module>.<key>``; those modules are never adapted, so the
        path holds) → a frozen copy as loaded. One copy per tensor, whichever modules hold it (ties). Paths, not
        object ids: a copy of the model (deepcopy, pickle) or a cast that makes new parameters still finds them."""
        kept: dict[str, nn.Parameter] = {}
        copies: dict[int, nn.Parameter] = {}  # one copy per tensor; every path of a tied tensor maps to it
        for name in self.modules_to_save_names:
            for key, param in model.get_submodule(name).named_parameters(remove_duplicate=False):
                if id(param) not in copies:
                    copies[id(param)] = nn.Parameter(param.detach().clone(), requires_grad=False)
                kept[f"{name}.{key}"] = copies[id(param)]
        return kept

    def _swap_in_originals(self) -> None:
        """Until ``_swap_back``, every module that holds a modules_to_save parameter (tied ones included, and an
        adapted layer's base) holds its frozen copy instead. Parameter objects are exchanged, not their data: the
        trained ones, their gradients, hooks and optimizer state stay untouched, and a graph built before the
        block backpropagates into them. A no-op while already swapped."""
        if self._mts_trained is not None:
            return
        by_id: dict[int, nn.Parameter] = {}
        for path, original in self._mts_originals.items():
            try:
                current = self.base_model.get_parameter(path)
            except AttributeError:
                raise RuntimeError(f"{path} no longer exists (its module was replaced or renamed after wrapping): the "
                                   "base model as loaded is not known there, so disable_adapter() cannot run it.") from None
            if current.shape != original.shape:
                raise RuntimeError(
                    f"{path} is {tuple(current.shape)} now but {tuple(original.shape)} when the model was wrapped "
                    "(resize_token_embeddings after get_lora2_model?): the base model as loaded no longer fits, so "
                    "disable_adapter() cannot run it. Resize before get_lora2_model.")
            if (original.dtype, original.device) != (current.dtype, current.device):  # cast through the 🤗 model
                original.data = original.data.to(device=current.device, dtype=current.dtype)
            by_id[id(current)] = original
        held = [(module, key, param) for module in self.base_model.modules(remove_duplicate=False)
                for key, param in module._parameters.items() if param is not None and id(param) in by_id]
        for module, key, param in held:
            module._parameters[key] = by_id[id(param)]
        self._mts_trained = held

    def _swap_back(self) -> None:
        for module, key, param in reversed(self._mts_trained or []):
            module._parameters[key] = param
        self._mts_trained = None

    @contextlib.contextmanager
    def _modules_to_save_as_trained(self) -> Iterator[None]:
        """The trained modules_to_save in place for the duration, also while the adapter is disabled (saving,
        exporting and loading read and write those, never the kept originals)."""
        swapped = self._mts_trained is not None
        if swapped:
            self._swap_back()
        try:
            yield
        finally:
            if swapped:
                self._swap_in_originals()

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        with self._modules_to_save_as_trained():  # inside disable_adapter() too: into the trained modules
            return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def _apply(self, fn: Any, recurse: bool = True) -> LoRA2Model:  # nn.Module's signature
        """``.to()``, ``.half()``, ``.cuda()``: the kept originals of modules_to_save follow the model (and the
        trained ones while the originals stand in for them)."""
        swapped = getattr(self, "_mts_trained", None)
        module = super()._apply(fn, recurse)  # converts whichever parameters the modules hold now
        kept = getattr(self, "_mts_originals", {})
        with torch.no_grad():
            if swapped is None:
                for original in {id(o): o for o in kept.values()}.values():  # a tied copy once
                    original.data = fn(original.data)
            else:
                for path in kept:  # the converted copies (new objects when torch overwrites parameters)
                    kept[path] = self.base_model.get_parameter(path)
                for param in {id(p): p for _, _, p in swapped}.values():  # as nn.Module._apply: data and grad
                    param.data = fn(param.data)
                    if param.grad is not None:
                        param.grad = fn(param.grad)
        return module

    def restore_base(self) -> None:
        """Undo the wrapping: base layers back in place, modules_to_save at their loaded values and every base
        parameter's ``requires_grad`` as it was (after a failed wrap or adapter load; the adapter and the trained
        modules_to_save are discarded — ``unload()`` keeps the latter)."""
        for layer in self.lora2_layers.values():
            swap_module(self.base_model, layer, layer.base_layer)
        if getattr(self, "_mts_trained", None) is not None:
            self._swap_back()
        with torch.no_grad():
            for path, original in getattr(self, "_mts_originals", {}).items():
                self.base_model.get_parameter(path).copy_(original)
        for param, flag in self._base_requires_grad:
            param.requires_grad_(flag)
        self._unloaded = True

    def _warn_if_head_frozen(self, model: nn.Module) -> None:
        """A task head that is neither trained nor adapted stays as loaded: random for a fresh head."""
        if TASK_HEADS.get(task_type(type(model).__name__) or "") is None or self.lora2_config.modules_to_save is not None:
            return  # not a task model, or the user chose modules_to_save (even an empty list) deliberately
        # the head: every top-level part with weights beside the backbone (classifier, score, qa_outputs, BART's
        # classification_head, XLNet's sequence_summary + logits_proj), unless an adapter sits in it
        backbone = getattr(model, "base_model_prefix", None)
        present = [n for n, m in model.named_children() if n != backbone and any(True for _ in m.parameters())
                   and not any(a == n or a.startswith(n + ".") for a in self.lora2_layers)]
        if present:
            listed = ", ".join(repr(n) for n in present)
            warnings.warn(
                f"{type(model).__name__}'s head {listed} stays frozen: it is not in modules_to_save. A freshly "
                f"initialised head is then random and untrained. Pass modules_to_save=[{listed}] (or "
                "modules_to_save=[] to keep it frozen on purpose, which silences this warning).",
                UserWarning,
                stacklevel=4,
            )

    def _freeze(self) -> None:
        for param in self.base_model.parameters():
            param.requires_grad_(False)
        for layer in self.lora2_layers.values():
            for pname in ADAPTER_PARAMETERS:
                getattr(layer, pname).requires_grad_(True)
        for name in self.modules_to_save_names:
            for param in self.base_model.get_submodule(name).parameters():
                param.requires_grad_(True)

    # -- pass-through ---------------------------------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            if name in TRANSFORMERS_ADAPTER_API:
                raise AttributeError(
                    f"LoRA2Model has no {name}: the wrapped model's own {name} is transformers' PEFT integration, "
                    "which does not know LoRA² layers. One LoRA² adapter per model: disable_adapter() runs the "
                    "base model, LoRA2Model.from_pretrained(base, dir) loads another adapter onto a fresh base."
                ) from None
            return getattr(self.base_model, name)

    def _get_name(self) -> str:
        """The wrapped model's class name: the 🤗 Trainer decides from it whether label smoothing shifts the labels
        (a causal LM predicts the next token; with "LoRA2Model" it smoothed the unshifted ones)."""
        return self.base_model._get_name()

    def __repr__(self) -> str:
        text = super().__repr__()  # nn.Module's, which starts with _get_name()
        base = self._get_name()
        return "LoRA2Model" + text[len(base):] if text.startswith(base) else text

    @property
    def config(self) -> Any:
        """The wrapped model's own config (what 🤗 Trainer and generate() expect); see ``lora2_config``."""
        return getattr(self.base_model, "config", None)

    def get_base_model(self) -> nn.Module:
        return self.base_model

    # -- forward and regulariser --------------------------------------------------------------
    def orth_regularization(self) -> torch.Tensor:
        """R of method.md §3 (mean over adapted matrices of the enabled terms), not yet multiplied by γ."""
        cfg = self.lora2_config
        if torch.is_grad_enabled():
            self._reg_since_update = True  # a loop adding γ·orth_regularization() itself trains with it
        return orth_regularization(self.lora2_layers.values(), cfg.orth_terms, cfg.pq_form)

    @property
    def last_orth_terms(self) -> dict[str, float]:
        """Each enabled term of R ('uv', 'UV', 'PQ') as its mean over matrices, γ not applied, from the last
        training forward that added γ·R (their sum is ``last_orth_reg``); empty before that."""
        return {name: float(value) for name, value in self._last_orth_terms.items()}

    def regularization_loss(self) -> torch.Tensor | None:
        """γ·R as its own loss (terms recorded for logging), for loops that keep it out of the model's loss
        (``regularizer_in_loss = False``), e.g. to clip the task gradient alone; None when γ or the terms are off.
        It is on the first adapted matrix's device: with a model spread over devices, ``.to(loss.device)``."""
        if self.lora2_config.orth_reg_weight == 0 or not self.lora2_config.orth_terms:
            return None
        return self.lora2_config.orth_reg_weight * self._regularizer()

    def _regularizer(self) -> torch.Tensor:
        """R for the loss; its terms are kept for logging, from this same computation (no extra forward)."""
        cfg = self.lora2_config
        means = orth_term_means(self.lora2_layers.values(), cfg.orth_terms, cfg.pq_form)
        reg: torch.Tensor = sum(means.values())  # type: ignore[assignment]  # orth_terms is not empty here
        self._record_regularizer(reg.detach(), {name: value.detach() for name, value in means.items()})
        return reg

    @torch.compiler.disable
    def _record_regularizer(self, reg: torch.Tensor, terms: dict[str, torch.Tensor]) -> None:
        """Bookkeeping outside any compiled graph: under ``torch.compile`` a counter read in the graph is a guard,
        and a guard that changes every step recompiles every step. Only a value with a graph counts as γ·R in
        a loss (one computed under no_grad for logging does not)."""
        if torch.is_grad_enabled():
            self._reg_since_update = True
            self.regularizer_calls += 1
        self.last_orth_reg = reg
        self._last_orth_terms = terms

    def check_config_matches_layers(self) -> None:
        """Raise if ``lora2_config`` was edited after wrapping in a way the layers do not follow (α, r or the
        scaling rule change s; which modules are adapted or saved, k, dropout, init): the saved config would reload
        the adapter at another scale, onto other modules, or train it differently."""
        fixed = ("target_modules", "modules_to_save", "k", "r", "dropout", "init", "init_std")
        was, now = self._wrapped_config, self.lora2_config
        changed = [f for f in fixed if getattr(was, f) != getattr(now, f)]
        if changed:
            edits = ", ".join(f"{f}: {getattr(was, f)!r} → {getattr(now, f)!r}" for f in changed)
            raise ValueError(
                f"lora2_config changed after wrapping ({edits}); the layers were built with the old values, so the "
                "saved config would not describe them. Restore the values, or wrap a fresh base model with the new ones.")
        expected = self.lora2_config.scaling
        for name, layer in self.lora2_layers.items():
            if not math.isclose(layer.scaling, expected, rel_tol=1e-9):
                raise ValueError(
                    f"{name} scales its update by s = {layer.scaling:g} but lora2_config now gives s = {expected:g} "
                    "(alpha, r or scaling_rule changed after wrapping): the adapter would reload at another scale. "
                    "Restore the config's values, or wrap a fresh base model with the new ones."
                )

    @torch.compiler.disable
    def _inputs_require_grad_under_checkpointing(self) -> None:
        """Reentrant gradient checkpointing (transformers 4.x's default, ``use_reentrant=True`` in 5.x) keeps a
        block's gradients only if its input requires grad; with a frozen embedding nothing does, and λ, inside
        every block, silently got no task gradient. As PEFT does, make the input embeddings' output require grad
        once checkpointing is on (checked per training forward: it may be switched on after wrapping)."""
        if self._input_grads_hooked:
            return
        base = self.base_model
        if self._checkpointable is None:  # transformers sets the flag only on modules that define it in __init__
            self._checkpointable = [m for m in base.modules() if "gradient_checkpointing" in vars(m)]
        on = any(m.gradient_checkpointing is True for m in self._checkpointable)
        if on and callable(getattr(base, "enable_input_require_grads", None)):
            base.enable_input_require_grads()
            self._input_grads_hooked = True

    def _forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run the wrapped model; in training mode add γ·R to its loss whenever it computes one (method.md §3).

        Evaluation losses stay the task loss alone, comparable with other methods.
        """
        self._check_usable()
        learning = torch.is_grad_enabled() and self._adapters_trainable()
        if learning and self.training and any(layer.merged for layer in self.lora2_layers.values()):
            raise RuntimeError(
                "Training forward on a merged LoRA2Model: Δ is folded into the base weights, so a step would move "
                "the factors while unmerge() subtracts the new Δ and corrupts the base. Call unmerge() before "
                "training, or model.eval() / torch.no_grad() for inference."
            )
        if learning:
            self._note_training_forward()
            self._inputs_require_grad_under_checkpointing()
        outputs = self.base_model(*args, **kwargs)
        gamma = self.lora2_config.orth_reg_weight
        if not self.regularizer_in_loss or gamma == 0 or not self.lora2_config.orth_terms or not self.training \
                or self._adapters_disabled():
            return outputs
        share = self.item_share(kwargs)  # this micro-batch's part of a token-weighted step (None: a plain mean)
        if isinstance(outputs, Mapping) and outputs.get("loss") is not None:
            loss = outputs["loss"]
            outputs["loss"] = loss + self._weighted_regularizer(gamma, share, loss)
        elif isinstance(outputs, tuple) and "labels" in kwargs and kwargs["labels"] is not None:
            loss = outputs[0]
            outputs = (loss + self._weighted_regularizer(gamma, share, loss), *outputs[1:])
        return outputs

    def _weighted_regularizer(self, gamma: float, share: torch.Tensor | None, loss: torch.Tensor) -> torch.Tensor:
        reg = gamma * self._regularizer().to(device=loss.device, dtype=loss.dtype)
        return reg if share is None else reg * share.to(device=loss.device, dtype=loss.dtype)

    def item_share(self, inputs: Mapping[str, Any]) -> torch.Tensor | None:
        """n / num_items_in_batch when the 🤗 Trainer passes the step's item count (a token-weighted loss under
        gradient accumulation, which the Trainer does not divide by the number of micro-batches): γ·R weighted
        by each micro-batch's share of the step's items sums to γ·R once per optimizer step. Items are counted
        as the Trainer counts them (``shift_labels``, else causal ``labels[..., 1:]``, else ``labels``)."""
        total = inputs.get("num_items_in_batch")
        labels = inputs.get("shift_labels")
        if labels is None:
            labels = inputs.get("labels")
            if isinstance(labels, torch.Tensor) and self._loss_shifts_labels:
                labels = labels[..., 1:]
        if total is None or not isinstance(labels, torch.Tensor):
            return None
        total = torch.as_tensor(total, device=labels.device)
        return labels.ne(-100).sum() / total.clamp(min=1)

    def _adapters_trainable(self) -> bool:
        return any(getattr(la, n).requires_grad for la in self.lora2_layers.values() for n in ADAPTER_PARAMETERS)

    @torch.compiler.disable
    def _note_training_forward(self) -> None:
        """A forward that builds a graph for trainable adapters (in either mode: a loop may forget train()). Kept out
        of ``torch.compile``'s graphs, like ``_record_regularizer``: its counters change every step."""
        self._trained_since_update |= self.training
        ratio = self.lora2_config.lam_lr_ratio
        lam_rate_unseen = ratio != 1 and not self._lam_groups_built  # no sign that λ got its own rate
        if self.allocator.num_updates > 0 or not (self.allocator.prunes or lam_rate_unseen):
            return
        self._idle_forwards += 1
        if self._idle_forwards == IDLE_FORWARDS_WARNING:
            what = ("no singular value is being pruned, so this is silently a plain (unpruned) run" if self.allocator.prunes
                    else f"nothing has checked that λ trains at lr × lam_lr_ratio={ratio:g}, which only "
                         "model.optimizer_param_groups(lr) sets up (an optimizer over model.parameters() trains it at "
                         "the common rate; lam_lr_ratio=1 asks for that on purpose; if you gave λ its own rate by "
                         "hand, ignore this)")
            msg = (
                f"LoRA² has run {IDLE_FORWARDS_WARNING} forward passes with gradients but update_and_allocate() was "
                f"never called: {what}. Build the optimizer with torch.optim.AdamW(model.optimizer_param_groups(lr)) and "
                "call model.update_and_allocate(step) after optimizer.step(), or use lora2.LoRA2Trainer (or pass "
                "callbacks=[lora2.LoRA2Callback()] to the 🤗 Trainer)."
                + ("" if self.training else " The model is also in eval mode (no γ·R, no dropout): call model.train().")
            )
            warnings.warn(msg, RuntimeWarning, stacklevel=3)
            logger.warning(msg)

    def update_and_allocate(self, step: int) -> int | None:
        """Update importance scores and prune to b(step). Call once per optimizer step, before zero_grad."""
        self._check_usable()
        if any(layer.merged for layer in self.lora2_layers.values()):
            raise RuntimeError("update_and_allocate() on a merged model: call unmerge() before training further.")
        self._warn_if_regularizer_skipped()
        if self.allocator.num_updates == 0:
            self._warn_if_lam_lr_unused()
        heads = [p.grad for name in self.modules_to_save_names
                 for p in self.base_model.get_submodule(name).parameters() if p.requires_grad and p.grad is not None]
        try:
            budget = self.allocator.update_and_allocate(step, heads)
        except FloatingPointError as err:
            self._blame_half_precision_parameters(err)
            raise
        sync = is_data_parallel() if self.mask_sync is None else self.mask_sync
        if self.allocator.masks_recomputed and sync:  # only a rebuilt mask can diverge
            check_masks_agree(self.allocator.masks(), step)
            self.mask_sync_checks += 1
        return budget

    def _blame_half_precision_parameters(self, err: FloatingPointError) -> None:
        """The adapter went non-finite: if a trainable float16/bfloat16 parameter outside it did too (a
        ``modules_to_save`` head on a half-precision base, which AdamW overflows in one step), that is the likely
        origin, and the adapter's message would name the wrong parameter and the wrong fix."""
        adapter = {id(p) for layer in self.lora2_layers.values() for p in layer.parameters()}
        for name, p in self.base_model.named_parameters():
            if (p.requires_grad and id(p) not in adapter and p.dtype in (torch.float16, torch.bfloat16)
                    and not bool(torch.isfinite(p.detach()).all())):
                raise FloatingPointError(
                    f"{name} ({p.dtype}, trained outside the adapter) holds NaN/inf: with a half-precision base, "
                    "modules_to_save copies train in that dtype, where AdamW's update overflows (the adapter itself "
                    "stays float32). Load the base model in float32 (torch_dtype=torch.float32) or use mixed precision "
                    f"(torch.autocast) instead of a float16 model. The adapter then diverged too: {err}"
                ) from err

    def _warn_if_lam_lr_unused(self) -> None:
        """At the first step: λ's own rate exists only in optimizer_param_groups(); an optimizer over
        ``model.parameters()`` trains λ at the common rate without a word."""
        ratio = self.lora2_config.lam_lr_ratio
        if ratio != 1 and not self._lam_groups_built:
            warnings.warn(
                f"LoRA2Config.lam_lr_ratio={ratio:g} acts only through model.optimizer_param_groups(lr), which this model "
                "has not built: an optimizer over model.parameters() trains λ at the common rate (the paper's setting). "
                "Use torch.optim.AdamW(model.optimizer_param_groups(lr)), or lam_lr_ratio=1 to train with one rate on "
                "purpose; if you gave λ its own rate yourself, ignore this.",
                RuntimeWarning, stacklevel=3,
            )

    def _warn_if_regularizer_skipped(self) -> None:
        """Once: the step trained without γ·R although γ > 0 (the loss was computed outside the model), or the
        model was stepped in eval mode (no γ·R, no dropout: usually a loop that forgot ``model.train()``)."""
        cfg = self.lora2_config
        if not self.training and not self._warned_eval:
            self._warned_eval = True
            warnings.warn(
                "update_and_allocate() on a LoRA2Model in eval mode: the step trained without the orthogonality "
                "regulariser and without dropout. Call model.train() before the training loop (a 🤗 model loads in "
                "eval mode, and the wrapper follows it).",
                RuntimeWarning,
                stacklevel=3,
            )
        skipped = self._trained_since_update and not self._reg_since_update and cfg.orth_reg_weight > 0 \
            and bool(cfg.orth_terms) and not self._adapters_disabled()
        self._trained_since_update = self._reg_since_update = False
        if skipped and not self._warned_no_reg:
            self._warned_no_reg = True
            warnings.warn(
                "This optimizer step trained without the orthogonality regulariser (orth_reg_weight="
                f"{cfg.orth_reg_weight}): the model adds γ·R only to a loss it computes itself (pass labels), and "
                "none was computed. With a loss of your own, add it: loss = loss + model.regularization_loss(), "
                "and set model.regularizer_in_loss = False; or set orth_reg_weight=0 to train without it.",
                RuntimeWarning,
                stacklevel=3,
            )

    def rank_pattern(self) -> dict[str, dict[str, int]]:
        """Per adapted matrix: active singular values and effective rank of Δ (≤ k), for reports.
        The rank costs a small float64 QR/SVD per matrix; for counts alone use ``active_pattern``."""
        self._check_usable()
        return self.allocator.rank_pattern()

    def active_pattern(self) -> dict[str, int]:
        """Per adapted matrix: active singular values (a mask sum: cheap enough to log every step)."""
        return dict(zip(self.allocator.names, self.allocator.active_counts(), strict=True))

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Run the base model exactly as loaded: LoRA² layers off and modules_to_save at their loaded values (as
        PEFT's, e.g. a reference model for DPO); a merged model is unmerged for the duration and merged again
        afterwards. What trains inside the block trains the loaded values, which are then discarded."""
        previous = {n: (layer.disabled, layer.merged) for n, layer in self.lora2_layers.items()}
        swapped_before = self._mts_trained is not None  # inside disable_adapter_layers(): leave it so
        self._swap_in_originals()  # first: a refusal leaves the adapter as it was
        for layer in self.lora2_layers.values():
            layer.unmerge()
            layer.disabled = True
        try:
            yield
        finally:
            if not swapped_before:
                self._swap_back()
            for n, layer in self.lora2_layers.items():
                layer.disabled = previous[n][0]
                if previous[n][1]:
                    layer.merge()

    # PEFT's names, for code written against a PeftModel
    def disable_adapter_layers(self) -> None:
        """Until ``enable_adapter_layers()``: the base model as loaded (``disable_adapter()`` without the block);
        a merged model is unmerged."""
        self._swap_in_originals()  # first: a refusal leaves the adapter as it was
        for layer in self.lora2_layers.values():
            layer.unmerge()
            layer.disabled = True

    def enable_adapter_layers(self) -> None:
        self._swap_back()
        for layer in self.lora2_layers.values():
            layer.disabled = False

    def merge_adapter(self) -> None:
        """PEFT's name for ``merge()``."""
        self.merge()

    def unmerge_adapter(self) -> None:
        """PEFT's name for ``unmerge()``."""
        self.unmerge()

    def unload(self) -> nn.Module:
        """Remove every LoRA² layer without merging and return the wrapped model (as PEFT's ``unload``: the
        trained modules_to_save stay); this wrapper is unusable afterwards."""
        self._check_usable()
        self._swap_back()
        for layer in self.lora2_layers.values():
            layer.unmerge()
            swap_module(self.base_model, layer, layer.base_layer)
        self._unloaded = True
        return self.base_model

    def _adapters_disabled(self) -> bool:
        return all(layer.disabled for layer in self.lora2_layers.values())

    # -- parameter counts ---------------------------------------------------------------------
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        params = list({id(p): p for p in self.parameters()}.values())
        return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)

    def num_adapter_parameters(self) -> int:
        """LoRA² parameters only (method.md §1): Σ d_in·k + k·r + r + r·k + k·d_out, head excluded."""
        return sum(getattr(la, p).numel() for la in self.lora2_layers.values() for p in ADAPTER_PARAMETERS)

    def optimizer_param_groups(self, lr: float, weight_decay: float = 0.0, *,
                               no_decay: Collection[str] = ()) -> list[dict[str, Any]]:
        """Torch optimizer groups: every trainable parameter once, lam at lr × ``lam_lr_ratio``, the rest at lr;
        ``no_decay`` names (from ``named_parameters()``) get weight_decay 0. E.g.
        ``torch.optim.AdamW(model.optimizer_param_groups(1e-3))``."""
        self._lam_groups_built = True
        return param_groups(self, lr, weight_decay, no_decay)

    def print_trainable_parameters(self) -> None:
        self._check_usable()
        trainable, total = self.get_nb_trainable_parameters()
        print(
            f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}"
            f" || LoRA² params: {self.num_adapter_parameters():,} in {len(self.lora2_layers)} matrices"
        )

    # -- merge --------------------------------------------------------------------------------
    def merge(self) -> None:
        """Fold s·Δ into every base weight; undo with unmerge(). W0 + s·Δ is formed in float32 and rounded once to
        the base dtype (as PEFT does). On a float32 base unmerge() restores W0 to float32 rounding; on a bf16/fp16
        base each entry of W0 comes back within one rounding of W0 + s·Δ in that dtype, so the error grows with
        |s·Δ| (bf16: about 4e-3 of |W0 + s·Δ| at worst) and does not accumulate over repeated round trips."""
        self._check_usable()
        self._refuse_while_disabled("merge()")
        self._refuse_tied_merge()
        for layer in self.lora2_layers.values():
            layer.merge()

    def unmerge(self) -> None:
        self._check_usable()
        for layer in self.lora2_layers.values():
            layer.unmerge()

    def merge_and_unload(self) -> nn.Module:
        """Merge, remove every LoRA² layer, and return the plain wrapped model."""
        self._check_usable()
        self._refuse_while_disabled("merge_and_unload()")
        self._refuse_tied_merge()
        self._warn_if_never_allocated("merge_and_unload")
        self.warn_if_schedule_unfinished("merge_and_unload")
        for name, layer in self.lora2_layers.items():
            layer.merge()
            weight = layer.base_layer.weight
            if not bool(torch.isfinite(weight).all()):
                raise FloatingPointError(f"Merging {name} produced NaN/inf weights; the adapter is broken.")
            swap_module(self.base_model, layer, layer.base_layer)
        self._unloaded = True
        return self.base_model

    def _refuse_while_disabled(self, action: str) -> None:
        if any(layer.disabled for layer in self.lora2_layers.values()):
            raise RuntimeError(f"{action} while the adapter is disabled (inside disable_adapter(), or after "
                               "disable_adapter_layers()): the model runs the base as loaded; call it after the block, "
                               "or after enable_adapter_layers().")

    def _refuse_tied_merge(self) -> None:
        """A base weight another module also uses (a head tied to the input embeddings) cannot take s·Δ in place:
        the embeddings would change too."""
        for name, other in tied_adapted(self.base_model, self.lora2_layers).items():
            raise RuntimeError(
                f"{name}.weight is tied to {other}: merging would add the update to that module too (e.g. the "
                "input embeddings). Keep the adapter unmerged, export it with export_to_peft (and serve it unmerged), "
                "or untie the weight first (config.tie_word_embeddings=False and a copy of the weight for the head)."
            )

    def _check_usable(self) -> None:
        if self._unloaded:
            raise RuntimeError("This LoRA2Model was unloaded (merge_and_unload(), unload() or a failed load); use the "
                               "model it returned.")

    def warn_if_schedule_unfinished(self, action: str, advice: str | None = None) -> None:
        """The adapter is from before the budget reached its target (a cut run, early stopping, an early best
        checkpoint): more singular values are active than target_rank asks for. Said, not refused: the adapter
        is valid, just larger."""
        alloc, total = self.allocator, self.lora2_config.total_step
        if not alloc.prunes or not total or alloc.step == 0 or alloc.step >= total - self.lora2_config.final_warmup:
            return
        active = int(alloc.masks().sum().item())
        if active > alloc.b_target:
            warnings.warn(
                f"{action}: the adapter is at step {alloc.step} of a {total}-step schedule, before pruning reached "
                f"its target ({active} singular values active, target {alloc.b_target}). "
                + (advice or "Train to the end of the schedule, or set total_step (with the 🤗 Trainer: max_steps) "
                   "to the steps you train."),
                RuntimeWarning,
                stacklevel=3,
            )

    def _warn_if_never_allocated(self, action: str) -> None:
        if self.allocator.prunes and int(self.allocator.masks().sum().item()) == self.allocator.b0:
            trained = any(bool(layer.lam.detach().abs().sum() > 0) for layer in self.lora2_layers.values())
            if trained:
                warnings.warn(
                    f"{action}: this adapter was trained but no singular value is pruned (update_and_allocate() never "
                    "ran past the warm-up) although target_rank/target_total_rank asks for pruning.",
                    RuntimeWarning,
                    stacklevel=3,
                )

    # -- persistence (lora2.persistence does the work) -----------------------------------------
    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """Adapter tensors (and modules_to_save) keyed by their name in the *unwrapped* model."""
        return persistence.adapter_state_dict(self)

    def save_pretrained(self, save_directory: str | Path, is_main_process: bool = True,
                        safe_serialization: bool = True, **kwargs: Any) -> None:
        """Write the adapter: ``lora2_adapter.safetensors`` and ``lora2_config.json`` (written last).
        ``is_main_process=False`` writes nothing (call it on every rank, as with 🤗 models)."""
        if not is_main_process:
            return
        if not safe_serialization:
            raise ValueError("lora2 writes adapters as safetensors only (never pickles): drop safe_serialization=False.")
        if kwargs:
            warnings.warn(f"save_pretrained ignores {sorted(kwargs)}: lora2 writes the adapter from the model itself, "
                          "with safetensors.", UserWarning, stacklevel=2)
        self._check_usable()
        self._warn_if_never_allocated("save_pretrained")
        self.warn_if_schedule_unfinished(
            "save_pretrained", "Train to the end of the schedule (set total_step to the optimizer steps you train, "
            "not the micro-batches), or resume this run from a checkpoint with its allocator state. If an earlier "
            "best checkpoint was loaded on purpose (load_best_model_at_end), the adapter is that one: ignore this.")
        self._save_checkpoint(save_directory)

    def _save_checkpoint(self, save_directory: str | Path) -> None:
        """``save_pretrained`` without the end-of-training checks: a checkpoint taken mid-schedule."""
        self._check_usable()
        persistence.save_adapter(self, save_directory)

    def load_adapter_state(self, tensors: Mapping[str, torch.Tensor], source: str = "adapter") -> None:
        """Copy saved tensors in, after checking names and shapes against this base model."""
        persistence.load_adapter_state(self, tensors, source)

    def push_to_hub(self, repo_id: str, *, private: bool | None = None, token: str | bool | None = None,
                    commit_message: str | None = None, revision: str | None = None, create_pr: bool = False) -> Any:
        """Upload the adapter (the files ``save_pretrained`` writes; never the base model) to a Hub model repo,
        created if missing; ``from_pretrained(base, repo_id)`` loads it back."""
        from .hub import push_adapter

        return push_adapter(self, repo_id, private=private, token=token, commit_message=commit_message,
                            revision=revision, create_pr=create_pr)

    @classmethod
    def from_pretrained(
        cls, model: nn.Module, adapter_directory: str | Path, is_trainable: bool = False, *,
        revision: str | None = None, token: str | bool | None = None,
    ) -> LoRA2Model:
        """Load an adapter written by ``save_pretrained`` (a directory, or a Hub repo id that ``push_to_hub``
        filled) onto a fresh base model."""
        return persistence.load_adapter(cls, model, adapter_directory, is_trainable, revision, token)


def get_lora2_model(model: nn.Module, config: LoRA2Config) -> LoRA2Model:
    """Wrap ``model`` with LoRA² adapters as ``config`` describes (the PEFT-style entry point)."""
    if not isinstance(config, LoRA2Config):
        raise TypeError(f"get_lora2_model expects a lora2.LoRA2Config, got {type(config).__name__}.")
    return LoRA2Model(model, config)
