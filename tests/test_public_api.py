"""Public names are promises: every name in ``lora2.__all__`` resolves, and every script under
``examples/`` and ``benchmarks/`` imports and answers ``--help`` on the test machine."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import lora2

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = sorted(p.relative_to(REPO).as_posix() for d in ("examples", "benchmarks") for p in (REPO / d).glob("*.py"))


@pytest.mark.parametrize("name", lora2.__all__)
def test_every_public_name_resolves(name: str) -> None:
    assert getattr(lora2, name) is not None


def test_star_import_gives_exactly_all() -> None:
    namespace: dict[str, object] = {}
    exec("from lora2 import *", namespace)
    assert sorted(k for k in namespace if k != "__builtins__") == sorted(lora2.__all__)


def test_scripts_are_found() -> None:
    assert "examples/quickstart.py" in SCRIPTS and "benchmarks/glue.py" in SCRIPTS


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_help_runs(script: str) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO / "src")}
    done = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True, cwd=REPO, env=env,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "usage" in done.stdout.lower()


def test_quickstart_runs_end_to_end(tmp_path: Path, glue_dir) -> None:
    """The README's first command, shortened: trains, prunes to the target, saves, reloads and merges."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "examples/quickstart.py", "--steps", "40", "--data-dir", str(glue_dir),
                           "--output-dir", str(tmp_path / "run")], capture_output=True, text=True, cwd=REPO, env=env,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert "trainable params: 43,106 || all params: 22,756,322" in out
    assert "active singular values: 72 of 288 (target 72); effective rank of ΔW, summed: " in out
    effective = int(out.split("effective rank of ΔW, summed: ")[1].split()[0])
    assert 1 <= effective <= 36  # k = 1: at most one per matrix
    assert "reloaded logits identical: True" in out
    gap = float(out.split("merged vs unmerged max |Δlogit|: ")[1].split()[0])
    assert gap < 1e-4
    assert (tmp_path / "run" / "adapter" / "lora2_adapter.safetensors").is_file()
