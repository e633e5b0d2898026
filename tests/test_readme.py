"""The README's Python snippets run as written, in order, on a tiny BERT: a public promise each."""

from __future__ import annotations

import re

import pytest
import torch
from transformers import TrainingArguments

from .conftest import REPO, tiny_bert
from .test_trainer import ToyDataset

SNIPPETS = re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(encoding="utf-8"), re.S)


def snippet(start: str) -> str:
    found = [s for s in SNIPPETS if s.lstrip().startswith(start)]
    assert len(found) == 1, f"README has {len(found)} snippets starting with {start!r}"
    return found[0]


@pytest.fixture
def wrapped(tmp_path):
    """Namespace after the README's first snippet ("Use"), with `path` a saved tiny BERT."""
    tiny_bert().save_pretrained(tmp_path / "base")
    ns = {"path": str(tmp_path / "base")}
    exec(snippet("from transformers import AutoModelForSequenceClassification"), ns)
    assert ns["model"].num_adapter_parameters() > 0 and ns["config"].lam_lr_ratio == 16.0
    return ns


def test_snippets_are_all_covered():
    assert len(SNIPPETS) == 5


def test_plain_loop_snippet_trains_and_prunes(wrapped):
    model = wrapped["model"]
    model.lora2_config.init_warmup, model.lora2_config.final_warmup, model.lora2_config.total_step = 2, 2, 8
    data = ToyDataset(n=32)
    wrapped["loader"] = torch.utils.data.DataLoader(data, batch_size=4)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith(".lam")}
    exec(snippet("import torch"), wrapped)
    groups = wrapped["optimizer"].param_groups
    assert sorted(g["lr"] for g in groups) == pytest.approx([1e-3, 16e-3])  # λ at lr × lam_lr_ratio
    assert model.allocator.num_updates == 8
    assert all(not torch.equal(p, before[n]) for n, p in model.named_parameters() if n.endswith(".lam"))


def test_accelerate_snippet_allocates_once_per_optimizer_step(wrapped):
    import warnings

    from accelerate.state import AcceleratorState

    model = wrapped["model"]
    model.lora2_config.init_warmup, model.lora2_config.final_warmup, model.lora2_config.total_step = 2, 2, 8
    wrapped["torch"] = torch
    wrapped["loader"] = torch.utils.data.DataLoader(ToyDataset(n=64), batch_size=2)  # 32 micro-batches, 8 steps
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            exec(snippet("from accelerate import Accelerator"), wrapped)
    finally:
        AcceleratorState._reset_state(True)
    assert wrapped["step"] == 8 and model.allocator.num_updates == 8 and model.allocator.step == 8
    assert int(model.allocator.masks().sum()) == model.allocator.b_target  # pruned to the target on schedule
    assert not [w for w in caught if "unchanged since its previous call" in str(w.message)]


def test_trainer_and_persistence_snippets(wrapped, tmp_path):
    model = wrapped["model"]
    model.lora2_config.init_warmup, model.lora2_config.final_warmup = 2, 2
    wrapped.update(train_set=ToyDataset(n=32), dev_set=ToyDataset(n=8, seed=1), training_args=TrainingArguments(
        output_dir=str(tmp_path / "out"), max_steps=8, per_device_train_batch_size=4, report_to=[], use_cpu=True,
        save_strategy="no", disable_tqdm=True))
    exec(snippet("trainer = lora2.LoRA2Trainer"), wrapped)
    assert model.allocator.num_updates == 8
    x = {"input_ids": torch.randint(1, 120, (2, 10)), "attention_mask": torch.ones(2, 10, dtype=torch.long)}
    model.eval()
    with torch.no_grad():
        expected = model(**x).logits
    wrapped.update(out_dir=str(tmp_path / "adapter"), base_model=tiny_bert())
    exec(snippet("model.save_pretrained(out_dir)"), wrapped)
    assert type(wrapped["merged"]).__name__ == "BertForSequenceClassification"  # the reloaded adapter, merged
    with torch.no_grad():
        assert torch.allclose(wrapped["merged"].eval()(**x).logits, expected, atol=1e-5)
