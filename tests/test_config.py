"""LoRA2Config: defaults, validation naming the field, JSON round trip."""

from __future__ import annotations

import json

import pytest

from lora2 import LoRA2Config


def test_defaults_are_the_papers_but_init_and_lam_lr_ratio():
    cfg = LoRA2Config()
    assert (cfg.k, cfg.r, cfg.alpha, cfg.beta1, cfg.beta2, cfg.importance) == (1, 8, 32.0, 0.85, 0.85, "reduced")
    assert cfg.orth_terms == ["uv", "UV", "PQ"]
    assert cfg.scaling == 4.0
    assert (cfg.pq_form, cfg.scaling_rule) == ("literal", "alpha/r")  # the spec's
    assert (cfg.init, cfg.lam_lr_ratio) == ("orthogonal", 16.0)  # chosen by measurement (method.md §11)
    paper = LoRA2Config(init="gaussian", lam_lr_ratio=1)
    assert (paper.init, paper.lam_lr_ratio, paper.init_std) == ("gaussian", 1.0, 0.02)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("k", 0), ("k", -1), ("k", 1.5), ("k", True), ("r", 0), ("r", "8"),
        ("alpha", 0), ("alpha", float("nan")), ("dropout", 1.0), ("dropout", -0.1), ("init_std", 0),
        ("init", "xavier"),
        ("target_rank", 9), ("target_rank", 0), ("target_total_rank", 0),
        ("init_warmup", -1), ("final_warmup", 2.0), ("mask_interval", 0),
        ("beta1", 1.0), ("beta2", 0.0), ("total_step", 0), ("orth_reg_weight", -0.1),
        ("orth_terms", ["uv", "pq"]), ("orth_terms", ["uv", "uv"]), ("importance", "fast"),
        ("target_modules", []), ("target_modules", [""]), ("modules_to_save", "classifier"),
        ("pq_form", "exact"), ("pq_form", None), ("scaling_rule", "alpha/d"), ("scaling_rule", "alpha / r"),
        ("lam_lr_ratio", 0), ("lam_lr_ratio", -2.0), ("lam_lr_ratio", float("inf")), ("lam_lr_ratio", "16"),
        ("lam_lr_ratio", True),
    ],
)
def test_invalid_value_names_the_field(field, value):
    with pytest.raises(ValueError, match=rf"LoRA2Config\.{field}"):
        LoRA2Config(**{field: value})


def test_schedule_without_pruning_phase_is_rejected_at_setup():
    with pytest.raises(ValueError, match="no pruning phase"):
        LoRA2Config(init_warmup=200, final_warmup=600, total_step=800)
    assert LoRA2Config(init_warmup=200, final_warmup=600, total_step=801).total_step == 801


def test_default_target_rank_adapts_to_small_r_and_to_total_budgets():
    assert LoRA2Config(r=1).resolved_target_rank == 1
    assert LoRA2Config(r=1, target_total_rank=3).budgets(5) == (5, 3)
    assert LoRA2Config().resolved_target_rank == 2
    # no pruning configured: a run shorter than the warm-ups is fine
    assert LoRA2Config(r=8, target_rank=8, total_step=100).total_step == 100


def test_invalid_regex_names_the_field():
    with pytest.raises(ValueError, match=r"LoRA2Config\.target_modules is not a valid regular expression"):
        LoRA2Config(target_modules="query(")


def test_target_total_rank_larger_than_initial_budget_is_rejected():
    cfg = LoRA2Config(r=4, target_total_rank=100)
    with pytest.raises(ValueError, match="exceeds the initial budget"):
        cfg.budgets(10)
    assert cfg.budgets(25) == (100, 100)
    assert LoRA2Config(r=8, target_rank=2).budgets(36) == (288, 72)


def test_json_round_trip(tmp_path):
    cfg = LoRA2Config(k=2, r=6, target_rank=3, target_modules="layer\\.\\d+\\.attention\\..*", orth_terms=["PQ"],
                      importance="full", total_step=5000, modules_to_save=["classifier"], pq_form="rank",
                      lam_lr_ratio=16.0, scaling_rule="alpha/sqrt(r)")
    path = tmp_path / "c.json"
    path.write_text(cfg.to_json_string())
    again = LoRA2Config.from_json_file(path)
    assert again == cfg
    assert json.loads(path.read_text())["importance"] == "full"
    assert (again.pq_form, again.lam_lr_ratio, again.scaling_rule) == ("rank", 16.0, "alpha/sqrt(r)")
    assert again.scaling == cfg.scaling == pytest.approx(32 / 6**0.5)


@pytest.mark.parametrize(("rule", "expected"), [("alpha/r", 4.0), ("alpha/k", 16.0), ("alpha/sqrt(r)", 11.3137085)])
def test_scaling_rule_sets_s(rule, expected):
    assert LoRA2Config(k=2, r=8, alpha=32.0, scaling_rule=rule).scaling == pytest.approx(expected)


def test_every_field_has_help_and_the_string_choices_are_listed():
    """The CLI builds a flag per field from its metadata: help everywhere, choices where a string has them."""
    from dataclasses import fields

    by_name = {f.name: f for f in fields(LoRA2Config)}
    assert all(len(f.metadata.get("help", "")) > 20 for f in by_name.values())
    assert by_name["pq_form"].metadata["choices"] == ["literal", "rank"]
    assert by_name["scaling_rule"].metadata["choices"] == ["alpha/r", "alpha/k", "alpha/sqrt(r)"]
    assert "LoRA+" in by_name["lam_lr_ratio"].metadata["help"]
    for name in ("pq_form", "lam_lr_ratio", "scaling_rule"):
        assert name in LoRA2Config.__doc__


def test_unknown_json_field_is_named(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"k": 1, "rank": 4}))
    with pytest.raises(ValueError, match=r"Unknown LoRA2Config field\(s\) \['rank'\]"):
        LoRA2Config.from_json_file(path)


def test_truncated_json_gives_clear_error(tmp_path):
    path = tmp_path / "c.json"
    path.write_text('{"k": 1, "r"')
    with pytest.raises(ValueError, match="truncated or corrupted"):
        LoRA2Config.from_json_file(path)


def test_peft_option_names_say_what_they_are_called_here():
    with pytest.raises(TypeError, match=r"LoRA2Config has no lora_alpha, task_type \(PEFT's names\); here: lora_alpha "
                                        r"→ alpha; task_type → nothing: the task is read from the model"):
        LoRA2Config(lora_alpha=32, task_type="SEQ_CLS")
    with pytest.raises(TypeError, match=r"init_r → r"):
        LoRA2Config(init_r=12)
    with pytest.raises(TypeError, match="unexpected keyword argument 'no_such'"):  # anything else: Python's message
        LoRA2Config(no_such=1)
    import inspect

    assert list(inspect.signature(LoRA2Config).parameters)[:3] == ["k", "r", "alpha"]


def test_sets_of_names_become_sorted_lists_and_a_directory_gives_its_config(tmp_path):
    config = LoRA2Config(target_modules={"value", "query"}, modules_to_save=frozenset({"classifier"}))
    assert config.target_modules == ["query", "value"] and config.modules_to_save == ["classifier"]
    (tmp_path / "lora2_config.json").write_text(json.dumps({"library": "lora2", "config": config.to_dict()}))
    for source in (tmp_path, tmp_path / "lora2_config.json"):
        assert LoRA2Config.from_pretrained(source) == config == LoRA2Config.from_json_file(source)
