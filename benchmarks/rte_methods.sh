#!/usr/bin/env bash
# One short run per method on RTE with all-MiniLM-L6-v2: same seed, same budget (100 steps, batch 32,
# max length 64), then a summary table in benchmarks/results/rte_methods.md.
#   bash benchmarks/rte_methods.sh            (SKIP_RUNS=1 only rebuilds the table)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export HF_HUB_OFFLINE=1 LORA2_GLUE_DIR=${LORA2_GLUE_DIR:-$(cd .. && pwd)/shared/data/glue}
METHODS="lora2 lora adalora sora bitfit full"
if [ -z "${SKIP_RUNS:-}" ]; then
  for m in $METHODS; do
    $PY -m lora2 glue --task rte --method "$m" --max-steps 100 --batch-size 32 --max-length 64 --eval-steps 25 \
      --seed 0 --lora-r 1 --adalora-init-r 3 --adalora-target-r 2 --output-dir "runs/rte-compare/$m" --no-progress
  done
fi
$PY - "$METHODS" <<'PYEOF'
import json, sys, platform
from pathlib import Path
rows = ["| method | trainable params | dev accuracy final | dev accuracy best (step) | steps/s | active ranks at end |",
        "|---|---:|---:|---:|---:|---:|"]
for m in sys.argv[1].split():
    r = json.loads(Path(f"runs/rte-compare/{m}/results.json").read_text())
    active = sum(r["active_ranks"].values()) if r.get("active_ranks") else "—"
    rows.append(f"| {m} | {r['trainable_params']:,} | {r['final']['accuracy']:.4f} | {r['best']['accuracy']:.4f} "
                f"({r['best']['step']}) | {r['steps_per_s']} | {active} |")
text = ("# RTE, one short run per method (MiniLM, seed 0, 100 steps, batch 32, max length 64)\n\n"
        "Command: `bash benchmarks/rte_methods.sh`. LoRA r=1; AdaLoRA 3→2; LoRA² k=1, r=8→2; SoRA r=8, λ=0.1.\n"
        f"Machine: 2 CPU cores, Python {platform.python_version()}. steps/s were taken on a shared machine "
        "(see benchmarks/results/speed.md for controlled step-time ratios).\n\n" + "\n".join(rows) + "\n")
Path("benchmarks/results/rte_methods.md").write_text(text)
print(text)
PYEOF
