"""The core library installs and imports without the ``glue`` extra (scikit-learn, SciPy, matplotlib)."""

from __future__ import annotations

import subprocess
import sys

from .conftest import REPO

BLOCK = "import sys\nfor name in ('sklearn', 'scipy', 'matplotlib'):\n    sys.modules[name] = None\n"


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCK + code], capture_output=True, text=True, cwd=REPO, timeout=300)


def test_core_api_works_without_the_glue_extra():
    done = _run(
        "import torch, lora2\n"
        "from transformers import BertConfig, BertForSequenceClassification\n"
        "cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)\n"
        "m = lora2.get_lora2_model(BertForSequenceClassification(cfg), lora2.LoRA2Config(target_rank=8))\n"
        "print(m.num_adapter_parameters())\n"
    )
    assert done.returncode == 0, done.stderr[-2000:]  # importing a blocked module raises ImportError
    # 6 matrices of one BERT layer, k=1, r=8: Σ d_in + 3·8 + d_out
    assert done.stdout.split() == [str(4 * (16 + 24 + 16) + (16 + 24 + 32) + (32 + 24 + 16))]


def test_glue_command_names_the_extra_when_it_is_missing():
    done = _run("from lora2.cli import main\nsys.exit(main(['glue', '--task', 'rte']))")
    assert done.returncode == 2
    assert "pip install 'lora2[glue]'" in done.stderr
