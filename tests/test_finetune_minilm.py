"""A real fine-tuning run: MiniLM (pretrained weights) on SST-2 sentences, plain PyTorch loop.

The loss falls, pruning reaches the target budget exactly, the saved adapter reloads into a fresh
base with identical logits, and the merged model matches the unmerged one.
"""

from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import lora2
from lora2.glue import read_tsv

from .conftest import BERT_TARGETS

STEPS, BATCH, MAX_LEN = 200, 16, 40


@pytest.fixture(scope="module")
def trained(minilm_path, glue_dir, tmp_path_factory):
    torch.manual_seed(0)
    rng = random.Random(0)
    tok = AutoTokenizer.from_pretrained(minilm_path)
    train = read_tsv("sst2", "train", glue_dir)
    rng.shuffle(train)
    dev = read_tsv("sst2", "dev", glue_dir)[:256]

    def encode(examples):
        enc = tok([e.texts[0] for e in examples], padding=True, truncation=True, max_length=MAX_LEN,
                  return_tensors="pt")
        enc["labels"] = torch.tensor([e.label for e in examples])
        return enc

    cfg = lora2.LoRA2Config(k=1, r=8, target_rank=2, alpha=32, target_modules=BERT_TARGETS,
                            modules_to_save=["classifier"], total_step=STEPS, init_warmup=40, final_warmup=60,
                            mask_interval=10)
    base = AutoModelForSequenceClassification.from_pretrained(minilm_path, num_labels=2)
    model = lora2.get_lora2_model(base, cfg)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    task_losses, budgets = [], {}
    model.train()
    for step in range(1, STEPS + 1):
        out = model(**encode(train[(step - 1) * BATCH: step * BATCH]))
        out.loss.backward()
        optimizer.step()
        budgets[step] = model.update_and_allocate(step)
        optimizer.zero_grad()
        task_losses.append(out.loss.item() - cfg.orth_reg_weight * model.last_orth_reg.item())
    model.eval()
    dev_batch = encode(dev)
    out_dir = tmp_path_factory.mktemp("adapter")
    model.save_pretrained(out_dir)
    return {"model": model, "losses": task_losses, "budgets": budgets, "dev": dev_batch, "dir": out_dir,
            "path": minilm_path}


def test_loss_falls_and_the_model_learns(trained):
    losses = trained["losses"]
    first, last = sum(losses[:40]) / 40, sum(losses[-40:]) / 40
    assert last < first - 0.05, (first, last)
    with torch.no_grad():
        logits = trained["model"](**trained["dev"]).logits
    accuracy = (logits.argmax(-1) == trained["dev"]["labels"]).float().mean().item()
    assert accuracy > 0.7, accuracy


def test_pruned_to_the_target_budget(trained):
    model = trained["model"]
    assert model.allocator.masks().sum().item() == 2 * 36 == model.allocator.b_target
    assert trained["budgets"][40] == 288 and trained["budgets"][140] == 72 and trained["budgets"][200] == 72
    assert trained["budgets"][90] == model.allocator.budget(90) == 72 + (216 * 50**3) // 100**3
    pattern = model.rank_pattern()
    assert sum(v["active"] for v in pattern.values()) == 72
    assert all(v["effective_rank"] == min(1, v["active"]) for v in pattern.values())  # k = 1
    assert len({v["active"] for v in pattern.values()}) > 1  # the budget is spread unevenly


def test_saved_adapter_reloads_with_identical_logits(trained):
    fresh = AutoModelForSequenceClassification.from_pretrained(trained["path"], num_labels=2)
    loaded = lora2.LoRA2Model.from_pretrained(fresh, trained["dir"])
    with torch.no_grad():
        expected = trained["model"](**trained["dev"]).logits
        got = loaded(**trained["dev"]).logits
    assert torch.equal(got, expected)
    assert loaded.rank_pattern() == trained["model"].rank_pattern()


def test_merged_model_gives_the_same_logits(trained):
    fresh = AutoModelForSequenceClassification.from_pretrained(trained["path"], num_labels=2)
    loaded = lora2.LoRA2Model.from_pretrained(fresh, trained["dir"])
    with torch.no_grad():
        unmerged = loaded(**trained["dev"]).logits
        merged = loaded.merge_and_unload()
        assert type(merged).__name__ == "BertForSequenceClassification"
        torch.testing.assert_close(merged(**trained["dev"]).logits, unmerged, rtol=1e-5, atol=1e-5)
