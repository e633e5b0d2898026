"""GLUE protocol v2 (benchmarks/glue_protocol.json) as a list of runs: expansion with the learning-rate
search's stages, exact run keys, the run order and the shards. A library module of benchmarks/glue.py.

Nothing here imports torch: the runner's ``--help`` and ``--dry-run`` stay fast, and a protocol naming a
LoRA2Config field that does not exist yet only fails the runs that use it, when they train.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import math
import sys
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PROTOCOL = HERE / "glue_protocol.json"
# Task entries that describe the task rather than configure the run.
TASK_META = ("label", "sec_per_step", "truncated_pct")
# GlueArgs fields that do not change what is trained, left out of a run's identity (the same set as
# lora2.glue.run.NOT_IDENTITY, which this module does not import to stay free of torch; a test compares them).
NON_IDENTITY = ("output_dir", "data_dir", "no_progress", "num_threads", "device", "tf32", "resume_from_checkpoint",
                "save_steps", "save_total_limit", "logging_steps", "eval_batch_size", "overwrite_output_dir")
# LoRA2Config fields whose pipeline default depends on the task or the run length (GlueArgs.lora2_settings):
# only an explicit value is part of the key, so "alpha 32 on SST-2" is not mistaken for the default.
TASK_DEPENDENT = ("alpha", "init_warmup", "final_warmup")
SEARCH = "search"


@dataclass(frozen=True)
class Run:
    """One protocol run. ``stage`` 1: lr search (first seed at one grid lr); 2: the other seeds at the
    chosen lr; 0: no search (the lr comes from ``lr_from`` or the args)."""

    group: str
    task: str
    variant: str
    seed: int
    stage: int = 0
    lr: float | None = None  # fixed learning rate (stage 1)
    lr_from: tuple[str, str] | None = None  # (group, variant) whose chosen lr on this task the run uses
    edge: str = ""  # stage 1 beyond the grid: "low" or "high", trained only when the grid's choice is that edge
    lr_guess: float | None = field(default=None, compare=False)  # a grid lr of lr_from: provisional key
    args: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)  # flat GlueArgs options, lr aside

    @property
    def run_id(self) -> str:
        lr = f"-lr{self.lr:g}" if self.stage == 1 else ""
        return f"{self.task}-{self.variant}{lr}-s{self.seed}"

    @property
    def name(self) -> str:
        return f"{self.group}/{self.run_id}"

    def result_path(self, results_dir: Path) -> Path:
        return Path(results_dir) / self.group / f"{self.run_id}.json"

    def run_dir(self, runs_dir: Path) -> Path:
        return Path(runs_dir) / self.group / self.run_id

    def with_lr(self, lr: float | None) -> dict[str, Any]:
        """The run's flat options with its learning rate (none: the args' or the method's default)."""
        return dict(self.args) if lr is None else {**self.args, "learning_rate": lr}


def load_protocol(path: str | Path = PROTOCOL) -> dict[str, Any]:
    protocol = json.loads(Path(path).read_text(encoding="utf-8"))
    for key in ("tasks", "methods", "groups"):
        if key not in protocol:
            raise ValueError(f"{path}: the protocol has no {key!r} section.")
    return protocol


def repo_relative(path: Path) -> str:
    """A path as the tables and logs show it: relative to the repository when inside it."""
    try:
        return Path(path).resolve().relative_to(REPO).as_posix()
    except ValueError:
        return str(path)


def protocol_hash(path: str | Path = PROTOCOL) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:12]


def variant_method(protocol: dict[str, Any], group_name: str, variant: str) -> str:
    """The protocol method (a key of 'methods', e.g. lora1) a variant trains."""
    group = protocol["groups"][group_name]
    method = group["variants"][variant].get("method", group.get("method"))
    if method not in protocol["methods"]:
        raise ValueError(f"group {group_name!r}, variant {variant!r}: method {method!r} is not under 'methods'.")
    return method


def variant_label(protocol: dict[str, Any], group_name: str, variant: str) -> str:
    spec = protocol["groups"][group_name]["variants"][variant]
    return spec.get("label") or protocol["methods"][variant_method(protocol, group_name, variant)].get("label", variant)


def _lr_source(protocol: dict[str, Any], group_name: str, task: str) -> tuple[str, str] | None:
    ref = protocol["groups"][group_name].get("learning_rate")
    if not isinstance(ref, str) or ref == SEARCH:
        return None
    source_group, _, source_variant = ref.partition(":")
    source = protocol["groups"].get(source_group, {})
    if source.get("learning_rate") != SEARCH or source_variant not in source.get("variants", {}) \
            or task not in source["tasks"]:
        raise ValueError(f"group {group_name!r}: learning_rate {ref!r} must name a variant of a group with an lr "
                         f"search over task {task!r}.")
    return source_group, source_variant


def _grid(protocol: dict[str, Any], group_name: str, variant: str) -> list[float]:
    grid = protocol["methods"][variant_method(protocol, group_name, variant)].get("lr_grid")
    if not grid:
        raise ValueError(f"group {group_name!r}, variant {variant!r}: an lr search needs the method's lr_grid.")
    return sorted(grid)


def _edges(protocol: dict[str, Any], group_name: str, variant: str) -> dict[str, float]:
    """The method's lr one step beyond each end of its grid ('lr_edges': [low, high]), if it has them."""
    edges = protocol["methods"][variant_method(protocol, group_name, variant)].get("lr_edges")
    if not edges:
        return {}
    low, high = edges
    grid = _grid(protocol, group_name, variant)
    if not low < grid[0] < grid[-1] < high:
        raise ValueError(f"group {group_name!r}, variant {variant!r}: lr_edges {edges} must lie outside the grid {grid}.")
    return {"low": low, "high": high}


def expand(protocol: dict[str, Any]) -> list[Run]:
    """Every run the protocol asks for, in protocol order (group, task, variant, stage, lr, seed)."""
    runs = []
    for group_name, group in protocol["groups"].items():
        search = group.get("learning_rate") == SEARCH
        for task in group["tasks"]:
            if task not in protocol["tasks"]:
                raise ValueError(f"group {group_name!r} names task {task!r}, which has no entry under 'tasks'.")
            lr_from = _lr_source(protocol, group_name, task)
            task_args = {k: v for k, v in protocol["tasks"][task].items() if k not in TASK_META}
            task_args.update(group.get("task_args", {}).get(task, {}))  # a group's own budget for the task
            for variant, spec in group["variants"].items():
                method = variant_method(protocol, group_name, variant)
                args = {**protocol.get("common", {}), **task_args, **protocol["methods"][method]["args"],
                        **spec.get("args", {}), "task": task, "model": protocol.get("model")}
                fixed = group.get("learning_rate")
                if isinstance(fixed, (int, float)) and "learning_rate" not in spec.get("args", {}):
                    args["learning_rate"] = fixed
                args = {k: v for k, v in args.items() if v is not None}  # None: GlueArgs' default

                def run(seed: int, **lr: Any) -> Run:
                    return Run(group_name, task, variant, seed, args={**args, "seed": seed}, **lr)  # noqa: B023

                if search:
                    first, *others = group["seeds"]
                    grid = _grid(protocol, group_name, variant)
                    runs += [run(first, stage=1, lr=lr) for lr in grid]
                    runs += [run(first, stage=1, lr=lr, edge=side)
                             for side, lr in _edges(protocol, group_name, variant).items()]
                    runs += [run(s, stage=2, lr_from=(group_name, variant), lr_guess=grid[0]) for s in others]
                else:
                    guess = _grid(protocol, *lr_from)[0] if lr_from else None
                    runs += [run(s, lr_from=lr_from, lr_guess=guess) for s in group["seeds"]]
    return runs


def select(runs: list[Run], protocol: dict[str, Any], only: Iterable[str] | None = None,
           tasks: Iterable[str] | None = None, seeds: Iterable[int] | None = None,
           variants: Iterable[str] | None = None) -> list[Run]:
    """The runs of the named groups, tasks, seeds and variants (None: all). A variant is ``name`` (in every group
    that has it) or ``group/name`` (``importance/full``, not table 1's full fine-tuning)."""
    only, seeds, variants = (set(x) if x is not None else None for x in (only, seeds, variants))
    if tasks is not None:  # the spellings lora2 glue takes (STS-B, sst2, ...), then only the protocol's tasks
        from lora2.glue.tasks import get_task

        tasks = {get_task(t).name for t in tasks}
        if tasks - set(protocol["tasks"]):
            raise ValueError(f"Task(s) {sorted(tasks - set(protocol['tasks']))} are not in the protocol; it has "
                             f"{list(protocol['tasks'])}.")
    if seeds is not None:
        have = {s for group in protocol["groups"].values() for s in group["seeds"]}
        if seeds - have:
            raise ValueError(f"Seed(s) {sorted(seeds - have)} are not in the protocol; its groups use {sorted(have)}.")
    unknown = (only or set()) - set(protocol["groups"])
    if unknown:
        raise ValueError(f"Unknown group(s) {sorted(unknown)}; the protocol has {list(protocol['groups'])}.")
    known = {v for group in protocol["groups"].values() for v in group["variants"]}
    known |= {f"{g}/{v}" for g, group in protocol["groups"].items() for v in group["variants"]}
    if variants and variants - known:
        raise ValueError(f"Unknown variant(s) {sorted(variants - known)}; the protocol has "
                         f"{sorted(v for v in known if '/' not in v)} (or group/variant).")
    return [r for r in runs if (only is None or r.group in only) and (tasks is None or r.task in tasks)
            and (seeds is None or r.seed in seeds)
            and (variants is None or r.variant in variants or f"{r.group}/{r.variant}" in variants)]


@functools.lru_cache(maxsize=1)
def option_defaults() -> dict[str, Any]:
    """Defaults of every flat ``lora2 glue`` option that exists today (GlueArgs and LoRA2Config fields)."""
    from lora2.glue.args import GlueArgs, lora2_option_fields

    def default(f: dataclasses.Field) -> Any:
        return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default

    out = {f.name: default(f) for f in lora2_option_fields() if f.name not in TASK_DEPENDENT}
    out.update({f.name: default(f) for f in dataclasses.fields(GlueArgs)
                if f.name != "lora2" and f.default is not dataclasses.MISSING})
    return out


def _canonical(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer():
        return int(value)  # 16 and 16.0 are the same setting
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    return value


@functools.lru_cache(maxsize=1)
def _unread_options() -> dict[str, frozenset[str]]:
    """Per method other than lora2: the LoRA2Config options it does not read."""
    from lora2.glue.args import LORA2_OPTIONS_READ_BY, lora2_option_fields

    names = {f.name for f in lora2_option_fields()}
    return {method: frozenset(names - set(read)) for method, read in LORA2_OPTIONS_READ_BY.items()}


def run_key(args: dict[str, Any], defaults: dict[str, Any] | None = None) -> str:
    """What a run trains, defaults filled in: equal keys iff equal settings. Keys are recomputed from each
    result's stored args, so a field added to the options later changes no match; LoRA2Config options a
    method does not read are left out, so a new LoRA² default changes no other method's match."""
    full = {**(option_defaults() if defaults is None else defaults), **{k: v for k, v in args.items() if v is not None}}
    unread = _unread_options().get(full.get("method", "lora2"), frozenset())
    return json.dumps({k: _canonical(v) for k, v in full.items() if k not in NON_IDENTITY and k not in unread},
                      sort_keys=True)


def select_lr(finals: dict[float, float | None]) -> float | None:
    """The learning-rate rule: the highest FINAL dev main metric wins, NaN counts as lowest, ties go to the
    smaller lr; None until every grid lr has a result."""
    if not finals or any(v is None for v in finals.values()):
        return None
    return max(sorted(finals), key=lambda lr: -math.inf if math.isnan(finals[lr]) else finals[lr])


def choose_lr(grid: dict[float, float | None], edges: dict[str, tuple[float, float | None]]
              ) -> tuple[float | None, float | None, str | None]:
    """(chosen, provisional, edge) of the lr rule with edge extension: the grid's choice (``select_lr``); when
    it is the grid's lowest or highest lr and the method has an lr one step beyond that end, that lr is tried
    too and the rule picks again among all of them (once: no further step). ``edge``: the side that needed
    its extra run; ``chosen`` is None until it has a result, ``provisional`` is the grid's choice meanwhile."""
    inside = select_lr(grid)
    if inside is None:
        return None, None, None
    side = "high" if inside == max(grid) else "low" if inside == min(grid) else None
    if side is None or side not in edges:
        return inside, inside, None
    lr, final = edges[side]
    if final is None:
        return None, inside, side
    return select_lr({**grid, lr: final}), inside, side


def _matches(run: Run, rule: dict[str, Any]) -> bool:
    values = {"groups": run.group, "tasks": run.task, "seeds": run.seed, "stages": run.stage}
    return all(values[k] in rule[k] for k in values if k in rule)


def order_runs(runs: list[Run], protocol: dict[str, Any], order: str) -> list[Run]:
    """``protocol``: as expanded; ``priority``: by the first of ``protocol['priority']``'s rules a run matches
    (unmatched last), protocol order within a rule."""
    if order == "protocol":
        return list(runs)
    if order != "priority":
        raise ValueError(f"Unknown order {order!r}; choose protocol or priority.")
    rules = protocol.get("priority", [])
    return sorted(runs, key=lambda run: next((i for i, rule in enumerate(rules) if _matches(run, rule)), len(rules)))


def shard_of(run: Run, count: int) -> int:
    """A run's worker, fixed by its name alone (never by its lr or position): workers started at different
    times, or with different filters, agree on who trains what."""
    return zlib.crc32(run.name.encode()) % count


def parse_shard(text: str) -> tuple[int, int]:
    try:
        index, count = (int(p) for p in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard {text!r}: expected I/N, e.g. 0/2") from None
    if count < 1 or not 0 <= index < count:
        raise argparse.ArgumentTypeError(f"--shard {text!r}: need 0 <= I < N")
    return index, count


if __name__ == "__main__":  # a library module: its command line is the runner's
    import glue

    sys.exit(glue.main())
