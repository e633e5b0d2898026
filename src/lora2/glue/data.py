"""GLUE examples from the original TSV download, with ``nyu-mll/glue`` on the hub as the fallback.

A local directory wins (``--data-dir``, else ``$LORA2_GLUE_DIR``, else ``$GLUE_DIR``). Every
malformed row is reported with its file and line; nothing is silently skipped.
"""

from __future__ import annotations

import csv
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from .tasks import GlueTask, get_task

ENV_VARS = ("LORA2_GLUE_DIR", "GLUE_DIR")
HF_DATASET = "nyu-mll/glue"


@dataclass(frozen=True)
class Example:
    texts: tuple[str, ...]
    label: int | float


class GlueDataError(ValueError):
    """A GLUE file is missing, empty or malformed; the message names the file (and line)."""


def default_data_dir() -> Path | None:
    for var in ENV_VARS:
        if os.environ.get(var):
            return Path(os.environ[var])
    return None


def split_file(task: GlueTask, split: str, data_dir: Path) -> Path:
    return Path(data_dir) / task.dirname / f"{split}.tsv"


def _parse_label(task: GlueTask, raw: str, where: str) -> int | float:
    raw = raw.strip()
    if task.is_regression:
        try:
            return float(raw)
        except ValueError:
            raise GlueDataError(f"{where}: label {raw!r} is not a number (STS-B scores are 0–5).") from None
    assert task.labels is not None
    if raw not in task.labels:
        raise GlueDataError(f"{where}: label {raw!r} is not one of {list(task.labels)} for {task.name}.")
    return task.labels.index(raw)


def read_tsv(task: GlueTask | str, split: str, data_dir: str | Path) -> list[Example]:
    """Read one split from ``<data_dir>/<Task>/<split>.tsv`` (the layout of the GLUE download)."""
    task = get_task(task) if isinstance(task, str) else task
    path = split_file(task, split, Path(data_dir))
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist (expected the GLUE download layout <data-dir>/{task.dirname}/"
                                f"{split}.tsv).")
    csv.field_size_limit(sys.maxsize)
    examples: list[Example] = []
    with open(path, encoding="utf-8-sig", newline="") as fh:
        reader = csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)
        if task.header:
            header = next(reader, None)
            if header is None:
                raise GlueDataError(f"{path} is empty: expected a header line and {task.name} rows.")
            wanted = (*task.text_columns, task.label_column)
            missing = [c for c in wanted if c not in header]
            if missing:
                raise GlueDataError(f"{path}:1: missing column(s) {missing}; the header has {header}.")
            text_idx = [header.index(c) for c in task.text_columns]
            label_idx = header.index(task.label_column)
        else:
            text_idx = [int(c) for c in task.text_columns]
            label_idx = int(task.label_column)
        needed = max(*text_idx, label_idx) + 1
        for row in reader:
            where = f"{path}:{reader.line_num}"
            if not row or row == [""]:
                continue
            if len(row) < needed:
                raise GlueDataError(f"{where}: expected at least {needed} tab-separated fields, found {len(row)}.")
            examples.append(Example(tuple(row[i] for i in text_idx), _parse_label(task, row[label_idx], where)))
    if not examples:
        raise GlueDataError(f"{path} has no examples.")
    return examples


def _hf_split(split: str) -> str:
    return {"dev": "validation", "dev_matched": "validation_matched", "dev_mismatched": "validation_mismatched"}.get(
        split, split
    )


def load_from_hub(task: GlueTask, split: str) -> list[Example]:
    """Fallback for users online: the ``nyu-mll/glue`` dataset on the Hugging Face hub."""
    from datasets import load_dataset

    rows = load_dataset(HF_DATASET, task.name, split=_hf_split(split))
    return [Example(tuple(r[c] for c in task.hf_text_columns), r["label"]) for r in rows]


def load_split(task: GlueTask | str, split: str, data_dir: str | Path | None = None) -> list[Example]:
    """Local TSVs if present, else the hub; offline with neither, one message with both remedies."""
    task = get_task(task) if isinstance(task, str) else task
    directory = Path(data_dir) if data_dir is not None else default_data_dir()
    if directory is not None:
        if not directory.is_dir():
            source = "--data-dir" if data_dir is not None else next(v for v in ENV_VARS if os.environ.get(v))
            raise FileNotFoundError(f"{source} {directory} does not exist or is not a directory.")
        if split_file(task, split, directory).is_file():
            return read_tsv(task, split, directory)
    offline = any(os.environ.get(v, "").lower() in ("1", "true", "yes") for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
    remedy = (
        f"Provide the data in one of two ways: (1) point --data-dir (or ${ENV_VARS[0]}) at a directory with the "
        f"original GLUE TSV layout, e.g. <dir>/{task.dirname}/{split}.tsv; or (2) go online so the Hugging Face "
        f"dataset {HF_DATASET!r} ({task.name}) can be downloaded."
    )
    where = f" in {directory}" if directory is not None else ""
    if offline:
        raise FileNotFoundError(f"No local {task.name} {split} split{where} and the hub is offline. {remedy}")
    try:
        return load_from_hub(task, split)
    except Exception as err:  # network, missing package, hub errors: all lead to the same two remedies
        raise FileNotFoundError(f"No local {task.name} {split} split{where}, and the hub failed ({err}). {remedy}") \
            from err
