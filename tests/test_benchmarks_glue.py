"""benchmarks/glue.py: protocol expansion, skip-if-done and reuse, and the tables from result files
(no training: the trainer is replaced by a fake)."""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import pytest

from .conftest import REPO

_spec = importlib.util.spec_from_file_location("benchmarks_glue", REPO / "benchmarks" / "glue.py")
bench = importlib.util.module_from_spec(_spec)
sys.modules["benchmarks_glue"] = bench  # dataclasses look their module up there
_spec.loader.exec_module(bench)


@pytest.fixture(scope="module")
def protocol():
    return bench.load_protocol()


def test_protocol_expands_to_the_counts_of_the_issue(protocol):
    runs = bench.expand(protocol)
    per_group = {g: sum(1 for r in runs if r.group == g) for g in protocol["groups"]}
    assert per_group == {"table1": 4 * 4 * 3, "orth": 5 * 2, "targets": 4 * 2, "importance": 2 * 2, "short_budget": 3 * 2,
                         "long_budget": 3}
    assert len({(r.group, r.run_id) for r in runs}) == len(runs)  # every run has its own file
    # the variant ids differ case-insensitively (uv vs UV), so the files do on any file system
    assert len({str(r.result_path(Path("x"))).lower() for r in runs}) == len(runs)
    assert {r.task for r in runs if r.group == "table1"} == {"rte", "mrpc", "stsb", "cola"}
    assert len(bench.expand(protocol, only=["orth"], tasks=["rte"])) == 5
    assert len(bench.expand(protocol, only=["table1"], seeds=[0])) == 16
    with pytest.raises(ValueError, match="Unknown group"):
        bench.expand(protocol, only=["table2"])


def test_protocol_args_are_glue_options_and_follow_the_issue(protocol):
    runs = bench.expand(protocol)
    for run in runs:
        bench.validate_args(run.args)
        assert run.args["batch_size"] == 32
    by = {(r.group, r.task, r.variant, r.seed): r.args for r in runs}
    lora2 = by["table1", "rte", "lora2", 0]
    assert (lora2["method"], lora2["k"], lora2["r"], lora2["target_rank"]) == ("lora2", 1, 8, 2)
    assert by["table1", "mrpc", "lora", 1]["lora_r"] == 1
    assert by["table1", "stsb", "adalora", 2]["adalora_target_r"] == 2
    assert by["orth", "rte", "uv+UV", 0]["orth_terms"] == "uv,UV"
    assert by["targets", "mrpc", "QV", 0]["target_modules"] == "query,value"
    assert by["importance", "rte", "full", 0]["importance"] == "full"
    with pytest.raises(ValueError, match="not options"):
        bench.validate_args({"task": "rte", "no_such_option": 1})


def test_equal_settings_share_a_key_and_others_do_not(protocol):
    runs = {(r.group, r.task, r.variant, r.seed): r for r in bench.expand(protocol, tasks=["rte"], seeds=[0])}
    key = {k: bench.run_key(r.args) for k, r in runs.items()}
    base = key["table1", "rte", "lora2", 0]
    same = {k for k, v in key.items() if v == base}
    assert same == {("table1", "rte", "lora2", 0), ("orth", "rte", "all", 0), ("targets", "rte", "ALL", 0),
                    ("importance", "rte", "reduced", 0), ("short_budget", "rte", "gaussian", 0)}
    assert len(set(key.values())) == len(key) - 4


def test_options_added_later_keep_earlier_keys_valid(protocol):
    """A GlueArgs field added after results were recorded (init, init_std) is left out of the key at
    its default, so a result stored before the field existed still matches; a non-default value counts."""
    args = bench.expand(protocol, only=["table1"], tasks=["rte"], seeds=[0])[0].args
    defaults = bench.glue_defaults()
    old_defaults = {k: v for k, v in defaults.items() if k not in bench.ADDED_LATER}
    assert bench.run_key(args, defaults) == bench.run_key(args, old_defaults)
    assert '"init"' not in bench.run_key(args, defaults)
    orth = bench.run_key({**args, "init": "orthogonal"}, defaults)
    assert orth != bench.run_key(args, defaults) and '"init": "orthogonal"' in orth
    # if the default ever changed, a Gaussian run would still be told apart from an orthogonal one
    changed = {**defaults, "init": "orthogonal"}
    assert bench.run_key(args, changed) != bench.run_key({**args, "init": "gaussian"}, changed)


def test_shards_split_the_runs_to_train_and_keep_the_rest(protocol):
    runs = bench.expand(protocol)
    steps = [(run, f"k{i}", "todo" if i % 3 else "done") for i, run in enumerate(runs)]
    parts = [bench.shard_steps(steps, i, 3) for i in range(3)]
    todo = [[s[1] for s in part if s[2] == "todo"] for part in parts]
    # every run to train goes to exactly one worker, and the split is not lopsided
    assert sorted(k for part in todo for k in part) == sorted(s[1] for s in steps if s[2] == "todo")
    assert min(map(len, todo)) > len(runs) // 6
    for part in parts:  # finished (and reusable) runs stay in every worker's list
        assert [s[1] for s in part if s[2] != "todo"] == [s[1] for s in steps if s[2] != "todo"]
    # a worker started later, or with a filter, still assigns a run to the same worker
    later = [(run, key, status) for run, key, status in steps if run.group == "table1"]
    assert [s[1] for s in bench.shard_steps(later, 1, 3) if s[2] == "todo"] == [
        k for k in todo[1] if k in {s[1] for s in later}]
    assert bench.shard_steps(steps, 0, 1) == steps
    assert bench._shard("1/3") == (1, 3)
    for bad in ("3/3", "x", "1/0", "-1/2"):
        with pytest.raises(argparse.ArgumentTypeError, match="--shard"):
            bench._shard(bad)


def test_committed_results_match_the_protocols_keys(protocol):
    """Every committed result file still matches its run (else `run` would warn, or reuse wrongly)."""
    defaults = bench.glue_defaults()
    checked = 0
    for run in bench.expand(protocol):
        data = bench.read_json(run.result_path(bench.RESULTS_DIR))
        if data is None:
            continue
        assert data["benchmark"]["key"] == bench.run_key(run.args, defaults), run.run_id
        checked += 1
    assert checked > 0


def test_priority_order_fills_the_most_important_cells_first(protocol):
    runs = bench.order_runs(bench.expand(protocol), protocol, "priority")
    first = runs[:8]
    assert {(r.group, r.task, r.seed) for r in first} == {("table1", "rte", 0), ("table1", "mrpc", 0)}
    assert {r.variant for r in first} == {"lora2", "lora", "adalora", "bitfit"}
    nxt = runs[8:19]
    assert {r.task for r in nxt} == {"rte"} and {r.group for r in nxt} == {"orth", "targets", "importance"}
    assert {r.task for r in runs[19:30]} == {"mrpc"} and {r.group for r in runs[19:30]} == {"orth", "targets", "importance"}
    assert {r.group for r in runs[30:36]} == {"short_budget"}
    assert [r.seed for r in runs[36:-3]] == sorted(r.seed for r in runs[36:-3])
    assert {r.group for r in runs[-3:]} == {"long_budget"}
    assert len(runs) == len(bench.expand(protocol))
    assert bench.order_runs(runs, protocol, "protocol") == runs


def _fake_result(task: str, final: float, best: float, params: int = 1234, metric: str = "accuracy") -> dict:
    return {"task": task, "main_metric": metric, "final": {metric: final}, "best": {"step": 5, metric: best},
            "trainable_params": params, "steps": 10, "command": "benchmarks/glue.py run"}


def test_run_skips_finished_runs_and_reuses_equal_ones(tmp_path, monkeypatch, protocol):
    calls = []

    def fake_train(run, protocol, runs_dir, progress):
        calls.append((run.group, run.run_id))
        return _fake_result(run.task, 0.6, 0.7), 1.0

    monkeypatch.setattr(bench, "train_one", fake_train)
    results = tmp_path / "results"
    done = bench.Run("importance", "rte", "full", 0, {})
    done.result_path(results).parent.mkdir(parents=True)
    done.result_path(results).write_text(json.dumps(_fake_result("rte", 0.5, 0.5)), encoding="utf-8")
    base = ["--results-dir", str(results), "--tables", str(tmp_path / "t.md"), "run", "--runs-dir",
            str(tmp_path / "runs"), "--tasks", "rte", "--seeds", "0"]

    assert bench.main([*base, "--only", "importance,table1", "--order", "priority", "--max-runs", "1"]) == 0
    assert calls == [("table1", "rte-lora2-s0")]
    # importance/reduced equals Table 1's LoRA² run: copied, not trained; importance/full was done already
    reused = json.loads((results / "importance" / "rte-reduced-s0.json").read_text())
    assert reused["benchmark"]["reused_from"] == "table1/rte-lora2-s0.json"
    assert reused["final"] == {"accuracy": 0.6}
    assert json.loads(done.result_path(results).read_text())["final"] == {"accuracy": 0.5}  # untouched

    calls.clear()
    assert bench.main([*base, "--only", "importance,table1"]) == 0
    assert calls == [("table1", f"rte-{m}-s0") for m in ("lora", "adalora", "bitfit")]
    calls.clear()
    assert bench.main([*base, "--only", "importance,table1"]) == 0
    assert calls == []
    assert "| LoRA² (k=1, r=8) | 1,234 | 60.00 (n=1) |" in (tmp_path / "t.md").read_text()

    calls.clear()
    assert bench.main([*base, "--only", "orth", "--dry-run"]) == 0
    assert calls == []
    assert not (results / "orth").exists()


def test_failed_run_is_reported_and_the_sweep_goes_on(tmp_path, monkeypatch):
    def fake_train(run, protocol, runs_dir, progress):
        if run.variant == "QK":
            raise RuntimeError("boom")
        return _fake_result(run.task, 0.6, 0.7), 1.0

    monkeypatch.setattr(bench, "train_one", fake_train)
    results = tmp_path / "results"
    argv = ["--results-dir", str(results), "--tables", str(tmp_path / "t.md"), "run", "--runs-dir",
            str(tmp_path / "runs"), "--only", "targets", "--tasks", "rte"]
    assert bench.main(argv) == 1
    assert sorted(p.name for p in (results / "targets").iterdir()) == ["rte-ALL-s0.json", "rte-QKV-s0.json",
                                                                        "rte-QV-s0.json"]


def _tiny_protocol() -> dict:
    return {
        "name": "tiny",
        "tasks": {"rte": {"label": "RTE (Acc)", "epochs": 1}, "stsb": {"label": "STS-B (Pearson)", "epochs": 1}},
        "methods": {"a": {"label": "Method A", "args": {"method": "lora2"}},
                    "b": {"label": "Method B", "args": {"method": "bitfit"}},
                    "c": {"label": "Method C", "args": {"method": "lora"}}},
        "groups": {
            "table1": {"title": "Table 1", "tasks": ["rte", "stsb"], "seeds": [0, 1, 2],
                       "variants": {"a": {"method": "a"}, "b": {"method": "b"}, "c": {"method": "c"}}},
            "orth": {"title": "Table 3", "tasks": ["rte"], "seeds": [0], "method": "a",
                     "variants": {"uv": {"label": "uv", "args": {"orth_terms": "uv"}},
                                  "PQ": {"label": "PQ", "args": {"orth_terms": "PQ"}}}},
        },
    }


def test_tables_show_mean_std_seed_counts_and_dashes(tmp_path):
    protocol = _tiny_protocol()
    path = tmp_path / "protocol.json"
    path.write_text(json.dumps(protocol), encoding="utf-8")
    results = tmp_path / "results"

    def put(group, task, variant, seed, final, best, params=1000, metric="accuracy"):
        run = bench.Run(group, task, variant, seed, {})
        run.result_path(results).parent.mkdir(parents=True, exist_ok=True)
        data = _fake_result(task, final, best, params, metric)
        data["benchmark"] = {"wall_s": 60.0, "finished": f"2026-01-0{seed + 1} 00:00 UTC", "machine": "test box"}
        run.result_path(results).write_text(json.dumps(data), encoding="utf-8")

    for seed, (f, b) in enumerate([(0.60, 0.70), (0.62, 0.71), (0.64, 0.72)]):
        put("table1", "rte", "a", seed, f, b)
        put("table1", "stsb", "a", seed, f + 0.2, b + 0.2, params=900, metric="pearson")
    put("table1", "rte", "b", 0, 0.55, 0.58, params=50)
    put("orth", "rte", "uv", 0, 0.5, 0.6)

    text = bench.render_tables(protocol, results, "python benchmarks/glue.py tables", path)
    lines = text.splitlines()
    final_a, best_a = [line for line in lines if line.startswith("| Method A |")]
    assert final_a == "| Method A | 900–1,000 | 62.00 ± 2.00 | 82.00 ± 2.00 | 72.00 |"
    assert best_a == "| Method A | 900–1,000 | 71.00 ± 1.00 | 91.00 ± 1.00 | 81.00 |"
    final_b = next(line for line in lines if line.startswith("| Method B |"))
    assert final_b == "| Method B | 50 | 55.00 (n=1) | — | — |"
    assert "| Method C | — | — | — | — |" in lines
    # one seed is all Table 3 asks for: no marker
    assert "| uv | 1,000 | 50.00 | 50.00 |" in lines
    assert "| PQ | — | — | — |" in lines
    assert "Runs: 8 of the 20 the protocol names, finished between 2026-01-01 00:00 UTC and 2026-01-03 00:00 UTC" in text
    assert "`python benchmarks/glue.py run`" in text and "test box" in text
    assert text.count("**Final evaluation**") == 2 and text.count("**Best evaluation during training**") == 2
    assert "| table1 | rte-a-s1 | accuracy | 62.00 | 71.00 | 5 / 10 | 1,000 | 60 |  |" in lines

    # a partial Avg is marked
    put("table1", "stsb", "b", 0, 0.3, 0.4, params=49, metric="pearson")
    text = bench.render_tables(protocol, results, None, path)
    assert "| Method B | 49–50 | 55.00 (n=1) | 30.00 (n=1) | 42.50 (partial) |" in text.splitlines()


def test_cell_formatting():
    assert bench.fmt_cell([], 3) == "—"
    assert bench.fmt_cell([0.5], 1) == "50.00"
    assert bench.fmt_cell([0.5], 3) == "50.00 (n=1)"
    assert bench.fmt_cell([0.5, 0.7], 3) == "60.00 ± 14.14 (n=2)"
    assert bench.fmt_params([10, 10]) == "10" and bench.fmt_params([]) == "—"
