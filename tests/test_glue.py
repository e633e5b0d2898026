"""GLUE pipeline: data loading per task, metrics, clear data errors, and the CLI end to end per
task and per method (a few steps on real rows, a tiny model, offline)."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer, BertConfig, BertForSequenceClassification

from lora2.cli import main
from lora2.glue import GlueDataError, get_task, load_split, read_tsv
from lora2.glue.args import GlueArgs
from lora2.glue.metrics import compute_metrics

from .conftest import REPO

EXPECTED_ROWS = {("cola", "train"): 8551, ("cola", "dev"): 1043, ("sst2", "train"): 67349, ("sst2", "dev"): 872,
                 ("mrpc", "train"): 3668, ("mrpc", "dev"): 408, ("stsb", "train"): 5749, ("stsb", "dev"): 1500,
                 ("rte", "train"): 2490, ("rte", "dev"): 277, ("qnli", "dev"): 5463}


@pytest.mark.parametrize(("task", "split"), list(EXPECTED_ROWS))
def test_every_shared_file_loads_with_its_row_count(glue_dir, task, split):
    examples = read_tsv(task, split, glue_dir)
    assert len(examples) == EXPECTED_ROWS[(task, split)]  # the counts SOURCES.md gives
    spec = get_task(task)
    assert all(len(e.texts) == len(spec.text_columns) and all(e.texts) for e in examples[:50])
    if spec.is_regression:
        assert all(0.0 <= e.label <= 5.0 for e in examples)
    else:
        assert {e.label for e in examples} == set(range(spec.num_labels))


def test_label_mapping_follows_the_hub_dataset(glue_dir):
    first = read_tsv("rte", "train", glue_dir)[0]
    assert first.label == 1  # "not_entailment" is class 1 in nyu-mll/glue
    assert read_tsv("qnli", "dev", glue_dir)[1].label == 1


@pytest.fixture(scope="module")
def extra_glue(glue_dir, tmp_path_factory) -> Path:
    """The shared layout plus MNLI, QQP and QNLI-train files built from real rows (they are not shipped)."""
    root = tmp_path_factory.mktemp("glue")
    for name in ("CoLA", "SST-2", "MRPC", "STS-B", "RTE", "QNLI"):
        (root / name).mkdir()
        for split in ("train", "dev"):
            src = glue_dir / name / f"{split}.tsv"
            if src.exists():
                with open(src, encoding="utf-8") as fh:
                    lines = [next(fh) for _ in range(61)] if name != "CoLA" else fh.readlines()[:60]
                (root / name / f"{split}.tsv").write_text("".join(lines), encoding="utf-8")
    shutil.copy(root / "QNLI" / "dev.tsv", root / "QNLI" / "train.tsv")
    rte = read_tsv("rte", "dev", glue_dir)[:60]
    labels = ["entailment", "neutral", "contradiction"]
    (root / "MNLI").mkdir()
    head = "index\tpromptID\tpairID\tgenre\tsentence1\tsentence2\tlabel1\tgold_label\n"
    rows = "".join(f"{i}\t{i}\t{i}\tfiction\t{e.texts[0]}\t{e.texts[1]}\tx\t{labels[i % 3]}\n" for i, e in enumerate(rte))
    for split in ("train", "dev_matched", "dev_mismatched"):
        (root / "MNLI" / f"{split}.tsv").write_text(head + rows, encoding="utf-8")
    (root / "QQP").mkdir()
    head = "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate\n"
    rows = "".join(f"{i}\t{2 * i}\t{2 * i + 1}\t{e.texts[0]}\t{e.texts[1]}\t{i % 2}\n" for i, e in enumerate(rte))
    for split in ("train", "dev"):
        (root / "QQP" / f"{split}.tsv").write_text(head + rows, encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def tiny_model_dir(minilm_path, tmp_path_factory) -> str:
    """A 2-layer BERT with MiniLM's tokenizer: real tokenisation, fast steps."""
    path = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=128)
    BertForSequenceClassification(cfg).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def run_cli(tmp_path, model, data_dir, task, method="lora2", *extra):
    out = tmp_path / f"{task}-{method}"
    argv = ["glue", "--task", task, "--method", method, "--model", model, "--data-dir", str(data_dir),
            "--output-dir", str(out), "--max-steps", "6", "--batch-size", "8", "--max-length", "48",
            "--max-train-samples", "48", "--max-eval-samples", "40", "--eval-steps", "3", "--init-warmup", "1",
            "--final-warmup", "2", "--mask-interval", "1", "--no-progress", *extra]
    assert main(argv) == 0
    return json.loads((out / "results.json").read_text()), out


def test_an_output_dir_with_an_earlier_run_is_refused_or_replaced(tmp_path, tiny_model_dir, glue_dir, capsys):
    _, out = run_cli(tmp_path, tiny_model_dir, glue_dir, "rte", "lora2", "--save-steps", "3")
    assert {"results.json", "heatmap.png", "adapter", "checkpoint-3"} <= {p.name for p in out.iterdir()}
    argv = ["glue", "--task", "rte", "--method", "lora", "--model", tiny_model_dir, "--data-dir", str(glue_dir),
            "--output-dir", str(out), "--max-steps", "4", "--batch-size", "8", "--max-length", "48",
            "--max-train-samples", "48", "--max-eval-samples", "40", "--lora-r", "2", "--no-progress"]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "already holds a run (results.json" in err and "--overwrite-output-dir" in err
    assert json.loads((out / "results.json").read_text())["method"] == "lora2"  # untouched
    assert main([*argv, "--max-length", "200", "--overwrite-output-dir"]) == 2  # fails to start: the earlier run stays
    assert (out / "heatmap.png").is_file() and (out / "checkpoint-3").is_dir()
    assert main([*argv, "--overwrite-output-dir", "--save-steps", "2", "--save-total-limit", "1"]) == 0
    names = {p.name for p in out.iterdir()}
    assert "heatmap.png" not in names and "checkpoint-3" not in names and "checkpoint-2" in names
    assert json.loads((out / "results.json").read_text())["method"] == "lora"
    assert not (out / "adapter" / "lora2_adapter.safetensors").exists()


def test_position_limits_of_model_families():
    from types import SimpleNamespace as NS

    from lora2.glue.run import position_limit

    def limit(tokenizer_max, **config):
        return position_limit(NS(config=NS(**config)), NS(model_max_length=tokenizer_max))

    assert limit(512, max_position_embeddings=512) == 512  # BERT
    assert limit(512, max_position_embeddings=514) == 512  # RoBERTa: 2 positions for its padding offset
    assert limit(128, max_position_embeddings=512) == 512  # a tokenizer saved with a small default
    assert limit(int(1e30), max_position_embeddings=4096) == 4096  # Llama: the tokenizer leaves it unset
    assert limit(512, max_position_embeddings=512, position_biased_input=False) is None  # DeBERTa-v3: relative
    assert limit(512, max_position_embeddings=-1) is None  # XLNet: no limit
    assert limit(512) is None  # T5: relative positions, no such field


def test_a_model_type_without_default_targets_names_the_flag():
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    from lora2.glue.methods import resolve_targets

    model = DistilBertForSequenceClassification(DistilBertConfig(vocab_size=50, dim=16, n_layers=1, n_heads=2,
                                                                 hidden_dim=32))
    with pytest.raises(ValueError, match=r"No default target_modules for model type 'distilbert'.*'q_lin'.*"
                                         r"Here: --target-modules"):
        resolve_targets(model, None)
    assert resolve_targets(model, ["q_lin"]) == ["q_lin"]
    everything = resolve_targets(model, ["all-linear"])  # --target-modules all-linear: full names, every method
    assert len(everything) == 6 and everything[0] == "distilbert.transformer.layer.0.attention.q_lin"
    assert not any(n.startswith(("pre_classifier", "classifier")) for n in everything)


def test_cli_spelling_limits_and_warnings(tmp_path, tiny_model_dir, glue_dir, capsys):
    import os
    import stat

    results, out = run_cli(tmp_path, tiny_model_dir, glue_dir, "STS-B", "lora2", "--save-steps", "4")
    assert results["task"] == "stsb" and results["data_source"] == str(glue_dir.resolve())
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines() if "loss" in line]
    # the logged lr is the one the step trained with: 6 steps, warm-up round(0.06 · 6) = 0, lr 1e-3 at step 1
    peak = results["hyperparameters"]["learning_rate"]
    assert results["hyperparameters"]["warmup_steps"] == 0 and log[-1]["step"] == 6
    assert log[-1]["lr"] == pytest.approx(peak / 6)  # linear decay: step 6 of 6 trains at 1/6 of the peak
    mask = os.umask(0)
    os.umask(mask)
    for path in (out / "results.json", out / "heatmap.png", out / "adapter" / "lora2_adapter.safetensors",
                 out / "checkpoint-4", out / "checkpoint-4" / "trainer_state.json"):
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (0o777 if path.is_dir() else 0o666) & ~mask, (path, oct(mode))
    base = ["glue", "--task", "rte", "--model", tiny_model_dir, "--data-dir", str(glue_dir), "--no-progress",
            "--max-train-samples", "16", "--max-eval-samples", "8", "--batch-size", "8"]
    capsys.readouterr()
    assert main([*base, "--output-dir", str(tmp_path / "long"), "--max-length", "200"]) == 2
    assert "--max-length 200 exceeds the 128 positions" in capsys.readouterr().err
    assert not (tmp_path / "long").exists()
    assert main([*base, "--output-dir", str(tmp_path / "nan"), "--method", "full", "--learning-rate", "1e30",
                 "--max-steps", "4"]) == 2  # a diverged run: a message, not a traceback
    assert "lora2 glue: error: Training loss is" in capsys.readouterr().err
    # diverged at the last step, so no loss saw it: NaN outputs give NaN metrics and exit code 1, not a "result"
    assert main([*base, "--output-dir", str(tmp_path / "nan1"), "--method", "full", "--learning-rate", "1e30",
                 "--max-steps", "1", "--max-grad-norm", "0"]) == 1
    assert "dev predictions are NaN/inf" in capsys.readouterr().err
    assert np.isnan(json.loads((tmp_path / "nan1" / "results.json").read_text())["final"]["accuracy"])
    assert main([*base, "--output-dir", str(tmp_path / "ep"), "--epochs", "1", "--init-warmup-min", "5"]) == 2
    assert ("The run's optimizer steps (--max-steps or --epochs)=2 leaves no pruning phase" in
            (err := capsys.readouterr().err)) and "at least --init-warmup-min 5" in err  # the flags, not the fields
    assert main([*base, "--output-dir", str(tmp_path / "short"), "--max-length", "3"]) == 2  # [CLS] a [SEP] b [SEP]
    assert "--max-length 3 leaves no room for text: RTE inputs take 3 special tokens" in capsys.readouterr().err
    assert main([*base, "--output-dir", str(tmp_path / "t"), "--target-modules", ","]) == 2
    assert "names no module" in capsys.readouterr().err
    assert main([*base, "--output-dir", str(tmp_path / "ada"), "--method", "adalora", "--max-steps", "2"]) == 2
    assert "AdaLoRA needs at least one step before its final phase" in capsys.readouterr().err
    with pytest.warns(UserWarning) as seen:
        assert main([*base, "--output-dir", str(tmp_path / "w"), "--epochs", "1", "--warmup-steps", "5",
                     "--eval-steps", "9", "--save-steps", "9", "--init-warmup", "0", "--final-warmup", "0"]) == 0
    text = " ".join(str(w.message) for w in seen)
    assert "--warmup-steps 5 is not shorter than the 2 steps --epochs 1 gives" in text
    assert "--eval-steps 9 exceeds the run's 2 steps" in text and "--save-steps 9 exceeds" in text


def test_how_often_it_evaluates_does_not_change_the_training(tmp_path, tiny_model_dir, glue_dir):
    from safetensors.torch import load_file

    runs = []
    for every in ("6", "2"):
        results, out = run_cli(tmp_path / every, tiny_model_dir, glue_dir, "rte", "lora2", "--eval-steps", every,
                               "--dropout", "0.1")
        runs.append((results, load_file(out / "adapter" / "lora2_adapter.safetensors")))
    (first, weights), (second, again) = runs
    assert [h["step"] for h in second["eval_history"]] == [2, 4, 6] and len(first["eval_history"]) == 1
    assert first["final"] == second["final"] and weights.keys() == again.keys()
    assert all(torch.equal(weights[k], again[k]) for k in weights)


@pytest.mark.parametrize("task", ["cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte"])
def test_cli_runs_every_task(task, tmp_path, tiny_model_dir, extra_glue):
    results, out = run_cli(tmp_path, tiny_model_dir, extra_glue, task)
    spec = get_task(task)
    assert results["task"] == task and results["steps"] == 6
    assert [h["step"] for h in results["eval_history"]] == [3, 6]
    expected_keys = {"mnli": {"accuracy_matched", "accuracy_mismatched"}, "stsb": {"pearson", "spearman"},
                     "cola": {"mcc"}, "mrpc": {"accuracy", "f1"}, "qqp": {"accuracy", "f1"}}
    assert set(results["final"]) == expected_keys.get(task, {"accuracy"})
    assert spec.main_metric in results["best"]
    assert results["best"][spec.main_metric] == max(h[spec.main_metric] for h in results["eval_history"])
    assert sum(results["active_ranks"].values()) == 2 * 12  # target_rank 2 × 12 matrices at the end
    # rank(ΔW) beside the count: at most min(k, active) per matrix, and random factors reach it
    k = results["hyperparameters"]["lora2"]["k"]
    assert results["effective_ranks"] == {n: min(k, a) for n, a in results["active_ranks"].items()}
    assert (out / "heatmap.png").stat().st_size > 1000
    assert (out / "learning_curve.png").stat().st_size > 1000 and results["learning_curve"].endswith("learning_curve.png")
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert any("loss" in entry for entry in log) and any("eval" in entry for entry in log)
    # with the ΔW statistics at each evaluation (steps 3 and 6), in results.json and in the log
    assert [n["effective_rank"] for n in results["update_norms"]] == [12, sum(results["effective_ranks"].values())]
    assert [e["update_norm"]["effective_rank"] for e in log if "eval" in e] == [  # k = 1: at most one per matrix
        n["effective_rank"] for n in results["update_norms"]]


@pytest.mark.parametrize("method", ["lora2", "lora", "adalora", "sora", "bitfit", "head"])
def test_the_saved_adapter_reloads_as_the_readme_says(method, tmp_path, tiny_model_dir, glue_dir):
    """README, "Reloading adapter/": each method's documented reload gives the run's final dev metric."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from lora2 import LoRA2Model
    from lora2.glue.baselines import add_sora
    from lora2.glue.run import Encoded, _collate, evaluate

    from .conftest import BERT_TARGETS

    results, out = run_cli(tmp_path, tiny_model_dir, glue_dir, "rte", method, "--lora-r", "2", "--adalora-init-r",
                           "4", "--adalora-target-r", "2", "--sora-r", "4", "--learning-rate", "0.01")
    base = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=2)
    if method == "lora2":
        model = LoRA2Model.from_pretrained(base, out / "adapter")
    elif method in ("lora", "adalora"):
        from peft import PeftModel

        model = PeftModel.from_pretrained(base, out / "adapter")
    else:
        if method == "sora":
            add_sora(base, BERT_TARGETS, r=4, alpha=results["hyperparameters"]["sora_alpha"])
        missing = base.load_state_dict(load_file(out / "adapter" / "trainable.safetensors"), strict=False)
        assert not missing.unexpected_keys
        model = base
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    dev = read_tsv("rte", "dev", glue_dir)[:40]
    encoded = Encoded(dev, tokenizer, 48, False)
    loader = torch.utils.data.DataLoader(encoded, batch_size=64, collate_fn=_collate(tokenizer))
    assert evaluate(model, {"dev": loader}, get_task("rte"), "cpu", False) == results["final"]
    # what --max-length cut, counted independently: pairs longer than 48 tokens before truncation
    longer = sum(len(tokenizer(*ex.texts)["input_ids"]) > 48 for ex in dev)
    assert 0 < longer < len(dev) and encoded.truncated == longer
    assert results["truncated_by_max_length"]["dev"] == {"count": longer, "fraction": round(longer / len(dev), 4)}
    assert 0 <= results["truncated_by_max_length"]["train"]["count"] <= results["train_examples"]
    with torch.no_grad():  # and a forward with labels, as the 🤗 Trainer's evaluation makes (peft#571 for AdaLoRA)
        assert torch.isfinite(model(**next(iter(loader))).loss)


@pytest.mark.parametrize("method", ["lora2", "lora", "adalora", "sora", "bitfit", "full", "head"])
def test_cli_runs_every_method(method, tmp_path, tiny_model_dir, glue_dir):
    results, out = run_cli(tmp_path, tiny_model_dir, glue_dir, "rte", method, "--lora-r", "2", "--adalora-init-r",
                           "4", "--adalora-target-r", "2", "--sora-r", "4", "--sora-lambda", "500")
    head = 32 * 2 + 2  # the classifier, trainable for every method (BERT's pooler belongs to the backbone)
    shapes = [(32, 32)] * 4 + [(32, 64), (64, 32)]  # Q K V O F1 F2 (d_in, d_out), 2 layers
    expected = {
        "lora2": head + 2 * sum(i + 3 * 8 + o for i, o in shapes),  # k=1, r=8
        "lora": head + 2 * sum(2 * (i + o) for i, o in shapes),  # r=2
        "adalora": head + 2 * sum(4 * (i + o) + 4 for i, o in shapes),  # init_r=4: A, B, E
        "sora": head + 2 * sum(4 * (i + o) + 4 for i, o in shapes),  # r=4: A, B, gate
        "head": head,  # the floor: frozen encoder
    }
    if method in expected:
        assert results["trainable_params"] == expected[method]
    layers = 2 * (sum(i * o + o for i, o in shapes) + 2 * 2 * 32)  # the six matrices with biases, two LayerNorms
    vocab = AutoConfig.from_pretrained(tiny_model_dir).vocab_size
    embeddings = (vocab + 128 + 2) * 32 + 2 * 32  # words, positions, token types, LayerNorm
    adapter = {m: n - head for m, n in expected.items()}  # trainable beside the head: what the method adds or trains
    adapter.update(bitfit=2 * (sum(o for _, o in shapes) + 2 * 32) + 32 + 32,  # biases: layers, pooler, embedding LN
                   full=embeddings + layers + 32 * 32 + 32)  # and the pooler
    assert results["adapter_params"] == adapter[method]
    if method == "adalora":  # update_and_allocate really ran: ranks left their initial value
        ranks = results["active_ranks"]
        assert sum(ranks.values()) == 2 * 12 and len(set(ranks.values())) > 1
        assert (out / "heatmap.png").exists()
        assert results["hyperparameters"]["lora2"] == {  # only what AdaLoRA reads, as run_cli set it
            "dropout": 0.0, "init_warmup": 1, "final_warmup": 2, "mask_interval": 1, "beta1": 0.85, "beta2": 0.85,
            "orth_reg_weight": 0.1}
    if method in ("lora", "sora", "bitfit", "head", "full"):
        assert set(results["hyperparameters"]["lora2"]) <= {"dropout"}
    if method == "sora":  # the proximal step zeroed gates
        assert sum(results["active_ranks"].values()) < 4 * 12
    if method == "bitfit":
        assert results["trainable_params"] < 2_000
    assert (out / "adapter").is_dir() and any((out / "adapter").iterdir())
    norms = results["update_norms"]  # ‖ΔW‖/‖W0‖ at each evaluation, for methods that adapt matrices
    if method == "head":
        assert norms == []
    else:
        assert [n["step"] for n in norms] == [3, 6] and all(0 <= n["median"] <= n["max"] for n in norms)
        # BitFit never changes a weight matrix; SoRA's update is 0 once every gate is pruned (λ = 500 here)
        unchanged = method == "bitfit" or (method == "sora" and sum(results["active_ranks"].values()) == 0)
        assert (norms[-1]["max"] == 0) == unchanged
    assert results["steps_per_s"] > 0 and results["peak_memory_mb"] > 0
    assert (results["device"], results["tf32"]) == ("cpu", False)  # --tf32 is a GPU setting, recorded as off here
    assert results["environment"]["transformers"] and results["environment"]["gpu"] is None


def test_a_checkpoint_fine_tuned_on_stsb_trains_a_classification_task_as_classification(tmp_path, tiny_model_dir,
                                                                                         glue_dir):
    """transformers saves problem_type="regression" in an STS-B model's config; RTE must not train with MSE."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    regression = tmp_path / "stsb-model"
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1, problem_type="regression",
                                                               ignore_mismatched_sizes=True)
    model.save_pretrained(regression)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(regression)
    assert AutoConfig.from_pretrained(regression).problem_type == "regression"
    _, out = run_cli(tmp_path, str(regression), glue_dir, "rte", "lora2")
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines() if "loss" in line]
    assert 0.3 < log[0]["task_loss"] < 1.2  # cross-entropy of two classes near ln 2, not MSE on class ids


def test_a_decoder_only_classifier_gets_a_padding_token(tmp_path, glue_dir):
    """GPT-2 has no pad token: the pipeline pads with end-of-text, and the head finds each row's last token."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2TokenizerFast

    path = tmp_path / "gpt2"
    vocab = {"<|endoftext|>": 0, **{chr(c): i + 1 for i, c in enumerate(range(32, 127))}}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    raw.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tokenizer = GPT2TokenizerFast(tokenizer_object=raw, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                  unk_token="<|endoftext|>")
    torch.manual_seed(0)
    GPT2ForSequenceClassification(GPT2Config(vocab_size=len(vocab), n_embd=32, n_layer=2, n_head=2, n_positions=512,
                                             num_labels=2)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    results, _ = run_cli(tmp_path, str(path), glue_dir, "rte", "lora2", "--max-length", "64")
    assert results["steps"] == 6 and np.isfinite(results["final"]["accuracy"])


def test_the_heatmap_title_counts_matrices_outside_the_layers():
    from lora2.glue.plots import heatmap_title, pattern_grid

    pattern = {"bert.encoder.layer.0.attention.self.query": 2, "bert.encoder.layer.1.attention.self.query": 3,
               "bert.pooler.dense": 4}
    _, _, grid = pattern_grid(pattern)
    assert heatmap_title("T", pattern, grid, 3) == \
        "T\nactive singular values: 9 (4 outside the layers, not drawn); effective rank (sum): 3"
    inside = {k: v for k, v in pattern.items() if "layer" in k}
    assert heatmap_title("T", inside, pattern_grid(inside)[2], None) == "T\nactive singular values: 5"


def test_metrics_follow_the_glue_definitions():
    cola, mrpc, stsb = get_task("cola"), get_task("mrpc"), get_task("stsb")
    labels = np.array([1, 0, 1, 1, 0, 1])
    logits = np.array([[0, 1], [1, 0], [1, 0], [0, 1], [0, 1], [0, 1]], dtype=float)  # preds 1 0 0 1 1 1
    tp, tn, fp, fn = 3, 1, 1, 1
    mcc = (tp * tn - fp * fn) / np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    assert compute_metrics(cola, logits, labels)["mcc"] == pytest.approx(mcc)
    assert compute_metrics(mrpc, logits, labels) == pytest.approx({"accuracy": 4 / 6, "f1": 2 * 3 / (2 * 3 + 1 + 1)})
    scores = np.array([0.5, 1.0, 2.5, 4.0])
    gold = np.array([1.0, 0.5, 3.0, 5.0])
    got = compute_metrics(stsb, scores[:, None], gold)
    assert got["pearson"] == pytest.approx(np.corrcoef(scores, gold)[0, 1])
    assert got["spearman"] == pytest.approx(0.8)  # ranks 1 2 3 4 vs 2 1 3 4
    with pytest.warns(RuntimeWarning, match=r"every dev prediction is 1 \(a collapsed regression head\)"):
        assert compute_metrics(stsb, np.ones((4, 1)), gold) == {"pearson": 0.0, "spearman": 0.0}
    # a diverged model's NaN outputs are no majority-class run: every metric is NaN (the protocol ranks it last)
    nan_logits = np.full((6, 2), np.nan)
    assert all(np.isnan(v) for v in compute_metrics(mrpc, nan_logits, labels).values())
    assert set(compute_metrics(cola, nan_logits, labels)) == {"mcc"}
    assert all(np.isnan(v) for v in compute_metrics(stsb, np.full((4, 1), np.inf), gold).values())


def _write(tmp_path: Path, task_dir: str, text: str) -> Path:
    (tmp_path / task_dir).mkdir(parents=True, exist_ok=True)
    (tmp_path / task_dir / "train.tsv").write_text(text, encoding="utf-8")
    return tmp_path


def test_malformed_row_names_file_and_line(tmp_path):
    root = _write(tmp_path, "RTE", "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n1\tonly two\n")
    with pytest.raises(GlueDataError, match=r"RTE/train.tsv:3: expected at least 4"):
        read_tsv("rte", "train", root)


def test_an_empty_line_between_rows_is_an_error_but_not_at_the_end(tmp_path):
    rows = "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n"
    root = _write(tmp_path, "RTE", rows + "\n1\tc\td\tnot_entailment\n")
    with pytest.raises(GlueDataError, match=r"RTE/train.tsv:3: an empty line between rows"):
        read_tsv("rte", "train", root)
    _write(tmp_path, "RTE", rows + "\n\n")  # trailing blank lines are harmless
    assert len(read_tsv("rte", "train", root)) == 1


def test_a_cola_header_line_and_a_short_row_say_what_the_layout_is(tmp_path):
    root = _write(tmp_path, "CoLA", "source\tlabel\tnote\tsentence\nsrc\t1\t\tFine.\n")
    with pytest.raises(GlueDataError, match=r"CoLA/train.tsv:1: label 'label' .*no header line: remove it"):
        read_tsv("cola", "train", root)
    _write(tmp_path, "CoLA", "src\t1\n")
    with pytest.raises(GlueDataError, match=r"train.tsv:1: expected at least 4 .*text in column 3, label in column 1"):
        read_tsv("cola", "train", root)


def test_bad_label_names_file_and_line(tmp_path):
    root = _write(tmp_path, "RTE", "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tmaybe\n")
    with pytest.raises(GlueDataError, match=r"train.tsv:2: label 'maybe' is not one of"):
        read_tsv("rte", "train", root)


def test_missing_columns_and_empty_files_are_named(tmp_path):
    root = _write(tmp_path, "SST-2", "text\tlabel\nfoo\t1\n")
    with pytest.raises(GlueDataError, match=r"missing column\(s\) \['sentence'\]"):
        read_tsv("sst2", "train", root)
    _write(tmp_path, "SST-2", "")
    with pytest.raises(GlueDataError, match="is empty"):
        read_tsv("sst2", "train", root)
    _write(tmp_path, "SST-2", "sentence\tlabel\n")
    with pytest.raises(GlueDataError, match="has no examples"):
        read_tsv("sst2", "train", root)


def test_bad_scores_extra_fields_and_encodings_are_named(tmp_path):
    header = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
    for score in ("nan", "inf", "-37", "5.5"):
        root = _write(tmp_path / score, "STS-B", header + f"0\tg\tf\ty\t0\ts\ts\ta\tb\t{score}\n")
        with pytest.raises(GlueDataError, match=rf"train.tsv:2: label '{score}' is outside the STS-B score range"):
            read_tsv("stsb", "train", root)
    root = _write(tmp_path, "CoLA", "src\t1\t\tThe sailors\trode the breeze.\n")  # a tab inside the sentence
    with pytest.raises(GlueDataError, match=r"CoLA/train.tsv:1: 5 tab-separated fields, more than the 4"):
        read_tsv("cola", "train", root)
    root = _write(tmp_path, "RTE", "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\textra\n")
    with pytest.raises(GlueDataError, match=r"train.tsv:2: 5 tab-separated fields, more than the 4"):
        read_tsv("rte", "train", root)
    (tmp_path / "SST-2").mkdir()
    rows = "sentence\tlabel\n" + "fine\t1\n" * 3000 + "caf\u00e9\t1\n"  # past the reader's first chunk
    (tmp_path / "SST-2" / "train.tsv").write_bytes(rows.encode("latin-1"))
    with pytest.raises(GlueDataError, match=r"SST-2/train.tsv:3002: byte 21018 \(invalid .*\): not UTF-8 .*iconv"):
        read_tsv("sst2", "train", tmp_path)


def test_a_local_directory_is_the_only_source_once_set(tmp_path, monkeypatch):
    from lora2.glue import data

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(data, "load_from_hub", lambda *a: pytest.fail("a set directory must never fall back"))
    root = _write(tmp_path, "rte", "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n")
    with pytest.raises(FileNotFoundError, match=r"has no rte train split: expected .*RTE/train.tsv \(found rte/"):
        load_split("rte", "train", root)
    monkeypatch.setenv("LORA2_GLUE_DIR", str(root))
    with pytest.raises(FileNotFoundError, match=r"\$LORA2_GLUE_DIR .* unset \$LORA2_GLUE_DIR to download"):
        load_split("rte", "dev")
    assert data.data_source() == str(root.resolve()) and data.data_source(tmp_path / "x") == str(tmp_path / "x")
    monkeypatch.delenv("LORA2_GLUE_DIR")
    monkeypatch.delenv("GLUE_DIR", raising=False)
    assert data.data_source() == "hub:nyu-mll/glue"


def test_offline_without_local_data_names_both_remedies(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("LORA2_GLUE_DIR", raising=False)
    monkeypatch.delenv("GLUE_DIR", raising=False)
    with pytest.raises(FileNotFoundError, match=r"--data-dir.*nyu-mll/glue"):
        load_split("mnli", "train", tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_split("rte", "train", tmp_path / "nope")


def test_cli_reports_errors_without_a_traceback(tmp_path, capsys, tiny_model_dir):
    code = main(["glue", "--task", "rte", "--data-dir", str(tmp_path / "missing"), "--model", tiny_model_dir,
                 "--output-dir", str(tmp_path / "out"), "--no-progress"])
    assert code == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_offline_hub_model_name_is_a_clear_error(tmp_path, capsys, glue_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code = main(["glue", "--task", "rte", "--data-dir", str(glue_dir), "--model", "someone/not-a-local-dir",
                 "--output-dir", str(tmp_path / "out"), "--no-progress", "--max-train-samples", "8"])
    assert code == 2
    assert "hub is offline" in capsys.readouterr().err


def test_help_lists_every_documented_flag(capsys):
    with pytest.raises(SystemExit):
        main(["glue", "--help"])
    text = capsys.readouterr().out
    for flag in ("--task", "--method", "--model", "--data-dir", "--output-dir", "--max-length", "--batch-size",
                 "--learning-rate", "--epochs", "--max-steps", "--warmup-steps", "--seed", "--eval-steps", "--k",
                 "--r", "--target-rank", "--orth-reg-weight", "--init-warmup", "--final-warmup", "--mask-interval",
                 "--lora-r", "--lora-alpha", "--adalora-init-r", "--adalora-target-r"):
        assert flag in text


def test_python_dash_m_is_the_cli():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "lora2", "--version"], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0 and out.stdout.startswith("lora2 ")


def test_every_lora2_config_field_is_a_glue_flag_and_reaches_the_config(tiny_model_dir):
    """The LoRA² flags come from LoRA2Config itself: each field (target_total_rank included) is settable
    on the command line and arrives unchanged in the wrapped model's config."""
    import dataclasses

    from transformers import AutoModelForSequenceClassification

    from lora2.cli import build_parser, glue_args_from_namespace
    from lora2.config import LoRA2Config
    from lora2.glue.args import PIPELINE_OWNED
    from lora2.glue.methods import build_method

    wanted = {"k": 3, "r": 5, "alpha": 7.0, "dropout": 0.25, "init_std": 0.3, "init": "orthogonal",
              "target_rank": 4, "target_total_rank": 17, "init_warmup": 5, "final_warmup": 7, "mask_interval": 3,
              "beta1": 0.5, "beta2": 0.6, "orth_reg_weight": 0.2, "orth_terms": ["uv", "PQ"], "importance": "full"}
    new_fields = {f.name for f in dataclasses.fields(LoRA2Config)} - set(PIPELINE_OWNED) - set(wanted)
    for f in dataclasses.fields(LoRA2Config):  # fields added later: any valid non-default value will do
        if f.name in new_fields:
            wanted[f.name] = f.metadata["choices"][-1] if "choices" in f.metadata else (
                f.default * 2 if isinstance(f.default, (int, float)) and not isinstance(f.default, bool) else f.default)
    argv = ["glue", "--task", "rte", "--target-modules", "query,value"]
    for name, value in wanted.items():
        argv += ["--" + name.replace("_", "-"), ",".join(value) if isinstance(value, list) else str(value)]
    args = glue_args_from_namespace(build_parser().parse_args(argv))
    assert args.lora2 == wanted
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=2)
    config = build_method(args, model, total_steps=200).model.lora2_config
    for name, value in wanted.items():
        assert getattr(config, name) == value, name
    assert config.target_modules == ["query", "value"] and config.modules_to_save == ["classifier"]
    assert config.total_step == 200


def test_pipeline_defaults_for_lora2_and_the_shared_adalora_schedule(tiny_model_dir):
    from transformers import AutoModelForSequenceClassification

    from lora2.glue.methods import build_method

    args = GlueArgs(task="sst2")
    settings = args.lora2_settings(total_steps=200)
    assert (settings["init_warmup"], settings["final_warmup"], settings["alpha"]) == (30, 90, 16.0)  # 15% / 45%
    assert GlueArgs(task="rte").lora2_settings(200)["alpha"] == 32.0
    assert GlueArgs(task="rte", lora2={"init_warmup": 5}).lora2_settings(200)["init_warmup"] == 5
    assert GlueArgs(task="rte", init_warmup_min=50).lora2_settings(200)["init_warmup"] == 50  # max(30, 50)
    assert GlueArgs(task="rte", init_warmup_min=20).lora2_settings(200)["init_warmup"] == 30
    ada = GlueArgs(task="rte", method="adalora", adalora_init_r=4, adalora_target_r=2,
                   lora2={"init_warmup": 11, "final_warmup": 13, "mask_interval": 3, "orth_reg_weight": 0.3})
    peft_cfg = build_method(ada, AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=2),
                            total_steps=100).model.peft_config["default"]
    assert (peft_cfg.tinit, peft_cfg.tfinal, peft_cfg.deltaT, peft_cfg.orth_reg_weight) == (11, 13, 3, 0.3)
    with pytest.raises(ValueError, match="Unknown lora2 glue option"):
        GlueArgs.from_flat({"task": "rte", "rank": 3})
    with pytest.raises(ValueError, match=r"LoRA2Config\.k"):
        GlueArgs(task="rte", lora2={"k": 0})
    with pytest.raises(ValueError, match="set by the pipeline"):
        GlueArgs(task="rte", lora2={"total_step": 10})


def test_adalora_trains_with_its_orthogonality_regulariser(tiny_model_dir):
    """PEFT adds γ·R only in AdaLoraModel.forward, which PeftModel.forward skips; the log splits it off, and the
    model keeps no wrapper (a deep copy runs its own weights)."""
    from lora2.glue.methods import build_method

    batch = {"input_ids": torch.tensor([[101, 7592, 2088, 102], [101, 2088, 102, 0]]),
             "attention_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]]), "labels": torch.tensor([0, 1])}
    seen = []
    for weight in (0.0, 0.1, 0.5):
        torch.manual_seed(0)
        args = GlueArgs(task="rte", method="adalora", adalora_init_r=4, adalora_target_r=2,
                        lora2={"orth_reg_weight": weight, "dropout": 0.0})
        method = build_method(args, AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=2),
                              total_steps=100)
        method.model.train()
        loss = float(method.training_loss(batch))
        seen.append((loss, method.task_loss(loss)))
        grams = [p @ p.T if "lora_A" in n else p.T @ p for n, p in method.model.named_parameters()
                 if "lora_A" in n or "lora_B" in n]
        reg = sum(torch.linalg.matrix_norm(g - torch.eye(g.shape[0])) for g in grams)  # PEFT's: ‖·‖_F, not squared
        assert loss == pytest.approx(seen[0][0] + weight * float(reg) / len(grams), rel=1e-5)
    assert len({round(task, 6) for _, task in seen}) == 1 and seen[0][0] == pytest.approx(seen[0][1])
    assert seen[2][0] - seen[2][1] == pytest.approx(5 * (seen[1][0] - seen[1][1]), rel=1e-5)
    assert "forward" not in vars(method.model.get_base_model())
    import copy

    twin = copy.deepcopy(method.model)
    with torch.no_grad():
        for p in twin.parameters():
            p.zero_()
    assert not torch.equal(twin(**batch).logits, method.model(**batch).logits)


@pytest.mark.parametrize(("options", "message"), [
    ({"epochs": float("nan")}, "--epochs must be a finite number > 0"),
    ({"learning_rate": 0.0}, "--learning-rate must be a finite number > 0"),
    ({"max_grad_norm": -1.0}, "--max-grad-norm must be a finite number >= 0"),
    ({"weight_decay": -0.1}, "--weight-decay must be a finite number >= 0"),
    ({"warmup_steps": -5}, "--warmup-steps must be an integer >= 0"),
    ({"num_threads": -2}, "--num-threads must be an integer >= 1"),
    ({"lora_r": 0}, "--lora-r must be an integer >= 1"),
    ({"save_total_limit": 0}, "--save-total-limit must be an integer >= 1"),
    ({"adalora_init_r": 2, "adalora_target_r": 4}, "must not exceed --adalora-init-r"),
    ({"max_steps": 50, "lora2": {"init_warmup": 1000}}, r"--max-steps 50 leaves no pruning phase.*1000 \+ 22"),
    ({"max_steps": 4, "init_warmup_min": 100}, r"--max-steps 4 leaves no pruning phase.*100 \+ 2 = 102 "
                                               r"\(--init-warmup-min 100\)"),
])
def test_bad_numbers_fail_before_anything_loads(options, message):
    with pytest.raises(ValueError, match=message):
        GlueArgs(task="rte", **options)


def test_lora2_options_a_method_ignores_are_named():
    with pytest.warns(UserWarning, match="--method lora does not read the LoRA² option.*--k: they are ignored"):
        GlueArgs(task="rte", method="lora", lora2={"k": 4, "dropout": 0.1})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        GlueArgs(task="rte", method="lora", lora2={"dropout": 0.1})  # LoRA reads the dropout
        GlueArgs(task="rte", max_steps=50)  # the warm-ups default to fractions of the run: they fit
    with pytest.warns(UserWarning, match=r"--method head does not read --lora-r, --target-modules: ignored"):
        GlueArgs(task="rte", method="head", target_modules="query", lora_r=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        GlueArgs(task="rte", method="lora", target_modules="query", lora_r=4)  # both read by LoRA
        GlueArgs(task="rte", method="adalora", adalora_init_r=12)
        GlueArgs(task="rte", max_steps=50, warmup_steps=10)
    with pytest.warns(UserWarning, match=r"--warmup-steps 60 is not shorter than --max-steps 50"):
        GlueArgs(task="rte", max_steps=50, warmup_steps=60)


def _lora2_step_grad_norm(orth_clip: str, clip: float) -> tuple[float, float]:
    """(loss returned, gradient norm right after the optimizer step) of one pipeline step on a tiny BERT."""
    from lora2.glue.args import GlueArgs
    from lora2.glue.loop import train_step
    from lora2.glue.methods import build_method

    from .conftest import BERT_TARGETS, tiny_bert

    args = GlueArgs(task="rte", target_modules=",".join(BERT_TARGETS), orth_clip=orth_clip,
                    lora2={"init_warmup": 2, "final_warmup": 2, "orth_reg_weight": 0.5, "init": "gaussian"})
    method = build_method(args, tiny_bert(), total_steps=10)
    method.model.train()
    optimizer = torch.optim.SGD(method.trainable(), lr=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    batch = {"input_ids": torch.randint(0, 120, (4, 12), generator=torch.Generator().manual_seed(0)),
             "labels": torch.tensor([0, 1, 0, 1])}
    norms = []

    def phase(name: str) -> None:
        if name == "optimizer":
            norms.append(float(torch.cat([p.grad.flatten() for p in method.trainable() if p.grad is not None]).norm()))

    loss = train_step(method, batch, optimizer, scheduler, 1, clip, phase=phase)
    return float(loss), norms[0]


def test_orth_clip_separate_clips_the_task_gradient_alone():
    shared_loss, shared_norm = _lora2_step_grad_norm("shared", 1e-6)
    separate_loss, separate_norm = _lora2_step_grad_norm("separate", 1e-6)
    assert shared_norm == pytest.approx(1e-6, rel=1e-3)  # task + γ·R gradient clipped as one
    assert separate_norm > 1e-2  # γ·R's gradient (Gaussian factors are far from orthonormal) is added unclipped
    # either way the step returns the objective task loss + γ·R (γ·R ≈ 0.5 · (2·(1 + 1) + 2·8) at this init)
    assert separate_loss == pytest.approx(shared_loss, rel=1e-5) and shared_loss > 0.5 * 19


def test_training_log_separates_task_loss_and_regulariser_terms(tmp_path, tiny_model_dir, glue_dir):
    _, out = run_cli(tmp_path, tiny_model_dir, glue_dir, "rte", "lora2", "--logging-steps", "2")
    entries = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    logged = [e for e in entries if "loss" in e]
    assert logged and all({"task_loss", "orth_reg", "orth_uv", "orth_UV", "orth_PQ"} <= set(e) for e in logged)
    for e in logged:  # R is the sum of its terms; the logged loss is task loss + γ·R (γ = 0.1 by default)
        assert e["orth_reg"] == pytest.approx(e["orth_uv"] + e["orth_UV"] + e["orth_PQ"], rel=1e-5)
        assert e["loss"] - e["task_loss"] == pytest.approx(0.1 * e["orth_reg"], rel=0.05)


@pytest.mark.parametrize("method", ["lora2", "lora", "adalora", "full"])
def test_update_norms_match_the_merged_weights(method):
    """Method.update_norms() (recorded at every evaluation) equals ‖W_merged − W0‖ / ‖W0‖ per matrix."""
    import statistics

    from lora2.glue.args import GlueArgs
    from lora2.glue.methods import build_method

    from .conftest import BERT_TARGETS, tiny_bert

    base = tiny_bert()
    names = [n for n, m in base.named_modules() if isinstance(m, torch.nn.Linear) and n.split(".")[-1] in
             ("query", "key", "value", "dense") and "pooler" not in n]
    before = {n: base.get_submodule(n).weight.detach().clone() for n in names}
    args = GlueArgs(task="rte", method=method, target_modules=",".join(BERT_TARGETS), lora_r=2, adalora_init_r=3,
                    adalora_target_r=2, lora2={"init_warmup": 2, "final_warmup": 2})
    built = build_method(args, base, total_steps=10)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():  # move every trainable tensor so that ΔW ≠ 0
        for p in built.trainable():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    got = built.update_norms()
    if method == "lora2":
        built.model.merge()
        model = built.model.base_model
    elif method in ("lora", "adalora"):
        model = built.model.merge_and_unload()
    else:
        model = built.model
    def weight(name: str) -> torch.Tensor:
        module = model.get_submodule(name)
        return getattr(module, "base_layer", module).weight.detach()  # a merged LoRA2Layer keeps its base layer

    ratios = [float((weight(n) - w0).norm() / w0.norm()) for n, w0 in before.items()]
    assert len(ratios) == 12 and min(ratios) > 0
    assert got["median"] == pytest.approx(statistics.median(ratios), rel=1e-4)
    assert got["max"] == pytest.approx(max(ratios), rel=1e-4)


def test_a_run_without_pruning_may_be_shorter_than_the_warm_ups():
    GlueArgs(task="rte", max_steps=50, lora2={"r": 8, "target_rank": 8, "init_warmup": 100})
    GlueArgs(task="rte", method="adalora", adalora_init_r=2, adalora_target_r=2, max_steps=50, lora2={"init_warmup": 100})
