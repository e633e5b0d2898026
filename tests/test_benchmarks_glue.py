"""benchmarks/glue.py (GLUE protocol v2): expansion, keys, the lr-selection rule and its stages, shards,
reuse, tables and plots. No training: results are fake dicts written into tmp dirs, the trainer a fake."""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

from .conftest import REPO

_spec = importlib.util.spec_from_file_location("benchmarks_glue", REPO / "benchmarks" / "glue.py")
bench = importlib.util.module_from_spec(_spec)
sys.modules["benchmarks_glue"] = bench
_spec.loader.exec_module(bench)  # puts benchmarks/ on sys.path for its glue_* modules
import glue_compare  # noqa: E402
import glue_plan  # noqa: E402
import glue_plots  # noqa: E402
import glue_protocol as gp  # noqa: E402
import glue_report  # noqa: E402

TASKS = ["mrpc", "stsb", "cola", "rte", "sst2"]
METHODS = ["head", "lora2", "lora2_paper", "lora2_orth", "lora1", "lora8", "adalora", "bitfit", "full"]
# LoRA2Config fields the dynamics group names that may not exist yet: the tests hold either way
PENDING_FIELDS = {"scaling_rule", "lam_lr_ratio", "pq_form"}


@pytest.fixture(scope="module")
def protocol():
    return gp.load_protocol()


def fake(task: str, final: float, best: float | None = None, metric: str = "accuracy", params: int = 1000,
         history: list[float] | None = None, norms: list[float] | None = None) -> dict:
    steps = list(range(10, 10 * len(history or []) + 1, 10))
    return {"task": task, "main_metric": metric, "final": {metric: final}, "best": {"step": 5, metric: best or final},
            "trainable_params": params, "steps": 100, "command": "benchmarks/glue.py run",
            "eval_history": [{"step": s, metric: v} for s, v in zip(steps, history or [], strict=True)],
            "update_norms": [{"step": s, "median": v, "max": 2 * v} for s, v in zip(steps, norms or [], strict=False)]}


def put(results: Path, run: gp.Run, lr: float | None, result: dict, wall: float = 200.0) -> None:
    step = glue_plan.Step(run, "todo", lr, gp.run_key(run.with_lr(lr)))
    path = run.result_path(results)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(bench.stamp(result, step, "test@0", wall_s=wall)), encoding="utf-8")


def test_protocol_expands_to_the_exact_run_counts(protocol):
    runs = gp.expand(protocol)
    count = {}
    for run in runs:
        count[run.group, run.stage] = count.get((run.group, run.stage), 0) + 1
    assert count == {("table1", 1): 9 * 5 * (3 + 2), ("table1", 2): 9 * 5 * 2, ("dynamics", 0): 12 * 3 * 3, ("curves", 0): 2 * 5,
                     ("orth", 0): 5 * 3, ("targets", 0): 4 * 3, ("importance", 0): 2 * 3}
    assert len({str(r.result_path(Path("x"))).lower() for r in runs}) == len(runs)  # distinct files, any file system
    assert {r.task for r in runs if r.group == "table1"} == set(TASKS)
    assert {r.variant for r in runs if r.group == "table1"} == set(METHODS)
    assert {r.seed for r in runs if r.stage == 1} == {0} and {r.seed for r in runs if r.stage == 2} == {1, 2}
    assert len(gp.select(runs, protocol, only=["orth"], tasks=["rte"])) == 5
    picked = gp.select(runs, protocol, only=["dynamics"], seeds=[1], variants=["gaussian", "lora1"])
    assert sorted(r.name for r in picked) == sorted(f"dynamics/{t}-{v}-s1" for t in ("mrpc", "cola", "stsb")
                                                    for v in ("gaussian", "lora1"))
    with pytest.raises(ValueError, match="Unknown variant"):
        gp.select(runs, protocol, variants=["lora3"])
    with pytest.raises(ValueError, match="Unknown variant"):
        gp.select(runs, protocol, variants=["orth/full"])
    assert {r.name for r in gp.select(runs, protocol, tasks=["rte"], seeds=[0], variants=["importance/full", "lora2"])
            } == {"importance/rte-full-s0", *(f"table1/rte-lora2-lr{lr:g}-s0" for lr in (1e-4, 3e-4, 1e-3, 3e-3, 1e-2))}
    assert len(gp.select(runs, protocol, only=["table1"], seeds=[0])) == 225  # 3 grid lrs + 2 beyond its ends
    with pytest.raises(ValueError, match="Unknown group"):
        gp.select(runs, protocol, only=["table2"])


def test_every_protocol_arg_set_builds_a_glue_args_today(protocol):
    from lora2.glue.args import GlueArgs

    existing = set(gp.option_defaults())
    for run in gp.expand(protocol):
        args = run.with_lr(run.lr or run.lr_guess)
        missing = (PENDING_FIELDS & set(args)) - existing
        if missing:  # a field not added yet fails that run only, naming the field
            with pytest.raises(ValueError, match=sorted(missing)[0]):
                GlueArgs.from_flat(args)
            continue
        glue = GlueArgs.from_flat(args)
        budget = {**protocol["tasks"][run.task], **protocol["groups"][run.group].get("task_args", {}).get(run.task, {})}
        assert (glue.batch_size, glue.max_length, glue.max_steps, glue.eval_steps, glue.seed) == (
            32, budget["max_length"], budget["max_steps"], budget["eval_steps"], run.seed)
        method = protocol["methods"][gp.variant_method(protocol, run.group, run.variant)]
        assert glue.learning_rate in (method["lr_edges"] if run.edge else method["lr_grid"])
    by = {r.name: r.args for r in gp.expand(protocol)}
    assert {k: by["table1/rte-lora2-lr0.001-s0"][k] for k in ("method", "k", "r", "target_rank")} == {
        "method": "lora2", "k": 1, "r": 8, "target_rank": 2}
    assert (by["table1/mrpc-lora1-s1"]["method"], by["table1/mrpc-lora1-s1"]["lora_r"]) == ("lora", 1)
    assert (by["table1/mrpc-lora8-s2"]["method"], by["table1/mrpc-lora8-s2"]["lora_r"]) == ("lora", 8)
    assert by["orth/rte-uv+UV-s0"]["orth_terms"] == ["uv", "UV"]
    assert by["targets/mrpc-QV-s0"]["target_modules"] == "query,value"
    assert "target_modules" not in by["targets/mrpc-ALL-s0"]


def _keys_at(protocol, chosen: float) -> dict[str, str]:
    """Keys of every seed-0 mrpc run, the lr of table1/lora2 taken as chosen."""
    runs = gp.select(gp.expand(protocol), protocol, tasks=["mrpc"], seeds=[0])
    return {r.name: gp.run_key(r.with_lr(r.lr if r.lr_from is None else chosen)) for r in runs}


def test_keys_are_equal_iff_settings_are(protocol):
    keys = _keys_at(protocol, 0.001)
    base = keys["table1/mrpc-lora2-lr0.001-s0"]
    assert {n for n, k in keys.items() if k == base} == {
        "table1/mrpc-lora2-lr0.001-s0", "orth/mrpc-all-s0", "targets/mrpc-ALL-s0", "importance/mrpc-reduced-s0"}
    assert len(set(keys.values())) == len(keys) - 3  # dynamics has its own budget: never equal to table1
    assert _keys_at(protocol, 0.003)["orth/mrpc-all-s0"] == _keys_at(protocol, 0.003)["table1/mrpc-lora2-lr0.003-s0"]
    args = next(r.args for r in gp.expand(protocol) if r.name == "table1/mrpc-lora2-lr0.001-s0")
    assert gp.run_key({**args, "lora_alpha": 16.0}) == gp.run_key({**args, "lora_alpha": 16})
    assert gp.run_key({**args, "output_dir": "x", "num_threads": 2, "target_modules": None}) == gp.run_key(args)
    assert gp.run_key({**args, "seed": 1}) != gp.run_key(args)
    assert gp.run_key({**args, "alpha": 32}) != gp.run_key(args)  # task-dependent default: explicit counts


def test_lr_rule_tries_one_step_beyond_an_edge_choice():
    grid, edges = {3e-4: 0.70, 1e-3: 0.75, 3e-3: 0.80}, {"low": (1e-4, None), "high": (1e-2, None)}
    assert gp.choose_lr(grid, edges) == (None, 3e-3, "high")  # the top of the grid: 1e-2 must train first
    assert gp.choose_lr(grid, {**edges, "high": (1e-2, 0.85)}) == (1e-2, 3e-3, "high")
    assert gp.choose_lr(grid, {**edges, "high": (1e-2, 0.60)}) == (3e-3, 3e-3, "high")
    assert gp.choose_lr({**grid, 1e-3: 0.9}, edges) == (1e-3, 1e-3, None)  # inside: no extra run
    assert gp.choose_lr({3e-4: 0.7, 1e-3: 0.7, 3e-3: 0.7}, {**edges, "low": (1e-4, 0.7)}) == (1e-4, 3e-4, "low")
    assert gp.choose_lr(grid, {}) == (3e-3, 3e-3, None)  # a method without lr_edges
    assert gp.choose_lr({**grid, 1e-3: None}, edges) == (None, None, None)


def test_lr_rule_highest_final_ties_to_the_smaller_lr():
    assert gp.select_lr({3e-4: 0.70, 1e-3: 0.80, 3e-3: 0.75}) == 1e-3
    assert gp.select_lr({3e-3: 0.68, 1e-3: 0.68, 3e-4: 0.68}) == 3e-4  # majority class everywhere
    assert gp.select_lr({1e-3: 0.5, 3e-3: 0.9, 1e-2: 0.9}) == 3e-3
    assert gp.select_lr({1e-3: math.nan, 3e-3: -0.1}) == 3e-3
    assert gp.select_lr({1e-3: 0.9, 3e-3: None}) is None and gp.select_lr({}) is None


def test_stage_two_and_ablations_wait_for_the_lr_then_train_or_reuse(tmp_path, protocol):
    runs = {r.name: r for r in gp.expand(protocol)}

    def status() -> dict[str, glue_plan.Step]:
        return {s.run.name: s for s in glue_plan.make_plan(protocol, tmp_path).steps}

    assert status()["table1/mrpc-lora2-s1"].status == "waiting" and status()["orth/mrpc-uv-s0"].status == "waiting"
    for lr, final in ((0.0003, 0.70), (0.001, 0.75)):
        put(tmp_path, runs[f"table1/mrpc-lora2-lr{lr:g}-s0"], lr, fake("mrpc", final))
    now = status()
    assert now["table1/mrpc-lora2-s1"].status == "waiting" and "2 of 3" in now["table1/mrpc-lora2-s1"].note
    put(tmp_path, runs["table1/mrpc-lora2-lr0.003-s0"], 0.003, fake("mrpc", 0.75))  # tie: the smaller lr wins
    now = status()
    assert {(s.status, s.lr) for n, s in now.items() if n.startswith("table1/mrpc-lora2-s")} == {("todo", 0.001)}
    assert (now["orth/mrpc-uv-s0"].status, now["orth/mrpc-uv-s0"].lr) == ("todo", 0.001)
    for name in ("orth/mrpc-all-s0", "targets/mrpc-ALL-s0", "importance/mrpc-reduced-s0"):
        assert now[name].status == "reuse" and now[name].source.name == "mrpc-lora2-lr0.001-s0.json"
    assert now["table1/rte-lora2-s1"].status == "waiting" and now["orth/rte-uv-s0"].status == "waiting"
    assert now["table1/mrpc-head-lr0.001-s0"].status == "todo"


def test_shards_are_disjoint_and_complete(protocol, tmp_path, capsys):
    runs = gp.expand(protocol)
    for count in (2, 3):
        parts = [[r.name for r in runs if gp.shard_of(r, count) == i] for i in range(count)]
        assert sorted(n for part in parts for n in part) == sorted(r.name for r in runs)
        assert min(map(len, parts)) > len(runs) // (2 * count)
    todo = []
    for i in range(2):
        assert bench.main(["--results-dir", str(tmp_path), "run", "--dry-run", "--shard", f"{i}/2"]) == 0
        todo.append({line.split()[1] for line in capsys.readouterr().out.splitlines() if line.startswith("  todo")})
    assert not todo[0] & todo[1] and len(todo[0] | todo[1]) == 135 + 108 + 10  # table1 stage 1, dynamics, curves
    assert gp.parse_shard("1/3") == (1, 3)
    for bad in ("3/3", "x", "1/0", "-1/2"):
        with pytest.raises(argparse.ArgumentTypeError, match="--shard"):
            gp.parse_shard(bad)


def test_priority_order(protocol):
    runs = gp.order_runs(gp.expand(protocol), protocol, "priority")
    # dynamics seed 0 first (its outcome chooses LoRA²'s defaults), MRPC before the other tasks
    assert {(r.group, r.seed) for r in runs[:36]} == {("dynamics", 0)} and {r.task for r in runs[:12]} == {"mrpc"}
    assert {r.group for r in runs[36:46]} == {"curves"}  # the learning curves fix table 1's budgets
    stage1 = runs[46:271]
    assert {r.stage for r in stage1} == {1}
    # SST-2 first: its runs are the longest and its lr search gates the most stage-2 runs
    assert [r.task for r in stage1][::45] == ["sst2", "mrpc", "stsb", "cola", "rte"]
    # the ablations (one seed) before stage 2, the dynamics' extra seeds last
    assert {r.group for r in runs[271:304]} == {"orth", "targets", "importance"}
    assert {r.stage for r in runs[304:394]} == {2}
    assert {(r.group, r.seed) for r in runs[394:]} == {("dynamics", 1), ("dynamics", 2)}


def test_dry_run_prints_the_estimate(tmp_path, capsys):
    assert bench.main(["--results-dir", str(tmp_path), "run", "--dry-run", "--only", "table1", "--tasks", "mrpc"]) == 0
    out = capsys.readouterr().out
    # 27 stage-1 runs now, 18 stage-2 runs later, 1150 steps at the protocol's 1.6 s/step
    assert "estimate: 45 runs to train (27 now, 18 once their lr is chosen), 51,750 steps, about 23.0 CPU-hours" in out
    assert "mrpc 1.60 (protocol)" in out
    assert not any(tmp_path.iterdir())


def test_run_searches_lr_then_trains_stage_two_and_reuses(tmp_path, monkeypatch, protocol):
    calls = []

    def fake_train(run, args, protocol, runs_dir, ns):
        calls.append((run.name, args["learning_rate"]))
        return fake(run.task, 0.6 + (run.lr or 0) * (run.variant != "head")), 1.0

    monkeypatch.setattr(bench, "train_one", fake_train)
    base = ["--results-dir", str(tmp_path), "run", "--runs-dir", str(tmp_path / "runs"), "--tasks", "mrpc",
            "--only", "table1,orth", "--order", "priority", "--no-tables"]
    assert bench.main([*base, "--max-runs", "1"]) == 0
    assert calls == [("table1/mrpc-head-lr0.001-s0", 0.001)]
    assert bench.main(base) == 0
    names = [n for n, _ in calls]
    # the fake metric grows with the lr: every grid picks its top, so each method's run beyond the top trains
    # (the head ties everywhere: its grid picks the bottom, and the run below it wins the tie)
    assert len(names) == 27 + 9 + 18 + 4 and len(set(names)) == len(names)
    assert {n for n in names if n.endswith(("lr0.01-s0", "lr0.0003-s0", "lr0.005-s0"))} >= {
        "table1/mrpc-lora2-lr0.01-s0", "table1/mrpc-head-lr0.0003-s0", "table1/mrpc-lora1-lr0.005-s0"}
    assert "orth/mrpc-all-s0" not in names  # copied, never trained
    assert {lr for n, lr in calls if n.startswith("table1/mrpc-lora2-s")} == {0.01}  # the best final, beyond
    assert {lr for n, lr in calls if n.startswith("table1/mrpc-head-s")} == {0.0003}  # a tie: the smallest
    assert max(names.index(n) for n in names if "-lr" in n) < min(names.index(n) for n in names if "-s1" in n)
    reused = json.loads((tmp_path / "orth" / "mrpc-all-s0.json").read_text())
    assert reused["benchmark"]["reused_from"] == "table1/mrpc-lora2-lr0.01-s0.json"
    assert reused["benchmark"]["lr"] == 0.01 and reused["final"]["accuracy"] == pytest.approx(0.61)
    calls.clear()
    assert bench.main(base) == 0 and calls == []


def test_lr_from_trains_only_the_chosen_lr_of_another_directorys_search(tmp_path, monkeypatch, capsys, protocol):
    runs = {r.name: r for r in gp.expand(protocol)}
    gpu, cpu = tmp_path / "gpu", tmp_path / "cpu"
    for lr, final in ((0.0003, 0.70), (0.001, 0.78), (0.003, 0.75)):  # the grid chooses 0.001, inside
        put(gpu, runs[f"table1/mrpc-lora2-lr{lr:g}-s0"], lr, fake("mrpc", final))
    cpu.mkdir()
    calls = []

    def fake_train(run, args, protocol, runs_dir, ns):
        calls.append((run.name, args["learning_rate"]))
        return fake(run.task, 0.9), 1.0

    monkeypatch.setattr(bench, "train_one", fake_train)
    base = ["--results-dir", str(cpu), "run", "--runs-dir", str(tmp_path / "runs"), "--tasks", "mrpc", "--seeds", "0",
            "--only", "table1,importance", "--no-tables"]
    assert bench.main([*base, "--lr-from", str(gpu), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert not (cpu / glue_plan.LR_SOURCE).exists()  # a dry run writes nothing
    status = {line.split()[1]: line.split()[0] for line in out.splitlines() if line.startswith("  ")}
    assert status["table1/mrpc-lora2-lr0.001-s0"] == "todo" and status["importance/mrpc-full-s0"] == "todo"
    assert {status[f"table1/mrpc-lora2-lr{lr}-s0"] for lr in ("0.0003", "0.003", "0.0001", "0.01")} == {"skip"}
    assert status["table1/mrpc-lora1-lr0.0005-s0"] == "waiting"  # LoRA's search is not complete there
    assert bench.main([*base, "--variants", "lora2,reduced,full", "--lr-from", str(gpu)]) == 0
    assert sorted(calls) == [("importance/mrpc-full-s0", 0.001), ("table1/mrpc-lora2-lr0.001-s0", 0.001)]
    assert json.loads((cpu / "importance" / "mrpc-full-s0.json").read_text())["benchmark"]["lr_chosen_in"] == "../gpu"
    copied = json.loads((cpu / "importance" / "mrpc-reduced-s0.json").read_text())["benchmark"]
    assert copied["reused_from"] == "table1/mrpc-lora2-lr0.001-s0.json" and copied["lr_chosen_in"] == "../gpu"
    # recorded: later sittings and the tables follow it without the flag, and another source is refused
    assert json.loads((cpu / glue_plan.LR_SOURCE).read_text())["lr_from"] == "../gpu"
    plan = glue_plan.make_plan(protocol, cpu)
    assert plan.lr_source == gpu.resolve() and plan.chosen["table1", "lora2", "mrpc"] == 0.001
    assert [r["final"]["accuracy"] for r in plan.cell("table1", "lora2", "mrpc")] == [0.9]  # this directory's run
    assert "chosen by the stage-1 search in" in glue_report.render_tables(protocol, cpu, paper={})
    (tmp_path / "other").mkdir()
    capsys.readouterr()
    assert bench.main([*base, "--lr-from", str(tmp_path / "other")]) == 2
    assert "already takes its learning rates from" in capsys.readouterr().err
    for results, bad, why in ((gpu, gpu, "is the results directory itself"),
                              (gpu, tmp_path / "none", "no such results directory"),
                              (gpu, tmp_path / "other", "already holds runs trained at its own search's")):
        with pytest.raises(ValueError, match=why):
            glue_plan.set_lr_source(results, bad, protocol)
    with pytest.raises(ValueError, match="takes its own learning rates from"):
        glue_plan.set_lr_source(tmp_path / "third", cpu, protocol)
    (tmp_path / "other").rename(tmp_path / "moved")
    (cpu / glue_plan.LR_SOURCE).write_text(json.dumps({"lr_from": "../other"}), encoding="utf-8")
    with pytest.raises(ValueError, match="which does not exist"):
        glue_plan.make_plan(protocol, cpu)
    (cpu / glue_plan.LR_SOURCE).write_text("[1]", encoding="utf-8")
    with pytest.raises(ValueError, match="fix or delete it"):
        glue_plan.make_plan(protocol, cpu)
    capsys.readouterr()
    assert bench.main(["--results-dir", str(cpu), "tables"]) == 2  # a message, not a traceback
    assert "lr_source.json is not a JSON object" in capsys.readouterr().err


def test_a_failed_or_invalid_run_does_not_end_the_sweep(tmp_path, monkeypatch, capsys):
    import lora2.glue.run

    protocol = {"name": "tiny", "tasks": {"rte": {"max_steps": 5}}, "methods": {"m": {"args": {"method": "lora2"}}},
                "groups": {"g": {"tasks": ["rte"], "seeds": [0], "variants": {
                    "bad": {"method": "m", "args": {"no_such_field": 1}}, "boom": {"method": "m", "args": {"k": 2}},
                    "ok": {"method": "m"}}}}}
    path = tmp_path / "p.json"
    path.write_text(json.dumps(protocol), encoding="utf-8")

    def fake_run_glue(args):
        if args.lora2.get("k") == 2:
            raise RuntimeError("boom")
        return fake("rte", 0.5)

    monkeypatch.setattr(lora2.glue.run, "run_glue", fake_run_glue)
    argv = ["--protocol", str(path), "--results-dir", str(tmp_path / "res"), "run", "--runs-dir", str(tmp_path / "r")]
    assert bench.main(argv) == 1
    assert [p.name for p in (tmp_path / "res" / "g").glob("*.json")] == ["rte-ok-s0.json"]
    out = capsys.readouterr().out
    assert "FAILED g/rte-bad-s0: Unknown lora2 glue option(s) ['no_such_field']" in out and "FAILED g/rte-boom-s0" in out


def test_run_identity_agrees_with_the_pipelines_resume_check():
    from lora2.glue.run import NOT_IDENTITY

    assert set(gp.NON_IDENTITY) == set(NOT_IDENTITY)


def test_a_stopped_run_resumes_from_its_last_checkpoint(tmp_path, monkeypatch):
    import lora2.glue.run

    seen = []
    monkeypatch.setattr(lora2.glue.run, "run_glue", lambda args: seen.append(args) or fake("rte", 0.5))
    protocol = {"save_steps": 100, "tasks": {"rte": {}}, "methods": {}, "groups": {}}
    run = gp.Run("g", "rte", "v", 0, args={"task": "rte", "method": "lora2"})
    bench.train_one(run, dict(run.args), protocol, tmp_path, _ns())
    checkpoint = run.run_dir(tmp_path) / "checkpoint-200"
    checkpoint.mkdir(parents=True)
    (checkpoint / "trainer_state.json").write_text("{}", encoding="utf-8")  # a complete checkpoint's marker
    bench.train_one(run, dict(run.args), protocol, tmp_path, _ns())
    assert [(a.save_steps, a.resume_from_checkpoint, a.overwrite_output_dir) for a in seen] == [
        (100, None, True), (100, "last", False)]  # without a checkpoint the run starts over in its own directory
    bench.train_one(run, dict(run.args), protocol, tmp_path, _ns(no_checkpoints=True, tf32=True))
    assert (seen[-1].save_steps, seen[-1].resume_from_checkpoint, seen[-1].tf32) == (None, None, True)


def _ns(**kw) -> argparse.Namespace:
    return argparse.Namespace(**{"progress": False, "no_checkpoints": False, "tf32": False, **kw})


def _tiny(tmp_path: Path) -> tuple[dict, Path]:
    protocol = {
        "name": "tiny", "lr_selection": "highest final",
        "tasks": {"rte": {"label": "RTE (Acc)"}, "stsb": {"label": "STS-B (Pearson)"}},
        "methods": {"head": {"label": "Head only (floor)", "args": {"method": "head"}, "lr_grid": [0.01, 0.1]},
                    "a": {"label": "Method A", "args": {"method": "lora2"}, "lr_grid": [0.001, 0.003]}},
        "groups": {"table1": {"title": "Table 1", "tasks": ["rte", "stsb"], "seeds": [0, 1, 2],
                              "learning_rate": "search", "plots": True,
                              "variants": {"head": {"method": "head"}, "a": {"method": "a"}}},
                   "orth": {"title": "Table 3", "tasks": ["rte"], "seeds": [0], "method": "a",
                            "learning_rate": "table1:a", "variants": {"uv": {"label": "uv", "args": {"orth_terms": ["uv"]}}}}},
    }
    path = tmp_path / "protocol.json"
    path.write_text(json.dumps(protocol), encoding="utf-8")
    runs = {r.name: r for r in gp.expand(protocol)}
    res = tmp_path / "res"
    for task, metric, shift in (("rte", "accuracy", 0.0), ("stsb", "pearson", 0.2)):
        put(res, runs[f"table1/{task}-a-lr0.001-s0"], 0.001, fake(task, 0.50 + shift, 0.55 + shift, metric))
        for seed, value in enumerate((0.60, 0.62, 0.64)):
            name = f"table1/{task}-a-lr0.003-s0" if seed == 0 else f"table1/{task}-a-s{seed}"
            put(res, runs[name], 0.003, fake(task, value + shift, value + 0.1 + shift, metric, 900 + 100 * (task == "rte"),
                                             history=[0.5, value], norms=[0.01, 0.02 + seed / 100]))
    put(res, runs["table1/rte-head-lr0.01-s0"], 0.01, fake("rte", 0.55, 0.58, params=50, history=[0.5, 0.55]))
    return protocol, path


def test_tables_show_partial_floor_lr_search_and_seed_counts(tmp_path):
    protocol, path = _tiny(tmp_path)
    text = glue_report.render_tables(protocol, tmp_path / "res", "python benchmarks/glue.py tables", path)
    lines = text.splitlines()
    assert lines[2].startswith("**PARTIAL**: 9 of the 17 protocol runs have a result (9 trained, 0 reused); 4 can "
                               "train now, 0 wait to be copied, 4 wait for their learning rate or an equal run.")
    final_a, best_a = [line for line in lines if line.startswith("| Method A |")][:2]
    assert final_a == "| Method A | 900–1,000 | 62.00 ± 2.00 | 82.00 ± 2.00 | 72.00 |"
    assert best_a == "| Method A | 900–1,000 | 72.00 ± 2.00 | 92.00 ± 2.00 | 82.00 |"
    assert "| Head only (floor) | — | — | — | — |" in lines  # lr search of rte not complete: no cell yet
    assert "| Method A | 0.003 | 0.003 |" in lines and "| Head only (floor) | — (1/2) | — (0/2) |" in lines
    assert "| Method A | RTE (Acc) | 0.001: 50.00 / 55.00 | **0.003: 60.00 / 70.00** |" in lines
    assert "| uv | — | — | — |" in lines
    assert "`python benchmarks/glue.py run`" in text and "Learning rates: highest final" in text
    put(tmp_path / "res", gp.expand(protocol)[1], 0.1, fake("rte", 0.4, params=50))  # head rte lr 0.1: chosen 0.01
    text = glue_report.render_tables(protocol, tmp_path / "res", None, path)
    assert "| Head only (floor) | 50 | 55.00 (n=1) | — | — |" in text.splitlines()
    for i, run in enumerate(r for r in gp.expand(protocol) if r.name.startswith("table1/stsb-head-lr")):
        put(tmp_path / "res", run, run.lr, fake("stsb", 0.3 - i / 10, metric="pearson", params=49))
    text = glue_report.render_tables(protocol, tmp_path / "res", None, path)
    assert "| Head only (floor) | 49–50 | 55.00 (n=1) | 30.00 (n=1) | 42.50 (partial) |" in text.splitlines()


def test_tables_mark_a_cell_whose_lr_edge_run_is_pending(tmp_path):
    protocol, path = _tiny(tmp_path)
    protocol["methods"]["a"]["lr_edges"] = [0.0003, 0.01]  # Method A's grid picks its top, 0.003, on both tasks
    path.write_text(json.dumps(protocol), encoding="utf-8")
    lines = glue_report.render_tables(protocol, tmp_path / "res", None, path).splitlines()
    assert "| Method A | 900–1,000 | 62.00 ± 2.00 ‡ | 82.00 ± 2.00 ‡ | 72.00 |" in lines  # provisional
    assert "| Method A | 0.003 ‡ (edge run pending) | 0.003 ‡ (edge run pending) |" in lines
    plan = glue_plan.make_plan(protocol, tmp_path / "res")
    status = {s.run.name: s.status for s in plan.steps}
    assert (status["table1/rte-a-lr0.01-s0"], status["table1/rte-a-lr0.0003-s0"]) == ("todo", "skip")
    assert status["orth/rte-uv-s0"] == "waiting"  # waits for the final choice, not the provisional one
    runs = {r.name: r for r in gp.expand(protocol)}
    put(tmp_path / "res", runs["table1/rte-a-lr0.01-s0"], 0.01, fake("rte", 0.65))
    plan = glue_plan.make_plan(protocol, tmp_path / "res")
    assert plan.chosen["table1", "a", "rte"] == 0.01 and not plan.pending_edge(("table1", "a", "rte"))
    assert {s.run.name: s.lr for s in plan.steps}["orth/rte-uv-s0"] == 0.01


def test_real_protocol_tables_have_floor_and_ceiling_rows(tmp_path, protocol):
    text = glue_report.render_tables(protocol, tmp_path)
    assert "**PARTIAL**: 0 of the 466 protocol runs have a result" in text
    table1 = text.split("## Table 1")[1].split("## ")[0]
    assert "| Head only (floor) | — |" in table1 and "| Full fine-tuning (ceiling) | — |" in table1


def test_plots_write_png_files(tmp_path):
    protocol, _ = _tiny(tmp_path)
    written = glue_plots.write_plots(protocol, glue_plan.make_plan(protocol, tmp_path / "res"), tmp_path / "plots")
    names = sorted(p.name for p in written)
    assert names == ["table1-rte-metric.png", "table1-rte-update-norms.png", "table1-stsb-metric.png",
                     "table1-stsb-update-norms.png"]
    for path in written:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 1000
    steps, mean, low, high = glue_plots.band([{10: 0.5, 20: 0.7}, {10: 0.7, 20: 0.9, 30: 1.0}])
    assert (steps, mean, low, high) == ([10, 20], pytest.approx([0.6, 0.8]), [0.5, 0.7], [0.7, 0.9])


@pytest.mark.parametrize("results", ["glue_v2", "glue_v2_gpu"])
def test_committed_results_are_not_stale(protocol, results):
    plan = glue_plan.make_plan(protocol, bench.HERE / "results" / results)
    assert [s.run.name for s in plan.steps if s.note.startswith("stale")] == []
    assert sum(s.status == "done" for s in plan.steps) >= 9


def test_help(capsys):
    with pytest.raises(SystemExit) as exit_:
        bench.main(["--help"])
    assert exit_.value.code == 0 and "python benchmarks/glue.py run" in capsys.readouterr().out


def test_a_lora2_default_changes_no_other_methods_key(protocol):
    """A run's key holds only the LoRA2Config options its method reads (lora2.glue.args.LORA2_OPTIONS_READ_BY)."""
    args = {r.variant: r.args for r in gp.expand(protocol) if r.name.startswith("table1/mrpc-") and r.stage == 2
            and r.seed == 1}
    for variant in ("lora1", "head", "full", "bitfit", "adalora"):
        assert gp.run_key({**args[variant], "init": "gaussian", "lam_lr_ratio": 3}) == gp.run_key(args[variant])
    assert gp.run_key({**args["lora1"], "dropout": 0.1}) != gp.run_key(args["lora1"])
    assert gp.run_key({**args["adalora"], "orth_reg_weight": 0.3}) != gp.run_key(args["adalora"])
    assert gp.run_key({**args["lora2"], "lam_lr_ratio": 3}) != gp.run_key(args["lora2"])
    assert gp.run_key({**args["lora2"], "init": "orthogonal", "lam_lr_ratio": 16}) == gp.run_key(args["lora2"])
    assert gp.run_key(args["lora2_paper"]) != gp.run_key(args["lora2"])


def test_claims_share_runs_between_workers(tmp_path, monkeypatch):
    import glue_pool

    run, other = gp.Run("g", "rte", "a", 0), gp.Run("g", "rte", "b", 0)
    assert glue_pool.claim(run, tmp_path) and not glue_pool.in_progress(tmp_path / "none")
    assert glue_pool.in_progress(tmp_path)
    assert glue_pool.claim(run, tmp_path)  # this process's own claim (a retry in the same worker)
    path = tmp_path / "g" / "rte-a-s0.claim"
    host = path.read_text().split()[0]
    path.write_text(f"{host} 1")  # pid 1 is alive: another worker holds it
    assert not glue_pool.claim(run, tmp_path)
    path.write_text("elsewhere 123")  # a worker of another host: never taken over
    assert not glue_pool.claim(run, tmp_path)
    path.write_text(f"{host} 999999999")  # a dead worker's claim is taken over
    assert not glue_pool.in_progress(tmp_path)  # nobody alive holds it: a waiting worker need not wait for it
    assert glue_pool.claim(run, tmp_path)
    path.write_text("elsewhere 123")
    old = glue_pool.time.time() - glue_pool.STALE_S - 60
    glue_pool.os.utime(path, (old, old))  # another host's claim, abandoned long ago
    assert not glue_pool.in_progress(tmp_path) and glue_pool.claim(run, tmp_path)
    assert not list((tmp_path / "g").glob("*.tmp"))
    result = run.result_path(tmp_path / "res")
    result.parent.mkdir(parents=True)
    result.write_text("{}")  # finished by another worker between its plan and this claim: not trained again
    glue_pool.release(run, tmp_path)
    assert not glue_pool.take(run, tmp_path, tmp_path / "res") and not path.exists()
    assert glue_pool.take(other, tmp_path, tmp_path / "res")
    glue_pool.release(other, tmp_path)
    assert glue_pool.claim(run, tmp_path)
    glue_pool.release(run, tmp_path)
    assert not path.exists() and not glue_pool.in_progress(tmp_path)
    assert glue_pool.claim(other, tmp_path)
    glue_pool.release(other, tmp_path, error="RuntimeError: boom")
    assert (tmp_path / "g" / "rte-b-s0.failed").read_text() == "RuntimeError: boom\n"
    assert not glue_pool.claim(other, tmp_path)  # failed while this process ran: the other workers stay off
    monkeypatch.setattr(glue_pool, "_STARTED", glue_pool.time.time() + 60)  # a later sitting retries it
    assert glue_pool.claim(other, tmp_path)


def test_claiming_workers_train_each_run_once_and_wait_for_stage_one(tmp_path, monkeypatch, protocol):
    calls = []

    def fake_train(run, args, protocol, runs_dir, ns):
        assert (run_dir := runs_dir / run.group / f"{run.run_id}.claim").is_file(), run_dir  # held while training
        calls.append(run.name)
        return fake(run.task, 0.6 + (run.lr or 0)), 1.0

    monkeypatch.setattr(bench, "train_one", fake_train)
    base = ["--results-dir", str(tmp_path), "run", "--runs-dir", str(tmp_path / "runs"), "--tasks", "mrpc",
            "--only", "table1", "--order", "priority", "--no-tables", "--claim", "--wait", "--poll", "0.01"]
    assert bench.main([*base, "--max-runs", "5"]) == 0  # worker 1 stops after 5 runs
    assert bench.main(base) == 0  # worker 2 takes the rest; stage 2 unlocks as stage 1 completes
    assert len(calls) == 27 + 9 + 18 and len(set(calls)) == len(calls)
    assert not list((tmp_path / "runs").glob("*/*.claim"))
    calls.clear()
    stop = [*base, "--stop-after", "0"]
    for f in (tmp_path / "table1").glob("*-s2.json"):
        f.unlink()
    assert bench.main(stop) == 0 and calls == []  # --stop-after: no new run starts


def test_wait_needs_claims_and_claims_exclude_shards(tmp_path, capsys):
    for extra in (["--wait"], ["--claim", "--shard", "0/2"]):
        with pytest.raises(SystemExit):
            bench.main(["--results-dir", str(tmp_path), "run", *extra])
    err = capsys.readouterr().err
    assert "--wait needs --claim" in err and "--claim and --shard exclude each other" in err
    with pytest.raises(SystemExit):  # no abbreviations: "--work 3" in a worker's argv would start workers
        bench.main(["--results-dir", str(tmp_path), "run", "--work", "3"])


def test_committed_lora2_results_trained_with_the_settings_their_args_name():
    """Keys are recomputed with today's defaults; each LoRA² result's recorded settings must agree with them."""
    from lora2.config import LoRA2Config

    default = LoRA2Config()
    for results in ("glue_v2", "glue_v2_gpu"):
        for path in (bench.HERE / "results" / results).glob("*/*.json"):
            data = json.loads(path.read_text(encoding="utf-8"))
            if data.get("method") != "lora2":
                continue
            trained, args = data["hyperparameters"]["lora2"], data["benchmark"]["args"]
            assert trained["init"] == args.get("init", default.init), path
            assert (trained.get("lam_lr_ratio") or 1.0) == args.get("lam_lr_ratio", default.lam_lr_ratio), path


def test_a_waiting_worker_ends_when_no_run_is_in_progress(tmp_path, monkeypatch):
    """Stage 2 can never unlock when its stage 1 failed and nobody holds a claim: --wait must not spin forever."""
    import lora2.glue.run

    protocol = {"name": "tiny", "tasks": {"rte": {"max_steps": 5}},
                "methods": {"m": {"args": {"method": "lora2"}, "lr_grid": [0.001]}},
                "groups": {"g": {"tasks": ["rte"], "seeds": [0, 1], "learning_rate": "search",
                                 "variants": {"a": {"method": "m"}}}}}
    path = tmp_path / "p.json"
    path.write_text(json.dumps(protocol), encoding="utf-8")
    monkeypatch.setattr(lora2.glue.run, "run_glue", lambda args: (_ for _ in ()).throw(RuntimeError("boom")))
    argv = ["--protocol", str(path), "--results-dir", str(tmp_path / "res"), "run", "--runs-dir", str(tmp_path / "r"),
            "--claim", "--wait", "--poll", "0.01", "--no-tables"]
    assert bench.main(argv) == 1
    assert (tmp_path / "r" / "g" / "rte-a-lr0.001-s0.failed").is_file()


def test_worker_pool_starts_workers_and_stops_them_at_the_deadline(tmp_path, capsys):
    import glue_pool

    assert glue_pool._worker_argv(["--results-dir", "x", "run", "--workers", "3", "--kill-after=9", "--tf32"]) == \
        ["--results-dir", "x", "run", "--tf32", "--claim", "--wait", "--no-tables", "--workers", "0"]
    script = tmp_path / "worker.py"
    script.write_text("import sys, time\nif '--stop-after' in sys.argv:\n    time.sleep(60)\n", encoding="utf-8")
    ns = argparse.Namespace(workers=2, shard=None, runs_dir=str(tmp_path / "runs"), results_dir=str(tmp_path),
                            kill_after=None)
    assert glue_pool.run_workers(ns, ["run"], script) == 0  # both workers end by themselves
    ns.kill_after = 1.0
    start = glue_pool.time.monotonic()
    assert glue_pool.run_workers(ns, ["run", "--stop-after", "5"], script) == 1  # stopped: not a clean end
    assert glue_pool.time.monotonic() - start < 20
    out = capsys.readouterr().out
    assert "2 workers started" in out and "--kill-after 1 s: stopping the workers." in out
    assert sorted(p.name for p in (tmp_path / "runs" / "workers").iterdir()) == ["worker-0.log", "worker-1.log"]


def test_a_truncated_or_corrupted_result_file_is_trained_again_with_a_message(tmp_path, monkeypatch, capsys):
    import lora2.glue.run

    protocol = {"name": "tiny", "tasks": {"rte": {"max_steps": 5}}, "methods": {"m": {"args": {"method": "lora2"}}},
                "groups": {"g": {"tasks": ["rte"], "seeds": [0, 1, 2], "variants": {"a": {"method": "m"}}}}}
    path = tmp_path / "p.json"
    path.write_text(json.dumps(protocol), encoding="utf-8")
    runs = {r.name: r for r in gp.expand(protocol)}
    res = tmp_path / "res"
    good = fake("rte", 0.5)
    put(res, runs["g/rte-a-s0"], None, good)
    whole = runs["g/rte-a-s1"].result_path(res)
    put(res, runs["g/rte-a-s1"], None, good)
    whole.write_text(whole.read_text()[:40], encoding="utf-8")  # a write cut short
    put(res, runs["g/rte-a-s2"], None, {**good, "final": {}})  # valid JSON without its metric
    trained = []
    monkeypatch.setattr(lora2.glue.run, "run_glue", lambda args: trained.append(args.seed) or fake("rte", 0.7))
    argv = ["--protocol", str(path), "--results-dir", str(res), "run", "--runs-dir", str(tmp_path / "r"), "--no-tables"]
    assert bench.main(argv) == 0
    out = capsys.readouterr().out
    assert "warning: g/rte-a-s1: bad result file (not a JSON object (truncated or corrupted)): it is trained again" in out
    assert "warning: g/rte-a-s2: bad result file (no final main metric)" in out
    assert sorted(trained) == [1, 2]
    for seed in (1, 2):
        assert json.loads(runs[f"g/rte-a-s{seed}"].result_path(res).read_text())["final"]["accuracy"] == 0.7
    assert bench.main(argv) == 0 and sorted(trained) == [1, 2]  # repaired: nothing trains again


class CellPlan:
    """The one thing the comparison reads from a plan: the results of a (group, variant, task) cell."""

    def __init__(self, cells: dict) -> None:
        self.cells = cells

    def cell(self, group: str, variant: str, task: str) -> list[dict]:
        return self.cells.get((group, variant, task), [])


def test_paper_comparison_ranks_orderings_aliases_and_seed_spread():
    protocol = {"tasks": {"rte": {"label": "RTE (Acc)"}, "stsb": {"label": "STS-B (Pearson)"}},
                "groups": {"table1": {"tasks": ["rte", "stsb"], "seeds": [0, 1, 2], "learning_rate": "search",
                                      "variants": {v: {"label": v.upper()} for v in ("floor", "x", "x2", "y", "z")}},
                           "abl": {"tasks": ["rte"], "seeds": [0], "learning_rate": "table1:x",
                                   "variants": {"u": {"label": "U"}, "w": {"label": "W"}}}}}
    best = {("x", "rte"): [0.66, 0.70, 0.74], ("x", "stsb"): [0.60], ("x2", "rte"): [0.75], ("x2", "stsb"): [0.50],
            ("y", "rte"): [0.65], ("y", "stsb"): [0.65], ("z", "rte"): [0.60], ("z", "stsb"): [0.61],
            ("floor", "rte"): [0.99]}
    cells = {("table1", v, t): [fake(t, b - (0.1 if (v, t) != ("x", "rte") else 0.1 + 0.02 * (i - 1)), b)
                                for i, b in enumerate(values)] for (v, t), values in best.items()}
    cells[("abl", "u", "rte")], cells[("abl", "w", "rte")] = [fake("rte", 0.61, 0.66)], [fake("rte", 0.63, 0.65)]
    paper = {"model": "M", "compare_on": "best",
             "groups": {"table1": {"table": "T1", "rows": {"x": {"rte": 90.0, "stsb": 80.0}, "y": {"rte": 85.0, "stsb": 85.0},
                                                          "z": {"rte": 80.0, "stsb": 90.0}}, "aliases": {"x2": "x"}},
                        "abl": {"claim": "The paper says nothing."}}}
    lines = glue_compare.paper_block(protocol, CellPlan(cells), "table1", paper)
    assert "| X | 70.00 (1/3) | 90.00 (1/3) | 60.00 (3/3) | 80.00 (3/3) | 65.00 (1/3) | 85.00 (1/3) |" in lines
    assert "| X2 | 75.00 (1/3) | 90.00 (1/3) | 50.00 (3/3) | 80.00 (3/3) | 62.50 (2/3) | 85.00 (1/3) |" in lines
    assert "| Y | 65.00 (2/3) | 85.00 (2/3) | 65.00 (1/3) | 85.00 (2/3) | 65.00 (1/3) | 85.00 (1/3) |" in lines
    assert not any(line.startswith("| FLOOR") for line in lines)  # no paper row: not compared
    # RTE: the same order; STS-B: one of three pairs reversed; Avg: the paper's three averages are equal
    assert "| with X | best | +1.00 (3) | +0.33 (3) | — (3) |" in lines
    assert "| with X | final | +1.00 (3) | +0.33 (3) | — (3) |" in lines
    assert "| with X2 | best | +1.00 (3) | +0.33 (3) | — (3) |" in lines
    abl = "\n".join(glue_compare.paper_block(protocol, CellPlan(cells), "abl", paper))
    assert "The paper says nothing." in abl and "W minus U (final / best ×100): RTE (Acc) +2.00 / -1.00." in abl
    assert "sample sd σ (final / best ×100) of table1's X at the same lr: RTE (Acc) 2.00 / 4.00 (n=3)." in abl
    cells[("table1", "z", "stsb")] = [fake("stsb", 0.55, 0.65)]  # ties y at 65.00: shares the better rank
    lines = glue_compare.paper_block(protocol, CellPlan(cells), "table1", paper)
    assert "| Z | 60.00 (3/3) | 80.00 (3/3) | 65.00 (1/3) | 90.00 (1/3) | 62.50 (3/3) | 85.00 (1/3) |" in lines
    assert glue_compare.paper_block(protocol, CellPlan(cells), "table1", {"groups": {}}) == []


def test_tables_carry_the_paper_comparison(tmp_path):
    protocol, path = _tiny(tmp_path)
    paper = {"model": "M", "groups": {"table1": {"table": "T1", "rows": {"a": {"rte": 80.0, "stsb": 90.0}}}}}
    text = glue_report.render_tables(protocol, tmp_path / "res", None, path, paper=paper)
    assert "| Method A | 72.00 (1/1) | 80.00 (1/1) | 92.00 (1/1) | 90.00 (1/1) | 82.00 (1/1) | 85.00 (1/1) |" in text
    assert "**Against the paper**" not in text.split("## Table 3")[1]


def test_rank_and_kendall_tau():
    assert glue_compare.rank_among(5.0, [5.0, 6.0, 1.0]) == 2  # ties share the better rank
    assert glue_compare.kendall_tau([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert glue_compare.kendall_tau([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert glue_compare.kendall_tau([1, 3, 2], [1, 2, 3]) == pytest.approx(1 / 3)
    assert glue_compare.kendall_tau([1, 1, 2, 3], [1, 2, 3, 4]) == pytest.approx(5 / math.sqrt(30))  # tau-b, a tie
    assert math.isnan(glue_compare.kendall_tau([1, 2], [1, 2])) and math.isnan(glue_compare.kendall_tau([1, 1, 1], [1, 2, 3]))


def test_the_papers_numbers_name_protocol_groups_variants_and_tasks(protocol):
    paper = glue_compare.load_paper()
    assert set(paper["groups"]) == {"table1", "orth", "targets", "importance"}
    for name, spec in paper["groups"].items():
        group = protocol["groups"][name]
        for variant, cells in spec.get("rows", {}).items():
            assert variant in group["variants"] and set(cells) == set(group["tasks"]), (name, variant)
        for alias, target in spec.get("aliases", {}).items():
            assert alias in group["variants"] and target in spec["rows"]
    rows = {g: spec.get("rows", {}) for g, spec in paper["groups"].items()}
    # the paper's Table 1 (DeBERTa-v3-base), task by task; its text: LoRA² is 2.17 above AdaLoRA (r=2) on RTE
    assert rows["table1"]["lora2"] == {"mrpc": 90.93, "stsb": 91.69, "cola": 70.63, "rte": 89.53, "sst2": 95.64}
    assert rows["table1"]["lora2"]["rte"] - rows["table1"]["adalora"]["rte"] == pytest.approx(2.17)
    assert [rows["table1"][m]["mrpc"] for m in ("full", "bitfit", "adalora", "lora1", "lora8")] == \
        [89.22, 87.16, 90.44, 88.24, 89.71]
    assert [rows["table1"][m]["stsb"] for m in ("full", "bitfit", "adalora", "lora1", "lora8")] == \
        [91.59, 89.71, 91.63, 91.41, 91.86]
    # Table 3 with its MNLI column (90.27, 90.23, 90.33, 90.33, 90.38) gives the paper's Avg column back
    mnli = {"uv": 90.27, "UV-upper": 90.23, "uv+UV": 90.33, "PQ": 90.33, "all": 90.38}
    avg = {"uv": 90.31, "UV-upper": 90.29, "uv+UV": 90.48, "PQ": 90.29, "all": 90.63}
    for variant, cells in rows["orth"].items():
        assert (sum(cells.values()) + mnli[variant]) / 4 == pytest.approx(avg[variant], abs=0.006), variant
    # Table 4 with its CoLA column (68.66, 67.70, 70.44, 70.63) gives the paper's Avg column back
    cola = {"QK": 68.66, "QV": 67.70, "QKV": 70.44, "ALL": 70.63}
    avg = {"QK": 84.53, "QV": 83.54, "QKV": 84.31, "ALL": 85.70}
    for variant, cells in rows["targets"].items():
        assert (sum(cells.values()) + cola[variant]) / 4 == pytest.approx(avg[variant], abs=0.06), variant


DOC_ROWS = {"head only": "head", "lora² k=1, r=8 (defaults)": "lora2", "lora² k=1, r=8, defaults": "lora2",
            "lora², paper's settings": "lora2_paper", "lora², orthogonal init only": "lora2_orth", "lora r=1": "lora1",
            "lora r=8": "lora8", "adalora r=2": "adalora", "bitfit": "bitfit", "full fine-tuning": "full"}
DOC_TASKS = {"MRPC": "mrpc", "STS-B": "stsb", "CoLA": "cola", "RTE": "rte", "SST-2": "sst2"}


def quality_table(text: str, heading: str) -> tuple[list[str], list[list[str]]]:
    """The first markdown table after ``heading``: its header cells and its body rows."""
    lines = text[text.index(heading):].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| method |"))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return [c.strip() for c in lines[start].strip("|").split("|")], rows


@pytest.mark.parametrize(("doc", "heading"), [("README.md", "## GLUE quality"),
                                               ("benchmarks/README.md", "Table 1 so far")])
def test_documented_quality_tables_match_the_gpu_results(protocol, doc, heading):
    """Every metric cell of the docs' table 1 is the committed results' final mean ×100 over the seeds there (GPU
    directory), so a doc rewritten by hand cannot drift from the result files; when seeds 1 and 2 arrive, the
    docs must be rewritten to their means. (The params column is a range the tables compute; not checked.)"""
    plan = glue_plan.make_plan(protocol, bench.HERE / "results" / "glue_v2_gpu")
    header, rows = quality_table((REPO / doc).read_text(encoding="utf-8"), heading)
    tasks = [DOC_TASKS[h] for h in header if h in DOC_TASKS]
    assert len(tasks) >= 4 and len(rows) >= 8
    checked = 0
    for row in rows:
        label = row[0].replace("*", "").lower()
        variant = next(v for k, v in DOC_ROWS.items() if label.startswith(k))
        for task, cell in zip(tasks, row[2:], strict=True):
            mean = glue_compare._mean(plan, "table1", variant, task, "final")
            if cell.startswith("—"):  # not run (again) yet: the results must agree
                assert mean is None, (doc, variant, task)
            else:
                assert float(cell.split()[0]) == mean, (doc, variant, task)
            checked += 1
    assert checked == len(rows) * len(tasks)


def test_tasks_and_seeds_outside_the_protocol_are_errors_not_empty_selections(protocol):
    runs = gp.expand(protocol)
    with pytest.raises(ValueError, match="Unknown GLUE task 'foo'"):
        gp.select(runs, protocol, tasks=["foo"])
    with pytest.raises(ValueError, match=r"Seed\(s\) \[7\] are not in the protocol"):
        gp.select(runs, protocol, seeds=[7])
    assert {r.task for r in gp.select(runs, protocol, tasks=["STS-B"])} == {"stsb"}  # lora2 glue's spelling


def test_combine_takes_each_missing_seed_from_a_directory_at_the_same_lr(tmp_path, capsys, protocol):
    """`combine`: seeds the primary (search) directory lacks come from a second directory trained at its lrs;
    the primary's own seeds win; a run both trained is listed with its difference; a second directory with its
    own lrs is refused."""
    import glue_combine

    runs = {r.name: r for r in gp.expand(protocol)}
    gpu, cpu = tmp_path / "gpu", tmp_path / "cpu"
    on_gpu, on_cpu = {"gpu": "NVIDIA H100 80GB HBM3"}, {"gpu": None}
    for lr, final in ((0.0003, 0.70), (0.001, 0.78), (0.003, 0.75)):  # the grid chooses 0.001
        put(gpu, runs[f"table1/mrpc-lora2-lr{lr:g}-s0"], lr, fake("mrpc", final) | {"environment": on_gpu})
    put(gpu, runs["table1/mrpc-lora2-s1"], 0.001, fake("mrpc", 0.80) | {"environment": on_gpu})
    glue_plan.set_lr_source(cpu, gpu, protocol)
    put(cpu, runs["table1/mrpc-lora2-lr0.001-s0"], 0.001, fake("mrpc", 0.77) | {"environment": on_cpu})
    put(cpu, runs["table1/mrpc-lora2-s1"], 0.001, fake("mrpc", 0.50) | {"environment": on_cpu})  # the GPU's wins
    put(cpu, runs["table1/mrpc-lora2-s2"], 0.001, fake("mrpc", 0.82) | {"environment": on_cpu})
    out = tmp_path / "combined.md"
    assert bench.main(["--results-dir", str(gpu), "combine", "--seeds-from", str(cpu), "--out", str(out)]) == 0
    lines = out.read_text(encoding="utf-8").splitlines()
    final, best = [line for line in lines if line.startswith("| LoRA² (k=1, r=8), defaults")][:2]
    assert final.split(" | ")[2] == best.split(" | ")[2] == "80.00 ± 2.00"  # 78 (GPU s0), 80 (GPU s1), 82 (CPU s2)
    assert any(line.startswith("| LoRA² (k=1, r=8), defaults") and "| 0:H100 1:H100 2:CPU |" in line for line in lines)
    assert "| table1/mrpc-lora2-lr0.001-s0 | 0.001 | 78.00 | 77.00 | -1.00 |" in lines
    assert "| table1/mrpc-lora2-s1 | 0.001 | 80.00 | 50.00 | -30.00 |" in lines
    assert any(line.startswith("2 pairs: mean difference -15.50, sd 20.51") for line in lines)
    plan = glue_combine.combined_plan(protocol, gpu, cpu)
    assert [r["final"]["accuracy"] for r in plan.cell("table1", "lora2", "mrpc")] == [0.78, 0.80, 0.82]
    assert plan.cell("table1", "lora1", "mrpc") == []
    (tmp_path / "own").mkdir()
    capsys.readouterr()
    assert bench.main(["--results-dir", str(gpu), "combine", "--seeds-from", str(tmp_path / "own")]) == 2
    assert "learning rates are not the ones" in capsys.readouterr().err and not (gpu / "combined.md").exists()
    with pytest.raises(ValueError, match="name that directory as the primary"):
        glue_combine.combined_plan(protocol, cpu, cpu)
    with pytest.raises(ValueError, match="unknown group"):
        glue_combine.render_combined(protocol, gpu, cpu, ["nope"])
