"""🤗 Trainer integration: one allocator step per optimizer step, logs, checkpointed state, resume."""

from __future__ import annotations

import json
import shutil
import warnings

import datasets
import pytest
import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from lora2 import LoRA2Callback, LoRA2Config, LoRA2Model, LoRA2Trainer, get_lora2_model
from lora2.persistence import ALLOCATOR_STATE_NAME, load_allocator_state

from .conftest import BERT_TARGETS, tiny_bert, tiny_gpt2, tiny_llama


class ToyDataset(torch.utils.data.Dataset):
    def __init__(self, n: int = 64, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(1, 120, (n, 10), generator=gen)
        self.labels = (self.ids[:, 0] > 60).long()

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": torch.ones(10, dtype=torch.long), "labels": self.labels[i]}


def lora2_model():
    """One learning rate (lam_lr_ratio=1), so a plain Trainer's optimizer is accepted."""
    cfg = LoRA2Config(k=2, r=4, target_rank=1, init_warmup=4, final_warmup=8, mask_interval=2, lam_lr_ratio=1.0,
                      target_modules=BERT_TARGETS, modules_to_save=["classifier"])
    return get_lora2_model(tiny_bert(), cfg)


def args(tmp_path, **kw) -> TrainingArguments:
    base = {"output_dir": str(tmp_path), "per_device_train_batch_size": 4, "gradient_accumulation_steps": 2,
            "max_steps": 24, "learning_rate": 5e-3, "logging_steps": 4, "save_steps": 12, "report_to": [],
            "use_cpu": True, "seed": 0, "disable_tqdm": True, "lr_scheduler_type": "constant"}
    base.update(kw)
    return TrainingArguments(**base)


def test_callback_runs_the_allocator_once_per_optimizer_step(tmp_path):
    model = lora2_model()
    trainer = Trainer(model=model, args=args(tmp_path), train_dataset=ToyDataset(), callbacks=[LoRA2Callback()])
    assert trainer.label_names == ["labels"]  # found through LoRA2Model.forward, so evaluation gets labels
    trainer.train()
    alloc = model.allocator
    assert model.lora2_config.total_step == 24  # taken from the trainer
    assert (alloc.num_updates, alloc.step) == (24, 24)  # 48 micro-batches, 24 optimizer steps
    assert alloc.masks().sum().item() == alloc.b_target == 12
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert all("lora2_orth_reg" in h and "lora2_active_sv" in h for h in logged)
    for h in logged:  # each regulariser term next to R (means over matrices, γ not applied; they sum to R)
        terms = [h["lora2_orth_uv"], h["lora2_orth_UV"], h["lora2_orth_PQ"]]
        assert all(t > 0 for t in terms) and sum(terms) == pytest.approx(h["lora2_orth_reg"], abs=3e-6)
    assert logged[-1]["lora2_budget"] == 12
    for step in (12, 24):
        state = load_allocator_state(tmp_path / f"checkpoint-{step}")
        assert state["step"] == step
    assert torch.equal(load_allocator_state(tmp_path / "checkpoint-24")["tensors"]["masks"], alloc.masks())


def test_lora2_trainer_keeps_the_columns_the_wrapped_model_accepts(tmp_path):
    toy = ToyDataset(32)
    rows = {"input_ids": toy.ids.tolist(), "attention_mask": [[1] * 10] * 32, "labels": toy.labels.tolist(),
            "sentence": ["unused text column"] * 32}
    model = lora2_model()
    trainer = LoRA2Trainer(model=model, args=args(tmp_path, max_steps=14, save_steps=100),
                           train_dataset=datasets.Dataset.from_dict(rows))
    assert isinstance(trainer.callback_handler.callbacks[0], LoRA2Callback)
    trainer.train()
    assert model.allocator.num_updates == 14
    assert model.allocator.masks().sum().item() == 12


def test_schedule_errors_are_caught_before_training(tmp_path):
    model = lora2_model()
    trainer = Trainer(model=model, args=args(tmp_path, max_steps=12), train_dataset=ToyDataset(),
                      callbacks=[LoRA2Callback()])
    with pytest.raises(ValueError, match=r"the Trainer's max_steps \(TrainingArguments.max_steps or epochs\)=12 "
                                         "leaves no pruning phase"):
        trainer.train()
    assert model.allocator.num_updates == 0


def test_calling_the_allocator_twice_per_step_is_refused(tmp_path):
    model = lora2_model()
    trainer = Trainer(model=model, args=args(tmp_path), train_dataset=ToyDataset(),
                      callbacks=[LoRA2Callback(), LoRA2Callback()])
    with pytest.raises(ValueError, match="exactly once per optimizer step"):
        trainer.train()


def test_resume_from_checkpoint_continues_identically(tmp_path):
    torch.manual_seed(0)
    full = lora2_model()
    Trainer(model=full, args=args(tmp_path / "full"), train_dataset=ToyDataset(),
            callbacks=[LoRA2Callback()]).train()

    torch.manual_seed(0)
    first = lora2_model()
    Trainer(model=first, args=args(tmp_path / "cut", max_steps=24), train_dataset=ToyDataset(),
            callbacks=[LoRA2Callback()]).train(resume_from_checkpoint=None)
    # a fresh process resumes from the step-12 checkpoint (mid pruning phase: steps 5..16)
    resumed = lora2_model()
    trainer = Trainer(model=resumed, args=args(tmp_path / "cut"), train_dataset=ToyDataset(),
                      callbacks=[LoRA2Callback()])
    trainer.train(resume_from_checkpoint=str(tmp_path / "cut" / "checkpoint-12"))
    assert resumed.allocator.step == 24
    assert torch.equal(resumed.allocator.masks(), full.allocator.masks())
    assert resumed.rank_pattern() == full.rank_pattern()
    for key, value in full.adapter_state_dict().items():
        torch.testing.assert_close(resumed.adapter_state_dict()[key], value, rtol=1e-5, atol=1e-6)
    meta = json.loads((tmp_path / "cut" / "checkpoint-12" / ALLOCATOR_STATE_NAME).read_text())
    assert meta["step"] == 12


class CausalToy(torch.utils.data.Dataset):
    def __init__(self, n: int = 32) -> None:
        self.ids = torch.randint(1, 128, (n, 10), generator=torch.Generator().manual_seed(1))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _decoder_model(make):
    cfg = LoRA2Config(k=2, r=4, target_rank=1, init_warmup=4, final_warmup=8, mask_interval=2, orth_reg_weight=0.5,
                      target_modules=["q_proj", "v_proj"] if make is tiny_llama else ["c_attn"])
    return get_lora2_model(make(), cfg)


def test_regulariser_weight_does_not_grow_with_gradient_accumulation(tmp_path):
    losses = {}
    for accumulation in (1, 4):
        model = _decoder_model(tiny_llama)
        trainer = Trainer(model=model, args=args(tmp_path / str(accumulation), per_device_train_batch_size=8 // accumulation,
                                                 gradient_accumulation_steps=accumulation, learning_rate=0.0,
                                                 logging_steps=1, max_steps=13, save_strategy="no"),
                          train_dataset=CausalToy(), callbacks=[LoRA2Callback()])
        trainer.train()
        losses[accumulation] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses[1] == pytest.approx(losses[4], rel=1e-4)  # same global batch, same loss, γR counted once


class UnevenCausalToy(CausalToy):
    """Labels of 16 and of 2 tokens: a token-weighted step differs from a mean of micro-batch means."""

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        labels = self.ids[i].clone()
        labels[2 if i % 2 else 10:] = -100
        return {"input_ids": self.ids[i], "labels": labels}


def _no_dropout(model):
    """The same numbers whatever the micro-batches."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "dropout_prob", None), float):  # transformers 4's SDPA attention reads this
            module.dropout_prob = 0.0
    return model


def _first_steps(trainer) -> list[float]:
    """Loss and gradient norm of every logged step, flat."""
    trainer.train()
    return [v for h in trainer.state.log_history if "loss" in h for v in (h["loss"], h["grad_norm"])]


@pytest.mark.parametrize(("make", "trainer_cls"), [(tiny_llama, LoRA2Trainer), (tiny_llama, Trainer),
                                                   (tiny_gpt2, LoRA2Trainer)])
def test_a_token_weighted_loss_under_accumulation_equals_one_batch_with_the_regulariser_once(tmp_path, make,
                                                                                             trainer_cls):
    """A causal LM's loss counts tokens over the whole step (the 🤗 Trainer passes num_items_in_batch); γ·R, added
    per micro-batch, is weighted by each one's share of the step's tokens and so counts once per optimizer step.
    (GPT-2's LM head has no loss_type: transformers gives it the causal loss and counts its items unshifted.)"""
    steps = {}
    for accumulation in (1, 4):
        model = _no_dropout(_decoder_model(make))
        assert model.accepts_loss_kwargs
        cbs = [LoRA2Callback()] if trainer_cls is Trainer else None
        trainer = trainer_cls(model=model, args=args(tmp_path / str(accumulation), per_device_train_batch_size=8 // accumulation,
                                                     gradient_accumulation_steps=accumulation, learning_rate=0.0,
                                                     logging_steps=1, max_steps=13, save_strategy="no"),
                              train_dataset=UnevenCausalToy(), callbacks=cbs)
        steps[accumulation] = _first_steps(trainer)
        assert model.last_orth_reg is not None and float(model.last_orth_reg) > 1  # γ·R = 0.5 · R is in play
    assert steps[1] == pytest.approx(steps[4], rel=1e-4)
    assert not lora2_model().accepts_loss_kwargs  # BERT's head ignores num_items_in_batch: the Trainer averages


def test_compute_loss_func_under_accumulation_counts_the_regulariser_once(tmp_path):
    """A ``compute_loss_func`` loss is taken as already scaled for accumulation; LoRA2Trainer's γ·R follows."""
    def summed_ce(outputs, labels, num_items_in_batch=None):
        return torch.nn.functional.cross_entropy(outputs.logits, labels, reduction="sum") / num_items_in_batch

    steps = {}
    for accumulation in (1, 4):
        model = _no_dropout(lora2_model())
        model.lora2_config.orth_reg_weight = 0.5
        trainer = LoRA2Trainer(model=model, args=args(tmp_path / str(accumulation), per_device_train_batch_size=8 // accumulation,
                                                      gradient_accumulation_steps=accumulation, learning_rate=0.0,
                                                      logging_steps=1, max_steps=13, save_strategy="no"),
                               train_dataset=ToyDataset(), compute_loss_func=summed_ce)
        steps[accumulation] = _first_steps(trainer)
    assert steps[1] == pytest.approx(steps[4], rel=1e-4)
    assert steps[1][0] > 2  # γ·R (0.5 · 4: the P/Q term of k=2 < r=4) is in the loss, once


def test_the_lr_of_optimizer_cls_and_kwargs_is_used_as_by_the_trainer(tmp_path):
    model = lora2_model()
    trainer = LoRA2Trainer(model=model, args=args(tmp_path, learning_rate=5e-5, max_steps=1),
                           train_dataset=ToyDataset(), optimizer_cls_and_kwargs=(torch.optim.AdamW,
                                                                               {"lr": 1e-3, "betas": (0.8, 0.95)}))
    optimizer = trainer.create_optimizer()
    assert sorted({g["lr"] for g in optimizer.param_groups}) == [1e-3]  # lam_lr_ratio = 1 here
    assert {g["betas"] for g in optimizer.param_groups} == {(0.8, 0.95)}


def test_a_model_compiled_by_the_user_resumes_with_a_plain_trainer(tmp_path):
    """Its checkpoints name every tensor ``_orig_mod.…``: the allocator state is still recognised as this run's."""
    def build():
        torch.manual_seed(0)
        model = lora2_model()
        return model, torch.compile(model, backend="eager")

    full, compiled = build()
    Trainer(model=compiled, args=args(tmp_path / "full", remove_unused_columns=False), train_dataset=ToyDataset(),
            callbacks=[LoRA2Callback()]).train()
    shutil.copytree(tmp_path / "full", tmp_path / "resumed")
    resumed, compiled = build()
    Trainer(model=compiled, args=args(tmp_path / "resumed", remove_unused_columns=False), train_dataset=ToyDataset(),
            callbacks=[LoRA2Callback()]).train(resume_from_checkpoint=str(tmp_path / "resumed" / "checkpoint-12"))
    assert torch.equal(resumed.allocator.masks(), full.allocator.masks())
    for name, layer in full.lora2_layers.items():
        torch.testing.assert_close(resumed.lora2_layers[name].lam, layer.lam)


def test_lora2_trainer_checkpoints_tied_models_adapter_only_and_resumes_from_anywhere(tmp_path):
    torch.manual_seed(0)
    full = _decoder_model(tiny_gpt2)
    LoRA2Trainer(model=full, args=args(tmp_path / "full", per_device_train_batch_size=4),
                 train_dataset=CausalToy()).train()
    torch.manual_seed(0)
    first = _decoder_model(tiny_gpt2)
    LoRA2Trainer(model=first, args=args(tmp_path / "first", per_device_train_batch_size=4),
                 train_dataset=CausalToy()).train()
    checkpoint = tmp_path / "first" / "checkpoint-12"
    assert sorted(p.name for p in checkpoint.iterdir() if p.name.startswith("lora2")) == [
        "lora2_adapter.safetensors", "lora2_allocator.json", "lora2_allocator.safetensors", "lora2_config.json"]
    assert not (checkpoint / "model.safetensors").exists()  # no base weights
    moved = shutil.copytree(checkpoint, tmp_path / "elsewhere" / "checkpoint-12")
    resumed = _decoder_model(tiny_gpt2)
    LoRA2Trainer(model=resumed, args=args(tmp_path / "other-output", per_device_train_batch_size=4),
                 train_dataset=CausalToy()).train(resume_from_checkpoint=str(moved))
    assert torch.equal(resumed.allocator.masks(), full.allocator.masks())
    for key, value in full.adapter_state_dict().items():
        torch.testing.assert_close(resumed.adapter_state_dict()[key], value, rtol=1e-5, atol=1e-6)


def test_plain_trainer_refuses_to_checkpoint_tied_weights_up_front(tmp_path):
    model = _decoder_model(tiny_gpt2)
    trainer = Trainer(model=model, args=args(tmp_path, per_device_train_batch_size=4), train_dataset=CausalToy(),
                      callbacks=[LoRA2Callback()])
    with pytest.raises(ValueError, match=r"Use lora2\.LoRA2Trainer"):
        trainer.train()
    assert model.allocator.num_updates == 0


class Recorder(TrainerCallback):
    def __init__(self) -> None:
        self.seen: list[dict] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.seen.append(dict(logs))


def test_reporting_integrations_see_the_lora2_values(tmp_path):
    recorder = Recorder()
    trainer = LoRA2Trainer(model=lora2_model(), args=args(tmp_path, save_strategy="no"), train_dataset=ToyDataset())
    trainer.callback_handler.callbacks.insert(0, recorder)  # where report_to integrations sit: before ours
    trainer.train()
    steps = [entry for entry in recorder.seen if "loss" in entry]
    assert steps and all({"lora2_active_sv", "lora2_effective_rank", "lora2_orth_reg", "lora2_budget"} <= set(entry)
                     for entry in steps)


# -- lam_lr_ratio: LoRA+-style learning rate for lam ------------------------------------------------
def ratio_model(ratio: float):
    cfg = LoRA2Config(k=2, r=4, target_rank=1, init_warmup=4, final_warmup=8, mask_interval=2, lam_lr_ratio=ratio,
                      target_modules=BERT_TARGETS, modules_to_save=["classifier"])
    return get_lora2_model(tiny_bert(), cfg)


def lam_and_other_lrs(optimizer, model) -> tuple[set[float], set[float]]:
    lam = {id(layer.lam) for layer in model.lora2_layers.values()}
    lrs: tuple[set[float], set[float]] = (set(), set())
    for group in optimizer.param_groups:
        for p in group["params"]:
            lrs[0 if id(p) in lam else 1].add(group.get("initial_lr", group["lr"]))
    return lrs


def test_lora2_trainer_trains_lam_at_the_ratio(tmp_path):
    model = ratio_model(8.0)
    trainer = LoRA2Trainer(model=model, args=args(tmp_path, save_strategy="no", max_steps=16, weight_decay=0.01),
                           train_dataset=ToyDataset())
    trainer.train()
    lam_lrs, other_lrs = lam_and_other_lrs(trainer.optimizer, model)
    assert other_lrs == {5e-3} and sorted(lam_lrs) == pytest.approx([8 * 5e-3])
    decay = {g["weight_decay"] for g in trainer.optimizer.param_groups
             if any(p is model.base_model.classifier.bias for p in g["params"])}
    assert decay == {0.0}  # the Trainer's no-decay rule for biases is kept
    assert model.allocator.num_updates == 16
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert sum(p.numel() for g in trainer.optimizer.param_groups for p in g["params"]) == trainable


def test_plain_trainer_must_be_given_the_groups_for_a_lam_ratio(tmp_path):
    model = ratio_model(8.0)
    plain = Trainer(model=model, args=args(tmp_path, save_strategy="no", max_steps=16), train_dataset=ToyDataset(),
                    callbacks=[LoRA2Callback()])
    with pytest.raises(ValueError, match=r"lam_lr_ratio=8\.0.*optimizer_param_groups"):
        plain.train()
    assert model.allocator.num_updates == 0
    default = get_lora2_model(tiny_bert(), LoRA2Config(k=2, r=4, target_rank=1, init_warmup=4, final_warmup=8,
                                                       target_modules=BERT_TARGETS, modules_to_save=["classifier"]))
    plain = Trainer(model=default, args=args(tmp_path, save_strategy="no", max_steps=16), train_dataset=ToyDataset(),
                    callbacks=[LoRA2Callback()])
    with pytest.raises(ValueError, match=r"lam_lr_ratio=16\.0.*LoRA2Trainer"):  # the default ratio is never dropped
        plain.train()
    model = ratio_model(8.0)
    optimizer = torch.optim.AdamW(model.optimizer_param_groups(5e-3))
    given = Trainer(model=model, args=args(tmp_path, save_strategy="no", max_steps=16), train_dataset=ToyDataset(),
                    callbacks=[LoRA2Callback()], optimizers=(optimizer, None))
    given.train()
    lam_lrs, other_lrs = lam_and_other_lrs(optimizer, model)
    assert other_lrs == {5e-3} and sorted(lam_lrs) == pytest.approx([8 * 5e-3])
    assert model.allocator.num_updates == 16


def test_load_best_model_at_end_loads_the_best_adapter_and_allocator(tmp_path):
    model = lora2_model()
    run_args = args(tmp_path, eval_strategy="steps", eval_steps=4, save_steps=4, load_best_model_at_end=True,
                    metric_for_best_model="eval_loss", greater_is_better=True, learning_rate=5e-2)
    trainer = LoRA2Trainer(model=model, args=run_args, train_dataset=ToyDataset(), eval_dataset=ToyDataset(n=16, seed=1))
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert best is not None and not best.endswith("checkpoint-24")  # "greater is better" on a falling loss
    assert trainer.evaluate()["eval_loss"] == pytest.approx(trainer.state.best_metric, rel=1e-6)
    assert model.allocator.step == int(best.rsplit("-", 1)[1])  # the allocator state of that step came with it


def test_load_best_model_at_end_says_when_the_best_checkpoint_predates_pruning(tmp_path):
    run_args = args(tmp_path, eval_strategy="steps", eval_steps=4, save_steps=4, load_best_model_at_end=True,
                    metric_for_best_model="eval_loss", greater_is_better=True, learning_rate=5e-2)
    trainer = LoRA2Trainer(model=lora2_model(), args=run_args, train_dataset=ToyDataset(),
                           eval_dataset=ToyDataset(n=16, seed=1))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    said = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    step = int(trainer.state.best_model_checkpoint.rsplit("-", 1)[1])
    assert step < 16  # t_init 4, t_final 8 of 24 steps: pruning ends at step 16
    assert [m.split(":")[0] for m in said] == [f"load_best_model_at_end loaded checkpoint-{step}"]
    assert "The best checkpoint predates the end of pruning" in said[0]


def test_plain_trainer_best_model_brings_the_allocator_along(tmp_path):
    """A plain Trainer reloads the best checkpoint's weights and masks itself; the callback follows with the allocator
    state saved beside them and says that the adapter predates the end of pruning."""
    model = lora2_model()
    run_args = args(tmp_path, eval_strategy="steps", eval_steps=4, save_steps=4, load_best_model_at_end=True,
                    metric_for_best_model="eval_loss", greater_is_better=True, learning_rate=5e-2)
    trainer = Trainer(model=model, args=run_args, train_dataset=ToyDataset(), eval_dataset=ToyDataset(n=16, seed=1),
                      callbacks=[LoRA2Callback()])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    best = trainer.state.best_model_checkpoint
    step = int(best.rsplit("-", 1)[1])
    assert step < 16  # before the end of pruning (t_init 4, t_final 8 of 24 steps)
    saved = load_allocator_state(best)
    assert model.allocator.step == saved["step"] == step
    assert torch.equal(model.allocator.masks(), saved["tensors"]["masks"])
    assert model.allocator.masks().sum().item() > model.allocator.b_target
    assert torch.equal(model.allocator.ema_i["lam"], saved["tensors"]["ema_i.lam"])
    said = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert [m.split(":")[0] for m in said] == [f"load_best_model_at_end loaded checkpoint-{step}"]


def test_plain_trainer_best_follow_needs_the_checkpoints_weights_not_just_its_masks(tmp_path):
    """Masks are frozen in the last phase, so a checkpoint from there has the final masks whether or not the Trainer
    restored it; only its λ tell. The allocator follows when the weights are the checkpoint's, and only then."""
    from safetensors.torch import load_file

    model = lora2_model()
    callback = LoRA2Callback()
    trainer = Trainer(model=model, args=args(tmp_path, save_steps=4), train_dataset=ToyDataset(), callbacks=[callback])
    trainer.train()
    late = tmp_path / "checkpoint-20"  # in the final phase (pruning ends at step 16)
    assert torch.equal(load_allocator_state(late)["tensors"]["masks"], model.allocator.masks())
    trainer.state.best_model_checkpoint = str(late)
    callback._follow_plain_best_model(trainer.state, model)  # the Trainer kept the last model
    assert model.allocator.step == 24 and not callback.best_loaded
    model.load_state_dict(load_file(late / "model.safetensors"))  # what the Trainer's restore does
    callback._follow_plain_best_model(trainer.state, model)
    assert model.allocator.step == 20 and callback.best_loaded


def test_allocator_state_goes_to_the_folder_the_trainer_saved(tmp_path):
    """Under hyperparameter_search the Trainer saves to output_dir/run-<trial>/checkpoint-N; the callback, which is
    not told the trial, puts the allocator state beside those weights, not in a folder of its own."""
    import os
    from types import SimpleNamespace

    from lora2.trainer import checkpoint_dir

    run_args, state = args(tmp_path), SimpleNamespace(global_step=8, is_world_process_zero=True)
    assert checkpoint_dir(run_args, state) == tmp_path / "checkpoint-8"  # nothing saved yet: the usual place
    trial = tmp_path / "run-2" / "checkpoint-8"
    trial.mkdir(parents=True)
    model = lora2_model()
    LoRA2Callback().on_save(run_args, state, None, model=model)
    assert (trial / ALLOCATOR_STATE_NAME).is_file() and not (tmp_path / "checkpoint-8").exists()
    (tmp_path / "checkpoint-8").mkdir()  # a plain run beside an old trial's folder: the newest one is this step's
    os.utime(trial, ns=(1, 1))
    assert checkpoint_dir(run_args, state) == tmp_path / "checkpoint-8"


def test_label_smoothing_keeps_the_regulariser_in_the_loss(tmp_path):
    model = lora2_model()
    trainer = LoRA2Trainer(model=model, args=args(tmp_path, label_smoothing_factor=0.1, save_strategy="no"),
                           train_dataset=ToyDataset())
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no "trained without the orthogonality regulariser"
        trainer.train()
    assert model.regularizer_calls == 48  # once per micro-batch (24 steps × 2), added by LoRA2Trainer.compute_loss
    model.train()
    batch = {k: v.unsqueeze(0) for k, v in ToyDataset()[0].items()}
    torch.manual_seed(0)
    smoothed = trainer.compute_loss(model, dict(batch))
    torch.manual_seed(0)  # the same dropout masks
    with torch.no_grad():
        plain = trainer.label_smoother(model(**{k: v for k, v in batch.items() if k != "labels"}), batch["labels"])
    assert float(smoothed - plain) == pytest.approx(0.1 * float(model.last_orth_reg), rel=1e-4)


@pytest.mark.parametrize("trainer_cls", [LoRA2Trainer, Trainer])
def test_label_smoothing_shifts_a_causal_lms_labels(tmp_path, trainer_cls):
    """The 🤗 Trainer shifts the labels for label smoothing only when the model's name is a causal LM class; as
    "LoRA2Model" it smoothed the unshifted ones, training each position to predict its own token."""
    from transformers.trainer_pt_utils import LabelSmoother

    model = _no_dropout(_decoder_model(tiny_llama))
    assert model._get_name() == "LlamaForCausalLM"
    trainer = trainer_cls(model=model, args=args(tmp_path, label_smoothing_factor=0.1, save_strategy="no",
                                                 gradient_accumulation_steps=1),
                          train_dataset=CausalToy(), callbacks=[] if trainer_cls is LoRA2Trainer else [LoRA2Callback()])
    model.train()
    batch = {k: torch.stack([CausalToy()[i][k] for i in range(4)]) for k in ("input_ids", "labels")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loss = trainer.compute_loss(model, dict(batch))
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"])
        shifted = LabelSmoother(epsilon=0.1)(logits, batch["labels"], shift_labels=True)
        unshifted = LabelSmoother(epsilon=0.1)(logits, batch["labels"])
    reg = 0.5 * float(model.orth_regularization().detach()) if trainer_cls is LoRA2Trainer else 0.0  # the plain one warns
    assert float(loss) == pytest.approx(float(shifted) + reg, rel=1e-5)
    assert abs(float(shifted) - float(unshifted)) > 1e-3  # far outside the tolerance above: the check can tell


# -- resuming and training again: the schedule a checkpoint was made for ------------------------------------------
def _trained(tmp_path, trainer_cls=LoRA2Trainer, **kw):
    model = lora2_model()
    callbacks = [] if trainer_cls is LoRA2Trainer else [LoRA2Callback()]
    trainer = trainer_cls(model=model, args=args(tmp_path, **kw), train_dataset=ToyDataset(), callbacks=callbacks)
    trainer.train()
    return model, trainer


def _adapter(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.adapter_state_dict().items()}


@pytest.mark.parametrize("trainer_cls", [LoRA2Trainer, Trainer])
def test_a_resume_that_would_reshape_the_schedule_or_change_the_config_is_refused(tmp_path, trainer_cls):
    _trained(tmp_path, trainer_cls)
    callbacks = [] if trainer_cls is LoRA2Trainer else [LoRA2Callback()]
    longer = trainer_cls(model=lora2_model(), args=args(tmp_path, max_steps=32), train_dataset=ToyDataset(),
                         callbacks=callbacks)
    with pytest.raises(ValueError, match=r"made for 24 optimizer steps, this run has max_steps=32"):
        longer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-12"))
    other = get_lora2_model(tiny_bert(), LoRA2Config(k=2, r=4, target_rank=1, init_warmup=4, final_warmup=8,
                                                     mask_interval=2, lam_lr_ratio=1.0, alpha=64,
                                                     target_modules=BERT_TARGETS, modules_to_save=["classifier"]))
    changed = trainer_cls(model=other, args=args(tmp_path), train_dataset=ToyDataset(), callbacks=[LoRA2Callback()])
    with pytest.raises(ValueError, match=r"differs from the one the checkpoint was trained with \(alpha: 32.0 → 64\)"):
        changed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-12"))
    stale = lora2_model()  # a config whose total_step the Trainer overrides with max_steps (it warns): resumes
    stale.lora2_config.total_step = 48
    with pytest.warns(UserWarning, match="differs from the Trainer's max_steps=24"):
        trainer_cls(model=stale, args=args(tmp_path), train_dataset=ToyDataset(), callbacks=callbacks).train(
            resume_from_checkpoint=str(tmp_path / "checkpoint-12"))
    assert stale.allocator.step == 24 and stale.lora2_config.total_step == 24
    done_model = lora2_model()  # a complete run resumed (auto-resume scripts): transformers may step once more
    done = trainer_cls(model=done_model, args=args(tmp_path), train_dataset=ToyDataset(), callbacks=callbacks)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        done.train(resume_from_checkpoint=str(tmp_path / "checkpoint-24"))
    past = [w for w in caught if "past the 24-step pruning schedule" in str(w.message)]
    assert len(past) == (done.state.global_step - 24) <= 1  # said once when it happens, never an error
    assert torch.equal(done_model.allocator.masks(), load_allocator_state(tmp_path / "checkpoint-24")["tensors"]["masks"])
    assert done_model.allocator.step == 24


def test_training_a_trained_model_again_is_refused_before_anything_moves(tmp_path):
    model, _ = _trained(tmp_path / "a", save_strategy="no")
    before = _adapter(model)
    again = LoRA2Trainer(model=model, args=args(tmp_path / "b", save_strategy="no", max_steps=8),
                         train_dataset=ToyDataset())
    with pytest.raises(RuntimeError, match=r"already ran 24 steps .* 12 of 48 singular values.*is_trainable=True"):
        again.train()
    assert all(torch.equal(before[k], v) for k, v in _adapter(model).items())


def test_a_pruned_adapter_loaded_to_train_keeps_its_masks(tmp_path):
    model, _ = _trained(tmp_path / "run", save_strategy="no")
    model.save_pretrained(tmp_path / "adapter")
    masks = model.allocator.masks().clone()
    loaded = LoRA2Model.from_pretrained(tiny_bert(), tmp_path / "adapter", is_trainable=True)
    assert loaded.allocator.frozen and not loaded.allocator.prunes
    trainer = LoRA2Trainer(model=loaded, args=args(tmp_path / "more", save_strategy="no", max_steps=10),
                           train_dataset=ToyDataset(seed=3))
    trainer.train()
    assert torch.equal(loaded.allocator.masks(), masks) and loaded.allocator.num_updates == 10
    for layer in loaded.lora2_layers.values():
        assert torch.equal(layer.lam.detach() * (1 - layer.mask), torch.zeros_like(layer.lam))  # pruned λ stay 0
    assert not LoRA2Model.from_pretrained(tiny_bert(), tmp_path / "adapter").allocator.frozen  # inference: untouched


def test_a_mid_schedule_adapter_loaded_to_train_restarts_its_schedule_and_says_so(tmp_path):
    _trained(tmp_path, max_steps=24, save_steps=6)  # checkpoint-6: mid-schedule (pruning runs from step 5 to 16)
    with pytest.warns(UserWarning, match=r"stopped mid-schedule \(\d+ of 48 singular values active, target 12\)"):
        loaded = LoRA2Model.from_pretrained(tiny_bert(), tmp_path / "checkpoint-6", is_trainable=True)
    assert not loaded.allocator.frozen and loaded.allocator.prunes


def test_a_plain_trainer_resuming_elsewhere_does_not_take_another_runs_allocator_state(tmp_path):
    _trained(tmp_path / "A", Trainer)  # leaves A/checkpoint-12
    _trained(tmp_path / "B", Trainer, learning_rate=2e-3)
    resumed = Trainer(model=lora2_model(), args=args(tmp_path / "A"), train_dataset=ToyDataset(),
                      callbacks=[LoRA2Callback()])
    with pytest.raises(RuntimeError, match=r"checkpoint-12 belongs to another run"):
        resumed.train(resume_from_checkpoint=str(tmp_path / "B" / "checkpoint-12"))


def test_lora2_trainer_names_a_plain_trainer_checkpoint(tmp_path):
    _trained(tmp_path / "plain", Trainer)
    trainer = LoRA2Trainer(model=lora2_model(), args=args(tmp_path / "l2"), train_dataset=ToyDataset())
    with pytest.raises(FileNotFoundError, match=r"written by a plain transformers.Trainer"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "plain" / "checkpoint-12"))


def test_a_plain_trainer_without_the_callback_is_told_when_it_saves(tmp_path):
    model = lora2_model()
    trainer = Trainer(model=model, args=args(tmp_path, max_steps=3, save_strategy="no"), train_dataset=ToyDataset())
    trainer.train()  # 6 forwards: under the 200-forward warning
    with pytest.warns(RuntimeWarning, match=r"trained for 6 forward passes without update_and_allocate.*LoRA2Callback"):
        trainer.save_model(str(tmp_path / "saved"))


@pytest.mark.parametrize("strategy", ["every_save", "checkpoint"])
def test_pushes_during_training_upload_the_adapter_and_a_resumable_checkpoint(tmp_path, monkeypatch, strategy):
    """transformers pushes a fixed list of weight files during training (full-model and PEFT names): the LoRA²
    adapter went up only at the end; and hub_strategy='checkpoint' uploaded the checkpoint before the allocator
    state was written into it, so it could not be resumed. A fake Hub API records what each upload holds."""
    import os

    import transformers.trainer as hf_trainer

    uploads = []

    class Done:
        def done(self):
            return True

        is_done = done

    class FakeApi:
        def create_repo(self, repo_id, **kwargs):
            return type("Repo", (), {"repo_id": repo_id})()

        def upload_folder(self, repo_id=None, folder_path=None, path_in_repo=None, ignore_patterns=None, **kwargs):
            files = sorted(os.path.relpath(os.path.join(root, f), folder_path)
                           for root, _, names in os.walk(folder_path) for f in names)
            uploads.append((path_in_repo, files))
            return Done()

        def __getattr__(self, name):
            return lambda *args, **kwargs: None

    monkeypatch.setattr(hf_trainer, "hf_api", lambda *args, **kwargs: FakeApi(), raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    trainer = LoRA2Trainer(model=lora2_model(), args=args(tmp_path, push_to_hub=True, hub_model_id="me/x",
                                                         hub_strategy=strategy), train_dataset=ToyDataset())
    trainer.train()
    assert uploads
    for path_in_repo, files in uploads:
        if path_in_repo == "last-checkpoint":
            assert {"lora2_adapter.safetensors", "lora2_config.json", "lora2_allocator.safetensors"} <= set(files)
        else:
            assert {"lora2_adapter.safetensors", "lora2_config.json", "training_args.bin"} <= set(files), files
