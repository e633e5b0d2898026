"""🤗 Trainer integration: the allocator once per optimizer step, its state in every checkpoint.

``LoRA2Callback`` does the work; ``LoRA2Trainer`` is a Trainer that installs it first in the
callback list, reads the dataset columns from the wrapped model's forward signature, and builds
its optimizer from ``LoRA2Model.optimizer_param_groups`` (so ``lam_lr_ratio`` applies).
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from transformers import Trainer, TrainerCallback
from transformers.trainer import TRAINING_ARGS_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import SAFE_WEIGHTS_NAME as FULL_WEIGHTS_NAME
from transformers.utils import find_labels

from .config import CONFIG_NAME
from .model import LoRA2Model
from .optim import check_lam_lr
from .persistence import (
    ALLOCATOR_STATE_NAME,
    WEIGHTS_NAME,
    atomic_write,
    load_allocator_state,
    read_tensors,
    save_allocator_state,
)

logger = logging.getLogger(__name__)
BEST_EARLY = ("The best checkpoint predates the end of pruning, so it keeps more singular values than target_rank "
              "asks for; evaluate with save_steps/eval_steps that reach the schedule's end to compare pruned adapters.")


def find_lora2_model(model: Any) -> LoRA2Model:
    """Unwrap DDP/accelerate containers down to the LoRA2Model."""
    seen = model
    while not isinstance(seen, LoRA2Model) and (hasattr(seen, "module") or hasattr(seen, "_orig_mod")):
        seen = seen.module if hasattr(seen, "module") else seen._orig_mod  # DDP, accelerate; torch.compile
    if not isinstance(seen, LoRA2Model):
        raise TypeError(
            f"LoRA2Callback needs the Trainer's model to be a LoRA2Model (from lora2.get_lora2_model), "
            f"got {type(model).__name__}."
        )
    return seen


def checkpoint_dir(args, state) -> Path:
    """The Trainer's folder for this step's checkpoint: ``output_dir/checkpoint-N``, or, under
    ``hyperparameter_search``, the trial's ``output_dir/run-*/checkpoint-N`` (the newest one that exists; a
    callback is not told the trial)."""
    name = f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
    root = Path(args.output_dir)
    found = [d for d in (root / name, *root.glob(f"*/{name}")) if d.is_dir()]
    return max(found, key=lambda d: d.stat().st_mtime_ns) if found else root / name


def log_values(lora2_model: LoRA2Model) -> dict[str, float]:
    """Active singular values (mask sums) beside the summed effective rank of ΔW (at most k per matrix; a
    small SVD per matrix, tens of ms for a BERT-base at logging steps), the current budget b(t), and the
    last regulariser value with each of its terms."""
    pattern = lora2_model.rank_pattern()
    extra: dict[str, float] = {"lora2_active_sv": sum(v["active"] for v in pattern.values()),
                               "lora2_effective_rank": sum(v["effective_rank"] for v in pattern.values())}
    if lora2_model.allocator.prunes and lora2_model.lora2_config.total_step and lora2_model.allocator.step > 0:
        extra["lora2_budget"] = lora2_model.allocator.budget(lora2_model.allocator.step)
    if lora2_model.last_orth_reg is not None:
        extra["lora2_orth_reg"] = round(float(lora2_model.last_orth_reg), 6)
        for term, value in lora2_model.last_orth_terms.items():  # lora2_orth_uv, _UV, _PQ: mean per matrix, no γ
            extra[f"lora2_orth_{term}"] = round(value, 6)
    return extra


class LoRA2Callback(TrainerCallback):
    """Sets total_step from the Trainer, runs ``update_and_allocate`` each optimizer step, logs the
    budget and regulariser, checkpoints the allocator, and fails loudly if it never ran."""

    def __init__(self) -> None:
        self._updates_at_start = 0
        self._step_at_start = 0
        self._past_end = 0  # optimizer steps past total_step (skipped, with a warning)
        self._verified_at: int | None = None
        self.best_loaded = False  # set by LoRA2Trainer when load_best_model_at_end replaced the model
        self.adapter_only_checkpoints = False  # set by LoRA2Trainer

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        lora2_model = find_lora2_model(model)
        cfg = lora2_model.lora2_config
        total = int(state.max_steps)
        self._refuse_a_second_schedule(state, lora2_model, total)
        if cfg.total_step is not None and cfg.total_step != total:
            warnings.warn(
                f"LoRA2Config.total_step={cfg.total_step} differs from the Trainer's max_steps={total}; "
                "using the Trainer's value for the budget schedule.",
                stacklevel=2,
            )
        if lora2_model.allocator.prunes:
            cfg.check_schedule(total, source="the Trainer's max_steps (TrainingArguments.max_steps or epochs)")
        check_lam_lr(kwargs.get("optimizer"), lora2_model)
        cfg.total_step = total
        if not self.adapter_only_checkpoints:
            self._check_checkpointing(args, lora2_model)
        if state.global_step > 0 and lora2_model.allocator.step != state.global_step:
            checkpoint = checkpoint_dir(args, state)
            if not (checkpoint / ALLOCATOR_STATE_NAME).is_file():
                raise RuntimeError(
                    f"Resuming at step {state.global_step}, but {checkpoint} holds no LoRA² allocator state "
                    f"({ALLOCATOR_STATE_NAME}); the run cannot continue identically. Was it saved without LoRA2Callback? "
                    "A plain Trainer's callback looks for it under output_dir only: to resume from a checkpoint "
                    "elsewhere, use lora2.LoRA2Trainer, which reads it from the checkpoint you name."
                )
            if self._holds_weights_of(checkpoint, lora2_model) is False:  # None: nothing to compare with
                raise RuntimeError(
                    f"The LoRA² allocator state in {checkpoint} belongs to another run: its λ and masks differ from the "
                    "checkpoint the Trainer resumed from. A plain Trainer's callback looks for it under output_dir "
                    "only: resume from a checkpoint there, or use lora2.LoRA2Trainer, which reads the allocator state "
                    "from the checkpoint you name."
                )
            saved = load_allocator_state(checkpoint)
            lora2_model.allocator.check_resumable(saved, total, steps_name="max_steps")
            lora2_model.allocator.load_state_dict(saved)
            logger.info("LoRA²: allocator state restored from %s", checkpoint)
        if state.global_step > 0:
            self._check_resumed_schedule(lora2_model, total)
        self._updates_at_start = lora2_model.allocator.num_updates
        self._step_at_start = state.global_step
        self._past_end = 0
        self._verified_at = None
        self.best_loaded = False

    @staticmethod
    def _refuse_a_second_schedule(state, lora2_model: LoRA2Model, total: int) -> None:
        """Before anything moves: a model whose allocator already ran, trained again from step 1 (the schedule
        would restart on pruned masks)."""
        alloc = lora2_model.allocator
        if state.global_step == 0 and alloc.num_updates > 0 and alloc.prunes:
            raise RuntimeError(
                f"This model's allocator already ran {alloc.num_updates} steps (an earlier training, now at "
                f"{int(alloc.masks().sum().item())} of {alloc.b0} singular values): a new Trainer.train() would start "
                "its pruning schedule again from step 1 and re-grow pruned values. Resume the earlier run from its "
                "checkpoint (resume_from_checkpoint=...), or save_pretrained() it and load it with "
                "LoRA2Model.from_pretrained(base, path, is_trainable=True), which trains further with its masks kept."
            )

    @staticmethod
    def _check_resumed_schedule(lora2_model: LoRA2Model, total: int) -> None:
        """A resumed run must have the schedule and LoRA² settings its checkpoint was written with (the allocator
        checked its own state on loading; this covers a state loaded before max_steps was known)."""
        saved = lora2_model.allocator.resumed_from
        if saved:
            lora2_model.allocator.check_resumable(saved, total, steps_name="max_steps")

    @staticmethod
    def _check_checkpointing(args, lora2_model: LoRA2Model) -> None:
        """A plain Trainer saves LoRA2Model checkpoints as one full state dict, which safetensors refuses for
        tied weights (GPT-2, many decoders): say so before training instead of crashing at the first save."""
        if str(getattr(args, "save_strategy", "no")).lower().endswith("no"):
            return
        seen: dict[int, str] = {}
        for name, tensor in lora2_model.state_dict(keep_vars=True).items():
            ptr = tensor.data_ptr()
            if ptr in seen and tensor.numel() > 0:
                raise ValueError(
                    f"This model ties {seen[ptr]} and {name}; a plain transformers.Trainer cannot checkpoint it "
                    "(it saves the whole state dict). Use lora2.LoRA2Trainer, which writes adapter-only "
                    "checkpoints, or set save_strategy='no'."
                )
            seen[ptr] = name

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        # global_step is incremented after this event, so the step just taken is global_step + 1.
        lora2_model, step = find_lora2_model(model), state.global_step + 1
        total = lora2_model.lora2_config.total_step
        if lora2_model.allocator.prunes and total is not None and step > total:
            # transformers resuming a complete max_steps run takes one step more: the final masks stay as they are
            if not self._past_end:
                warnings.warn(f"Optimizer step {step} is past the {total}-step pruning schedule (a complete run resumed): "
                              "the final masks are kept.", RuntimeWarning, stacklevel=2)
            self._past_end += 1
            with torch.no_grad():
                lora2_model.allocator.apply_masks()
            return
        lora2_model.update_and_allocate(step)

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        if logs is None or model is None or "lora2_active_sv" in logs:
            return  # LoRA2Trainer.log already added the values (and the history entry has them)
        extra = log_values(find_lora2_model(model))
        logs.update(extra)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(extra)

    def on_save(self, args, state, control, model=None, **kwargs):
        if not args.should_save:  # process 0, or each node's first with save_on_each_node (the weights' rule)
            return
        checkpoint = checkpoint_dir(args, state)
        save_allocator_state(checkpoint, find_lora2_model(model).allocator.state_dict())

    def on_train_end(self, args, state, control, model=None, **kwargs):
        lora2_model = find_lora2_model(model)
        if self._verified_at != state.global_step:  # LoRA2Trainer verifies before loading the best checkpoint
            self.verify_schedule(state, lora2_model)
        if not self.best_loaded and not self.adapter_only_checkpoints and args.load_best_model_at_end:
            self._follow_plain_best_model(state, lora2_model)
        if not self.best_loaded:  # LoRA2Trainer said it already, about the checkpoint it loaded
            lora2_model.warn_if_schedule_unfinished(
                "training ended", "Training stopped early (e.g. early stopping); max_steps sets the schedule's length.")

    def _follow_plain_best_model(self, state, lora2_model: LoRA2Model) -> None:
        """A plain Trainer's ``load_best_model_at_end`` restores the best checkpoint's weights and masks (buffers of
        the full state dict) but not the allocator: bring its step and EMAs to that checkpoint too, so the schedule
        check below and any further training see the adapter that was loaded."""
        best = state.best_model_checkpoint
        if best is None or not (Path(best) / ALLOCATOR_STATE_NAME).is_file():
            return
        saved = load_allocator_state(Path(best))
        if saved["step"] == lora2_model.allocator.step or self._holds_weights_of(Path(best), lora2_model) is not True:
            return  # the Trainer kept the last model (its loader found nothing): its allocator stays with it
        lora2_model.allocator.load_state_dict(saved, check_total_step=False)
        self.best_loaded = True
        lora2_model.warn_if_schedule_unfinished(f"load_best_model_at_end loaded {Path(best).name}", BEST_EARLY)

    @staticmethod
    def _holds_weights_of(checkpoint: Path, lora2_model: LoRA2Model) -> bool | None:
        """Whether the model now holds this checkpoint's λ and masks (read alone from its full state dict): the
        evidence that the Trainer restored it, which equal masks alone are not (they are frozen at the end).
        None when the checkpoint has no full state dict to compare with (sharded FSDP/DeepSpeed saves)."""
        live = {n: t for n, t in lora2_model.state_dict().items() if n.endswith((".lam", ".mask"))}
        path, legacy = checkpoint / FULL_WEIGHTS_NAME, checkpoint / "pytorch_model.bin"
        if path.is_file():
            with safe_open(str(path), framework="pt") as f:
                names = {_unwrapped_name(n): n for n in f.keys()}  # a compiled model's keys start with _orig_mod.
                saved = {n: f.get_tensor(names[n]) for n in live if n in names}
        elif legacy.is_file():  # transformers 4.x with save_safetensors=False
            saved = {_unwrapped_name(n): t for n, t in
                     torch.load(legacy, map_location="cpu", weights_only=True).items()}
        else:
            return None
        if not set(live) <= set(saved):
            return False
        return all(torch.equal(saved[n].to(device=t.device, dtype=t.dtype), t) for n, t in live.items())

    def verify_schedule(self, state, lora2_model: LoRA2Model) -> None:
        """Fail loudly when the allocator did not run exactly once per optimizer step of this training."""
        self._verified_at = state.global_step
        ran = lora2_model.allocator.num_updates - self._updates_at_start + self._past_end
        expected = state.global_step - self._step_at_start
        if lora2_model.allocator.prunes and ran != expected:
            raise RuntimeError(
                f"The LoRA² allocator ran {ran} times during {expected} optimizer steps, so pruning did not follow "
                "its schedule. Register LoRA2Callback once with the Trainer and do not call update_and_allocate "
                "yourself when using it."
            )


def _unwrapped_name(name: str) -> str:
    """A state-dict key without the prefixes of the containers a user may have put around the LoRA2Model
    (``torch.compile``'s ``_orig_mod.``, DataParallel's ``module.``)."""
    while name.startswith(("_orig_mod.", "module.")):
        name = name.split(".", 1)[1]
    return name


class LoRA2Trainer(Trainer):
    """A ``Trainer`` for LoRA2Model: installs ``LoRA2Callback``, logs the LoRA² values before any
    reporting integration sees the logs, builds its optimizer from ``optimizer_param_groups`` (lam at
    lr × lam_lr_ratio), and writes adapter-only checkpoints (adapter + allocator state, no base
    weights, fine with tied embeddings) that ``resume_from_checkpoint`` reads back."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.args.label_names is None:
            self.label_names = find_labels(type(find_lora2_model(self.model).base_model))
        callbacks = [cb for cb in self.callback_handler.callbacks if isinstance(cb, LoRA2Callback)]
        if not callbacks:
            callbacks = [LoRA2Callback()]
            self.callback_handler.callbacks.insert(0, callbacks[0])
        for cb in callbacks:
            cb.adapter_only_checkpoints = True

    def create_optimizer(self, model: Any = None) -> torch.optim.Optimizer:
        """The Trainer's optimizer class and settings over ``optimizer_param_groups`` (lam at lr × lam_lr_ratio),
        keeping the Trainer's rule that biases and norm weights get no weight decay."""
        if self.optimizer is not None:
            return self.optimizer
        opt_model = self.model if model is None else model
        optimizer_cls, kwargs = (getattr(self, "optimizer_cls_and_kwargs", None)
                                 or self.get_optimizer_cls_and_kwargs(self.args, opt_model))
        if not (isinstance(optimizer_cls, type) and issubclass(optimizer_cls, torch.optim.Optimizer)) \
                or {"params", "model", "optimizer_dict"} & set(kwargs):
            return super().create_optimizer(model)  # factories, GaLore, LOMO...: LoRA2Callback checks the ratio
        lora2_model = find_lora2_model(opt_model)
        decay_names = set(self.get_decay_parameter_names(opt_model))
        decay = {id(p) for n, p in opt_model.named_parameters() if n in decay_names}
        no_decay = [n for n, p in lora2_model.named_parameters() if id(p) not in decay]
        kwargs = dict(kwargs)  # an lr in optimizer_cls_and_kwargs wins over args.learning_rate, as in the Trainer
        lr = kwargs.pop("lr", self.args.learning_rate)
        groups = lora2_model.optimizer_param_groups(lr, self.args.weight_decay, no_decay=no_decay)
        self.optimizer = optimizer_cls(groups, **kwargs)
        return self.optimizer

    def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        """The Trainer's loss, plus γ·R when the model did not add it (label smoothing or ``compute_loss_func``
        take the labels away from the model and compute the loss outside it). When the Trainer will not divide
        that loss by the number of micro-batches (a token-weighted loss), γ·R is weighted by this micro-batch's
        share of the step's items, so that it counts once per optimizer step."""
        lora2_model = find_lora2_model(model)
        before = lora2_model.regularizer_calls
        share = lora2_model.item_share({**inputs, "num_items_in_batch": num_items_in_batch})  # before labels go
        result = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                      num_items_in_batch=num_items_in_batch)
        if lora2_model.training and torch.is_grad_enabled() and lora2_model.regularizer_calls == before:
            reg = lora2_model.regularization_loss()
            if reg is not None:
                loss = result[0] if isinstance(result, tuple) else result
                reg = reg.to(device=loss.device, dtype=loss.dtype)
                if share is not None and self._loss_scaled_for_accumulation(num_items_in_batch):
                    reg = reg * share.to(device=loss.device, dtype=loss.dtype) * self._token_average_scale(
                        num_items_in_batch)
                loss = loss + reg
                return (loss, *result[1:]) if isinstance(result, tuple) else loss
        return result

    def _loss_scaled_for_accumulation(self, num_items_in_batch: Any) -> bool:
        """transformers' rule (Trainer.training_step): a loss normalised by ``num_items_in_batch`` is not divided
        by the number of micro-batches."""
        told = getattr(self, "loss_is_scaled_for_ga", None)
        if told is not None:
            return bool(told)
        return bool((self.model_accepts_loss_kwargs and num_items_in_batch is not None)
                    or self.compute_loss_func is not None)

    def _token_average_scale(self, num_items_in_batch: Any) -> float:
        """The factor Trainer.compute_loss multiplies a token-averaged loss by across devices (the count is global,
        data parallelism averages): a term added after it needs it too."""
        if not (getattr(self.args, "average_tokens_across_devices", False) and num_items_in_batch is not None
                and (self.model_accepts_loss_kwargs or self.compute_loss_func)):
            return 1.0
        if self.args.n_gpu > 1:
            return float(self.args.n_gpu)
        tp = self.get_tp_size() if hasattr(self, "get_tp_size") else 1
        return float(self.accelerator.num_processes // tp)

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        logs.update(log_values(find_lora2_model(self.model)))
        super().log(logs, *args, **kwargs)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        if not self.args.should_save:
            return
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        lora2_model = find_lora2_model(self.model)
        if lora2_model.allocator.step < (lora2_model.lora2_config.total_step or 0):
            lora2_model._save_checkpoint(output_dir)  # mid-schedule: unpruned is expected, nothing to warn about
        else:
            lora2_model.save_pretrained(output_dir)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, Path(output_dir) / TRAINING_ARGS_NAME)  # as Trainer._save (tools reread the args)

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        """``push_to_hub`` during training: transformers copies a fixed list of weight files (full-model and PEFT
        names) from the checkpoint to output_dir and uploads that, so the LoRA² adapter never went up before the
        end; and the checkpoint itself (``hub_strategy="checkpoint"``) went up before LoRA2Callback.on_save wrote
        the allocator state, so it could not be resumed. Both are put in place first."""
        if self.args.should_save and self.args.hub_strategy != "end":
            lora2_model = find_lora2_model(self.model)
            save_allocator_state(checkpoint_folder, lora2_model.allocator.state_dict())
            for name in (WEIGHTS_NAME, CONFIG_NAME):
                source = Path(checkpoint_folder) / name
                if source.is_file():
                    data = source.read_bytes()
                    atomic_write(Path(self.args.output_dir) / name, lambda tmp, data=data: Path(tmp).write_bytes(data))
        super()._push_from_checkpoint(checkpoint_folder)

    def _load_best_model(self) -> None:
        """``load_best_model_at_end``: the best checkpoint's adapter and allocator state (the Trainer's own
        loader looks for full-model or PEFT files, finds none and would keep the last model)."""
        best = Path(self.state.best_model_checkpoint)
        lora2_model = find_lora2_model(self.model)
        callbacks = [cb for cb in self.callback_handler.callbacks if isinstance(cb, LoRA2Callback)]
        for cb in callbacks:  # check the schedule of the run before its state is replaced
            cb.verify_schedule(self.state, lora2_model)
        if not (best / WEIGHTS_NAME).is_file():  # e.g. another node without shared storage: keep this model
            logger.warning("LoRA²: the best checkpoint %s holds no %s on this process; keeping the last model. On "
                           "several nodes without a shared disk, set save_on_each_node=True.", best, WEIGHTS_NAME)
            return
        logger.info("LoRA²: loading the best checkpoint %s (%s = %s)", best, self.args.metric_for_best_model,
                    self.state.best_metric)
        self._load_from_checkpoint(str(best))
        for cb in callbacks:
            cb.best_loaded = True
        lora2_model.warn_if_schedule_unfinished(f"load_best_model_at_end loaded {best.name}", BEST_EARLY)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        lora2_model = find_lora2_model(model if model is not None else self.model)
        directory = Path(resume_from_checkpoint)
        if not (directory / WEIGHTS_NAME).is_file() and (directory / FULL_WEIGHTS_NAME).is_file():
            raise FileNotFoundError(
                f"{directory} was written by a plain transformers.Trainer ({FULL_WEIGHTS_NAME}, no {WEIGHTS_NAME}): "
                "resume it with transformers.Trainer and lora2.LoRA2Callback, as it was trained."
            )
        lora2_model.load_adapter_state(read_tensors(directory / WEIGHTS_NAME), source=f"checkpoint {directory}")
        if (directory / ALLOCATOR_STATE_NAME).is_file():
            lora2_model.allocator.load_state_dict(load_allocator_state(directory), check_total_step=False)
        elif lora2_model.allocator.prunes:
            raise RuntimeError(f"{directory} holds no LoRA² allocator state; the run cannot continue identically.")
