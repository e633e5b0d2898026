"""speed.md from the results of benchmarks/speed.py: the machine, one section per model, the pipeline
against a bare loop, and the targets. A library module of speed.py.
"""

from __future__ import annotations

import contextlib
import os
import platform
import sys
from pathlib import Path
from typing import Any

import torch
import transformers
from speed_parts import TYPICAL_DT
from speed_pipeline import TARGET, render_pipeline
from speed_setup import K8, TARGET_RANK, K, R
from speed_timing import paired

INFERENCE_LABELS = {"base": "base model", "lora2_merged": "LoRA² merged (`merge()`, wrapper kept)",
                    "lora2_merged_unloaded": "LoRA² `merge_and_unload()`", "lora2_unmerged": "LoRA² unmerged",
                    "lora_k_unmerged": f"PEFT LoRA rank {K} unmerged"}


def machine() -> dict[str, Any]:
    import peft

    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {"cpu": cpu, "logical_cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "python": platform.python_version(), "platform": platform.platform()}


def ms(x: float) -> str:
    return f"{1000 * x:.1f}"


def _training(tr: dict[str, Any], mem: dict[str, Any]) -> list[str]:
    refs = "lora_k" in tr and "floor" in tr
    lines = ["### Training step", "",
             "| method | trainable | step ms | fwd | bwd | optim | alloc | wall ms | × PEFT LoRA rank k | × floor "
             "| peak memory over base (MiB) |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for meth, v in tr.items():
        mm = mem.get(meth, {}).get("tensor_peak_over_base_mib")
        x_k = f"{paired(tr, meth, 'lora_k', 'step'):.3f}" if refs else ""
        x_floor = f"{paired(tr, meth, 'floor', 'step'):.2f}" if refs else ""
        lines.append(f"| {v['description']} | {v['trainable']:,} | {ms(v['step_s'])} | {ms(v['forward_s'])} | "
                     f"{ms(v['backward_s'])} | {ms(v['optimizer_s'])} | {ms(v['allocator_s'])} | {ms(v['wall_s'])} | "
                     f"{x_k} | {x_floor} | {'' if mm is None else f'{mm:.0f}'} |")
    return [*lines, ""]


def _allocator(al: dict[str, Any], step: float | None) -> list[str]:
    lines = ["### Allocator alone (`Method.after_step`, gradients in place)", "",
             f"| allocator | entries tracked | adapter params | ms / update, Δt=1 | ms, EMA only "
             f"| ms, Δt={TYPICAL_DT} (amortised) | Δt=1 as % of LoRA² step |", "|---|---:|---:|---:|---:|---:|---:|"]
    for key, label in (("lora2_reduced", "LoRA² reduced (Eq. 9)"), ("lora2_full", "LoRA² full (Eq. 8)"),
                       ("adalora", "PEFT AdaLoRA")):
        v = al[key]
        pct = f"{100 * v['update_dt1_s'] / step:.2f}%" if step else ""
        lines.append(f"| {label} | {v['tracked_entries']:,} | {v['adapter_parameters']:,} | {ms(v['update_dt1_s'])} | "
                     f"{ms(v['update_ema_only_s'])} | {ms(v[f'update_dt{TYPICAL_DT}_s'])} | {pct} |")
    sm = al["smallest_matrix"]
    return [*lines, "", f"Reduced score tracks {al['reduced_vs_full_fewer_pct']:.1f}% fewer entries than the full one "
            f"over the whole model ({sm['d_in']}×{sm['d_out']} matrix: {sm['reduced']} vs {sm['full']}, "
            f"{sm['fewer_pct']:.1f}% fewer).", ""]


def _inference(inf: dict[str, Any]) -> list[str]:
    lines = ["### Inference (eval, `torch.inference_mode`, one forward of the batch)", "",
             "| model | ms | wall ms | × base | × PEFT LoRA rank k unmerged |", "|---|---:|---:|---:|---:|"]
    for key, v in inf.items():
        x_base, x_lora = paired(inf, key, "base", "forward"), paired(inf, key, "lora_k_unmerged", "forward")
        lines.append(f"| {INFERENCE_LABELS[key]} | {ms(v['forward_s'])} | {ms(v['wall_s'])} | {x_base:.3f} | "
                     f"{x_lora:.3f} |")
    return [*lines, "", "`merge_and_unload()` leaves exactly the base model's modules, so its ratio to the base is "
            "the measurement noise of this table.", ""]


def render(results: dict[str, Any]) -> str:
    m, st = results["machine"], results["settings"]
    lines = [
        "# LoRA² speed and memory", "",
        f"Command: `{results['command']}`  ",
        f"Machine: {m['cpu']}, {m['logical_cpus']} logical CPUs, torch {m['torch']} ({m['torch_threads']} threads), "
        f"transformers {m['transformers']}, peft {m['peft']}, Python {m['python']}  ",
        f"Date: {results['date']}; wall time of the run {results['wall_s']:.0f} s. No GPU.", "",
        f"Clock: {'process CPU time' if st['clock'] == 'cpu' else 'wall clock'} with {st['threads']} torch thread(s); "
        f"load average {st['load_average_at_start'][0]:.1f} at the start, {st['load_average_at_end'][0]:.1f} at the "
        "end (the machine is shared).", "",
        f"Times are medians over {st['repeats']} interleaved repeats after warm-up (inference: {2 * st['repeats']} "
        "repeats of 2 forwards); every ratio (×) is the median of the per-repeat ratios, each taken within one round. "
        "Every method is built by the pipeline's `build_method` (targets from `DEFAULT_TARGET_MODULES`, the head from "
        "`head_modules`), and a training step is the pipeline's `train_step`: forward + backward + clip (norm 1) + "
        "AdamW (optim includes the clip) + the method's hook (alloc) + zero_grad. LoRA² and AdaLoRA run in their "
        f"pruning phase (t_init = t_final = 0) with Δt = 1, the worst case: every step updates the importance EMAs "
        f"and re-prunes to b(t). k = {K}, r = {R}, target rank {TARGET_RANK}, γ = 0.1 for both LoRA² and AdaLoRA.", "",
    ]
    for r in results["models"].values():
        spec = r["spec"]
        lines += [f"## {spec['title']} — batch {spec['batch']}, sequence {spec['seq']}", ""]
        if r.get("training"):
            lines += _training(r["training"], r.get("memory", {}))
        if r.get("allocator"):
            lines += _allocator(r["allocator"], (r.get("training") or {}).get("lora2", {}).get("step_s"))
        if r.get("inference"):
            lines += _inference(r["inference"])
    if results.get("pipeline"):
        lines += render_pipeline(results["pipeline"])
    lines += ["## Targets", "", "| model | target | measured | met |", "|---|---|---:|---|"]
    for t in results["targets"]:
        lines.append(f"| {t['model']} | {t['target']} | {t['measured']:.3f} | {'yes' if t['met'] else 'no'} |")
    lines += ["", "Peak memory: one fresh process per method builds the base model, then wraps it and runs "
              f"{st['memory_steps']} training steps under `torch.profiler` with `profile_memory=True`; the column is "
              "the largest running total of CPU tensor bytes allocated in that window and not yet freed (adapter, "
              "copies of the head, activations, gradients, optimizer and allocator state; for full fine-tuning also "
              "the pipeline's copy of the target weights it keeps for update norms; the base weights are not "
              "counted). Peak RSS is not reported: it also counts malloc caching and the profiler's own buffers.", ""]
    return "\n".join(lines)


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    out = []

    def add(model: str, target: str, measured: float, met: bool) -> None:
        out.append({"model": model, "target": target, "measured": measured, "met": met})

    for name, r in results["models"].items():
        tr, al, inf = r.get("training", {}), r.get("allocator"), r.get("inference")
        if "lora2" in tr and "lora_k" in tr:
            x = paired(tr, "lora2", "lora_k", "step")
            add(name, f"LoRA² k={K} step ≤ 1.10 × PEFT LoRA rank {K}", x, x <= 1.10)
        if "lora2_k8" in tr and "lora_r" in tr:
            x = paired(tr, "lora2_k8", "lora_r", "step")
            add(name, f"LoRA² k={K8} step ≤ 1.10 × PEFT LoRA rank {K8}", x, x <= 1.10)
        if "lora2" in tr and "adalora" in tr:
            x = paired(tr, "lora2", "adalora", "step")
            add(name, f"LoRA² step ≤ 1.00 × PEFT AdaLoRA (r={R})", x, x <= 1.00)
        if al and "lora2" in tr:
            x = al["lora2_reduced"]["update_dt1_s"] / tr["lora2"]["step_s"]
            add(name, "reduced allocator update (Δt=1) ≤ 0.02 × a LoRA² step", x, x <= 0.02)
        if inf:
            x = paired(inf, "lora2_merged", "base", "forward")
            add(name, "merged LoRA² inference ≤ 1.02 × base", x, x <= 1.02)
    for method, v in (results.get("pipeline") or {}).get("methods", {}).items():
        add(f"pipeline ({method})", f"`lora2 glue` steps/s ≥ {TARGET:.2f} × bare loop", v["cpu"]["ratio"]["median"],
            v["met"])
    return out


if __name__ == "__main__":  # a library module: its command line is the runner's
    import speed

    sys.exit(speed.main())
