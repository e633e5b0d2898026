"""🤗 Trainer integration: the allocator once per optimizer step, its state in every checkpoint.

``LoRA2Callback`` does the work; ``LoRA2Trainer`` is a Trainer that installs it first in the
callback list and reads the dataset columns from the wrapped model's forward signature.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import find_labels

from .model import LoRA2Model
from .persistence import ALLOCATOR_STATE_NAME, load_allocator_state, save_allocator_state

logger = logging.getLogger(__name__)


def find_lora2_model(model: Any) -> LoRA2Model:
    """Unwrap DDP/accelerate containers down to the LoRA2Model."""
    seen = model
    while not isinstance(seen, LoRA2Model) and hasattr(seen, "module"):
        seen = seen.module
    if not isinstance(seen, LoRA2Model):
        raise TypeError(
            f"LoRA2Callback needs the Trainer's model to be a LoRA2Model (from lora2.get_lora2_model), "
            f"got {type(model).__name__}."
        )
    return seen


class LoRA2Callback(TrainerCallback):
    """Sets total_step from the Trainer, runs ``update_and_allocate`` each optimizer step, logs the
    budget and regulariser, checkpoints the allocator, and fails loudly if it never ran."""

    def __init__(self) -> None:
        self._updates_at_start = 0
        self._step_at_start = 0

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        lora2_model = find_lora2_model(model)
        cfg = lora2_model.lora2_config
        total = int(state.max_steps)
        if cfg.total_step is not None and cfg.total_step != total:
            warnings.warn(
                f"LoRA2Config.total_step={cfg.total_step} differs from the Trainer's max_steps={total}; "
                "using the Trainer's value for the budget schedule.",
                stacklevel=2,
            )
        if lora2_model.allocator.prunes:
            cfg.check_schedule(total)
        cfg.total_step = total
        if state.global_step > 0 and lora2_model.allocator.step != state.global_step:
            checkpoint = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
            if not (checkpoint / ALLOCATOR_STATE_NAME).is_file():
                raise RuntimeError(
                    f"Resuming at step {state.global_step}, but {checkpoint} holds no LoRA² allocator state "
                    f"({ALLOCATOR_STATE_NAME}); the run cannot continue identically. Was it saved without LoRA2Callback?"
                )
            lora2_model.allocator.load_state_dict(load_allocator_state(checkpoint))
            logger.info("LoRA²: allocator state restored from %s", checkpoint)
        self._updates_at_start = lora2_model.allocator.num_updates
        self._step_at_start = state.global_step

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        # global_step is incremented after this event, so the step just taken is global_step + 1.
        find_lora2_model(model).update_and_allocate(state.global_step + 1)

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        if logs is None or model is None:
            return
        lora2_model = find_lora2_model(model)
        extra = {"lora2_active_sv": int(lora2_model.allocator.masks().sum().item())}
        if lora2_model.allocator.prunes and lora2_model.lora2_config.total_step and lora2_model.allocator.step > 0:
            extra["lora2_budget"] = lora2_model.allocator.budget(lora2_model.allocator.step)
        if lora2_model.last_orth_reg is not None:
            extra["lora2_orth_reg"] = round(float(lora2_model.last_orth_reg), 6)
        logs.update(extra)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(extra)

    def on_save(self, args, state, control, model=None, **kwargs):
        if not state.is_world_process_zero:
            return
        checkpoint = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        save_allocator_state(checkpoint, find_lora2_model(model).allocator.state_dict())

    def on_train_end(self, args, state, control, model=None, **kwargs):
        lora2_model = find_lora2_model(model)
        ran = lora2_model.allocator.num_updates - self._updates_at_start
        expected = state.global_step - self._step_at_start
        if lora2_model.allocator.prunes and ran != expected:
            raise RuntimeError(
                f"The LoRA² allocator ran {ran} times during {expected} optimizer steps, so pruning did not follow "
                "its schedule. Register LoRA2Callback once with the Trainer and do not call update_and_allocate "
                "yourself when using it."
            )


class LoRA2Trainer(Trainer):
    """A ``Trainer`` for LoRA2Model that installs ``LoRA2Callback`` first in the callback list, so
    every logger and reporting integration sees the LoRA² values."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.args.label_names is None:
            self.label_names = find_labels(type(find_lora2_model(self.model).base_model))
        if not any(isinstance(cb, LoRA2Callback) for cb in self.callback_handler.callbacks):
            self.callback_handler.callbacks.insert(0, LoRA2Callback())
