"""Clocks and the interleaved-repeat scheme of benchmarks/speed.py. A library module of speed.py.

Every phase is timed with one clock: process CPU time by default (with one torch thread it is the
compute a step costs, and other tenants of a shared machine barely move it); ``--clock wall`` switches.
Ratios are taken inside one round and then the median over rounds, which cancels slow drifts in load.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

_CLOCK: Callable[[], float] = time.process_time


def set_clock(kind: str) -> None:
    """'cpu' (process CPU time) or 'wall' (perf_counter), for every later ``now()``."""
    global _CLOCK
    _CLOCK = {"cpu": time.process_time, "wall": time.perf_counter}[kind]


def now() -> float:
    return _CLOCK()


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
        # A B C, B C A, C A B, ...: every runner takes every position in the round equally often
        for name in names[rep % len(names):] + names[:rep % len(names)]:
            samples = [runners[name]() for _ in range(inner)]
            rounds[name].append({key: statistics.fmean(s[key] for s in samples) for key in samples[0]})
    out: dict[str, dict[str, Any]] = {}
    for name, rs in rounds.items():
        out[name] = {f"{key}_s": median([r[key] for r in rs]) for key in rs[0]}
        out[name]["rounds"] = rs
    return out


def paired(res: dict[str, dict[str, Any]], name: str, ref: str, key: str) -> float:
    """Median over repeats of name/ref, each ratio taken within one round."""
    return median([a[key] / b[key] for a, b in zip(res[name]["rounds"], res[ref]["rounds"], strict=True)])


if __name__ == "__main__":  # a library module: its command line is the runner's
    import speed

    sys.exit(speed.main())
