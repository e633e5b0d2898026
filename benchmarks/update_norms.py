"""How far did each adapter move the base weights? ‖s·ΔW‖_F / ‖W0‖_F per adapted matrix, from saved adapters.

    python benchmarks/update_norms.py [RUN_DIR ...]     (default: every run under runs/benchmarks/glue/)

A method can only beat the frozen-base floor if its update is large enough to change the model's
predictions; this reads the adapters the GLUE runs saved (LoRA²: ``lora2_adapter.safetensors``; PEFT
LoRA and AdaLoRA: ``adapter_model.safetensors``), rebuilds each ΔW from its factors and reports the
median and maximum relative update over the adapted matrices, next to the run's final dev metric.
Writes ``benchmarks/results/update_norms.md``. Runs without a low-rank adapter (BitFit, full) are skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from lora2.export import read_lora2_adapter
from lora2.persistence import atomic_write

HERE = Path(__file__).resolve().parent
RUNS = HERE.parent / "runs" / "benchmarks" / "glue"
OUT = HERE / "results" / "update_norms.md"


def base_weights(model_dir: str) -> dict[str, torch.Tensor]:
    """Base model weights keyed without the architecture prefix ('encoder.layer.0....weight')."""
    sd = load_file(os.path.join(model_dir, "model.safetensors"))
    return {k.split("bert.", 1)[-1] if k.startswith("bert.") else k: v.float() for k, v in sd.items()}


def _module_key(name: str) -> str:
    """'base_model.model.bert.encoder.layer.0.attention.self.query' → 'encoder.layer.0.attention.self.query'."""
    i = name.find("encoder.")
    return name[i:] if i >= 0 else name


def lora2_deltas(adapter: Path) -> dict[str, torch.Tensor]:
    """s·ΔW (the base weight's layout, pruned values left out) of every matrix, in float64, from the saved factors."""
    src = read_lora2_adapter(adapter)
    return {_module_key(name): f.to(torch.float64).delta_weight() for name, f in src.factors.items()}


def peft_deltas(adapter: Path) -> dict[str, torch.Tensor]:
    sd = {k: v.double() for k, v in load_file(str(adapter / "adapter_model.safetensors")).items()}
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    if cfg.get("use_rslora") or cfg.get("alpha_pattern") or (cfg["peft_type"] != "ADALORA" and cfg.get("rank_pattern")):
        raise ValueError(f"{adapter}: rsLoRA / per-module rank or alpha patterns are not supported here; "
                         "this script rebuilds ΔW with one global alpha / r.")
    out = {}
    for key in sd:
        if not key.endswith("lora_A.weight") and not key.endswith("lora_A"):
            continue
        m = key.rsplit(".lora_A", 1)[0]
        suffix = ".weight" if key.endswith(".weight") else ""
        a, b = sd[key], sd[f"{m}.lora_B{suffix}"]
        if cfg["peft_type"] == "ADALORA":  # ΔW = B (A ⊙ E) · alpha / ranknum, ranknum = init_r (PEFT)
            out[_module_key(m)] = b @ (a * sd[f"{m}.lora_E{suffix}"]) * cfg["lora_alpha"] / (cfg["init_r"] + 1e-5)
        else:
            out[_module_key(m)] = b @ a * cfg["lora_alpha"] / cfg["r"]
    return out


def run_row(run_dir: Path, weights: dict[str, dict[str, torch.Tensor]], default_model: str) -> dict | None:
    adapter = run_dir / "adapter"
    results = json.loads((run_dir / "results.json").read_text())
    model = results.get("model") or default_model  # W0 of the model this run fine-tuned
    if not os.path.isdir(model):  # a run made on another machine: its path is not here
        model = default_model
    if model not in weights:
        weights[model] = base_weights(model)
    w0 = weights[model]
    if (adapter / "lora2_adapter.safetensors").exists():
        deltas = lora2_deltas(adapter)
    elif (adapter / "adapter_model.safetensors").exists():
        deltas = peft_deltas(adapter)
    else:
        return None
    rel = []
    for name, delta in deltas.items():
        weight = w0.get(f"{name}.weight")
        if weight is None:
            raise KeyError(f"{run_dir}: no base weight for adapted module {name!r} in {model}.")
        rel.append(delta.norm().item() / weight.double().norm().item())
    metric = results["main_metric"]
    return {"run": f"{run_dir.parent.name}/{run_dir.name}", "method": results.get("method", "?"),
            "matrices": len(rel), "median": statistics.median(rel), "max": max(rel),
            "final": results["final"][metric], "metric": metric}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="*", help="Run directories (default: every run under runs/benchmarks/glue).")
    ap.add_argument("--out", default=str(OUT), help="Markdown output (default: %(default)s).")
    ns = ap.parse_args(argv)
    from lora2.glue.run import default_model_path

    weights: dict[str, dict[str, torch.Tensor]] = {}
    dirs = [Path(p) for p in ns.runs] or sorted(p.parent for p in RUNS.glob("*/*/results.json"))
    if not dirs:
        ap.error(f"no run directories found under {RUNS}; run benchmarks/glue.py run first or pass RUN_DIRs.")
    rows = [row for d in dirs if (row := run_row(d, weights, default_model_path())) is not None]
    command = "python " + " ".join(shlex.quote(a) for a in ["benchmarks/update_norms.py", *sys.argv[1:]])
    lines = ["# Relative size of the learned update, ‖ΔW‖_F / ‖W0‖_F over adapted matrices", "",
             f"Command: `{command}` (reads the adapters the GLUE protocol runs saved).", "",
             "| run | method | matrices | median | max | final dev metric |", "|---|---|---:|---:|---:|---:|"]
    lines += [f"| {r['run']} | {r['method']} | {r['matrices']} | {r['median']:.2e} | {r['max']:.2e} | "
              f"{r['metric']} {100 * r['final']:.2f} |" for r in rows]
    out = Path(ns.out)
    text = "\n".join(lines) + "\n"
    atomic_write(out, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    print("\n".join(lines[4:]))
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
