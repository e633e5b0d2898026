"""The GLUE task table as data (as run_glue.py does): columns, labels, splits and metrics per task."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GlueTask:
    """How one GLUE task is laid out in the original TSV download and in ``nyu-mll/glue``."""

    name: str
    dirname: str
    text_columns: tuple[str, ...]  # TSV header names (CoLA: positional indices as strings)
    label_column: str
    labels: tuple[str, ...] | None  # label strings in the TSV, in the order of class ids; None: regression
    dev_splits: tuple[str, ...]
    metrics: tuple[str, ...]
    main_metric: str
    header: bool = True
    hf_text_columns: tuple[str, ...] = ("sentence1", "sentence2")

    @property
    def is_regression(self) -> bool:
        return self.labels is None

    @property
    def num_labels(self) -> int:
        return 1 if self.labels is None else len(self.labels)


TASKS: dict[str, GlueTask] = {
    "cola": GlueTask("cola", "CoLA", ("3",), "1", ("0", "1"), ("dev",), ("mcc",), "mcc", header=False,
                     hf_text_columns=("sentence",)),
    "sst2": GlueTask("sst2", "SST-2", ("sentence",), "label", ("0", "1"), ("dev",), ("accuracy",), "accuracy",
                     hf_text_columns=("sentence",)),
    "mrpc": GlueTask("mrpc", "MRPC", ("#1 String", "#2 String"), "Quality", ("0", "1"), ("dev",),
                     ("accuracy", "f1"), "accuracy"),
    "qqp": GlueTask("qqp", "QQP", ("question1", "question2"), "is_duplicate", ("0", "1"), ("dev",),
                    ("accuracy", "f1"), "accuracy", hf_text_columns=("question1", "question2")),
    "stsb": GlueTask("stsb", "STS-B", ("sentence1", "sentence2"), "score", None, ("dev",), ("pearson", "spearman"),
                     "pearson"),
    "mnli": GlueTask("mnli", "MNLI", ("sentence1", "sentence2"), "gold_label",
                     ("entailment", "neutral", "contradiction"), ("dev_matched", "dev_mismatched"),
                     ("accuracy",), "accuracy_matched", hf_text_columns=("premise", "hypothesis")),
    "qnli": GlueTask("qnli", "QNLI", ("question", "sentence"), "label", ("entailment", "not_entailment"), ("dev",),
                     ("accuracy",), "accuracy", hf_text_columns=("question", "sentence")),
    "rte": GlueTask("rte", "RTE", ("sentence1", "sentence2"), "label", ("entailment", "not_entailment"), ("dev",),
                    ("accuracy",), "accuracy"),
}


def get_task(name: str) -> GlueTask:
    key = name.lower().replace("-", "")
    if key not in TASKS:
        raise ValueError(f"Unknown GLUE task {name!r}; choose one of {sorted(TASKS)}.")
    return TASKS[key]
