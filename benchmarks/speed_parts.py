"""The per-model measurements of benchmarks/speed.py: training steps, the allocator alone, inference and
peak memory. A library module of speed.py; every model comes from the pipeline's ``build_method``.
"""

from __future__ import annotations

import copy
import gc
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from speed_setup import MODELS, QUICK_TRAIN, TRAIN_METHODS, K, R, StepRunner, make_batch, wrap
from speed_timing import interleaved, now
from torch import nn

from lora2.glue.methods import Method

TYPICAL_DT = 10  # the paper's scripts use Δt in 1..100; AdaLoRA's GLUE scripts mostly 10
SPEED_SCRIPT = Path(__file__).resolve().parent / "speed.py"


def bench_training(base: nn.Module, methods: list[str], batch: dict[str, torch.Tensor], warmup: int, repeats: int,
                   inner: int) -> dict[str, Any]:
    total_steps = 2 * (warmup + repeats * inner) + 10  # measured steps sit in the first half of the pruning phase
    runners = {m: StepRunner(m, copy.deepcopy(base), batch, total_steps) for m in methods}
    res = interleaved({m: r.step for m, r in runners.items()}, warmup, repeats, inner)
    for m, r in runners.items():
        res[m]["trainable"] = r.trainable
        res[m]["description"] = TRAIN_METHODS[m][0]
    if "lora2" in runners:
        alloc = runners["lora2"].method.model.allocator
        res["lora2"].update(budget_at_end=alloc.budget(alloc.step), active_at_end=int(alloc.masks().sum()), b0=alloc.b0)
    del runners
    gc.collect()
    return res


def _set_interval(method: Method, dt: int) -> None:
    if method.name == "adalora":
        method.model.peft_config["default"].deltaT = dt
    else:
        method.model.allocator.config.mask_interval = dt


def bench_allocator(base: nn.Module, batch: dict[str, torch.Tensor], repeats: int, calls: int) -> dict[str, Any]:
    """Time the pipeline's per-step hook (``Method.after_step``) alone, gradients of one backward kept in place."""
    total_steps = 10 * (2 * (repeats + 1) * calls) + 10
    variants: dict[str, Method] = {}
    for name, source in (("lora2_reduced", "lora2"), ("lora2_full", "lora2_full"), ("adalora", "adalora")):
        method = wrap(source, copy.deepcopy(base), total_steps)
        method.model.train()
        method.training_loss(batch).backward()  # real gradients; never zeroed, so every call sees them
        variants[name] = method
    counters = dict.fromkeys(variants, 0)
    huge = 10**9  # Δt so large that no call of the timing loop is a mask step: EMA update only

    def runner(name: str, dt: int) -> Callable[[], dict[str, float]]:
        def run() -> dict[str, float]:
            _set_interval(variants[name], dt)
            t0 = now()
            for _ in range(calls):
                counters[name] += 1
                variants[name].after_step(counters[name], 1e-3)
            return {"update": (now() - t0) / calls}

        return run

    runners = {f"{n}/{tag}": runner(n, dt) for n in variants for tag, dt in (("mask_every_step", 1), ("ema_only", huge))}
    timed = interleaved(runners, warmup=1, repeats=repeats, inner=1)
    out: dict[str, Any] = {}
    for name, method in variants.items():
        every, ema = timed[f"{name}/mask_every_step"]["update_s"], timed[f"{name}/ema_only"]["update_s"]
        if name == "adalora":
            tracked = adapter = sum(p.numel() for n, p in method.model.named_parameters() if "lora_" in n)
        else:
            tracked, adapter = method.model.allocator.tracked_entries(), method.model.num_adapter_parameters()
        out[name] = {"update_dt1_s": every, "update_ema_only_s": ema,
                     f"update_dt{TYPICAL_DT}_s": ema + (every - ema) / TYPICAL_DT,
                     "tracked_entries": tracked, "adapter_parameters": adapter}
    red, full = out["lora2_reduced"]["tracked_entries"], out["lora2_full"]["tracked_entries"]
    out["reduced_vs_full_fewer_pct"] = 100 * (1 - red / full)
    layer = min(variants["lora2_reduced"].model.lora2_layers.values(), key=lambda la: la.d_in * la.d_out)
    per = {"d_in": layer.d_in, "d_out": layer.d_out, "reduced": R + 2 * K * R,
           "full": R + 2 * K * R + K * (layer.d_in + layer.d_out)}
    per["fewer_pct"] = 100 * (1 - per["reduced"] / per["full"])
    out["smallest_matrix"] = per
    variants.clear()
    gc.collect()
    return out


def bench_inference(base: nn.Module, batch: dict[str, torch.Tensor], warmup: int, repeats: int,
                    inner: int) -> dict[str, Any]:
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    gen = torch.Generator().manual_seed(7)

    def lora2_model() -> nn.Module:
        model = wrap("lora2", copy.deepcopy(base), 100).model
        with torch.no_grad():  # a trained-looking adapter (Δ ≠ 0), so merging really changes weights
            for layer in model.lora2_layers.values():
                layer.lam.copy_(torch.randn(layer.lam.shape, generator=gen))
        return model

    merged = lora2_model()
    merged.merge()
    models: dict[str, nn.Module] = {
        "base": copy.deepcopy(base),
        "lora2_merged": merged,
        "lora2_merged_unloaded": lora2_model().merge_and_unload(),
        "lora2_unmerged": lora2_model(),
        "lora_k_unmerged": wrap("lora_k", copy.deepcopy(base), 100).model,
    }

    def runner(model: nn.Module) -> Callable[[], dict[str, float]]:
        model.eval()

        def run() -> dict[str, float]:
            with torch.inference_mode():
                w0, t0 = time.perf_counter(), now()
                model(**inputs)
                return {"forward": now() - t0, "wall": time.perf_counter() - w0}

        return run

    res = interleaved({n: runner(m) for n, m in models.items()}, warmup, repeats, inner)
    del models
    gc.collect()
    return res


# -- memory (one fresh subprocess per model and method) -------------------------------------------
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
        runner = StepRunner(method, base, batch, total_steps=100)
        for _ in range(steps):
            runner.step()
    return {"tensor_peak_over_base_mib": _peak_allocated(prof) / 2**20, "steps": steps}


def bench_memory(model_name: str, methods: list[str], steps: int, threads: int, quick: bool) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for method in methods:
        cmd = [sys.executable, str(SPEED_SCRIPT), "--memory-child", f"{model_name}:{method}", "--threads", str(threads),
               "--memory-steps", str(steps)] + (["--quick"] if quick else [])
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            err = proc.stderr.strip()
            out[method] = {"error": err.splitlines()[-1] if err else f"rc {proc.returncode}"}
        else:
            out[method] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"  memory {model_name}/{method}: {out[method]}", flush=True)
    return out


def train_methods(quick: bool) -> list[str]:
    return QUICK_TRAIN if quick else list(TRAIN_METHODS)


if __name__ == "__main__":  # a library module: its command line is the runner's
    import speed

    sys.exit(speed.main())
