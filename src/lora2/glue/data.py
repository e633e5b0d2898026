"""GLUE examples from the original TSV download, or ``nyu-mll/glue`` from the hub when no local directory is set.

A local directory (``--data-dir``, else ``$LORA2_GLUE_DIR``, else ``$GLUE_DIR``) is the only source once set: a
split missing there is an error, never a silent download that would mix two sources. Every malformed row is
reported with its file and line; nothing is silently skipped.
"""

from __future__ import annotations

import csv
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from ..hub import hub_offline
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
            score = float(raw)
        except ValueError:
            raise GlueDataError(f"{where}: label {raw!r} is not a number (STS-B scores are 0–5).") from None
        if not math.isfinite(score) or not 0.0 <= score <= 5.0:
            raise GlueDataError(f"{where}: label {raw!r} is outside the STS-B score range 0–5.")
        return score
    assert task.labels is not None
    if raw not in task.labels:
        hint = (f" GLUE's {task.name} files have no header line: remove it." if not task.header
                and where.endswith(":1") and not raw.lstrip("-").isdigit() else "")
        raise GlueDataError(f"{where}: label {raw!r} is not one of {list(task.labels)} for {task.name}.{hint}")
    return task.labels.index(raw)


def _layout(task: GlueTask) -> str:
    """The columns a row must have, for messages: names (files with a header) or 0-based positions."""
    if task.header:
        return "columns " + ", ".join((*task.text_columns, task.label_column))
    texts = ", ".join(f"text in column {c}" for c in task.text_columns)
    return f"{texts}, label in column {task.label_column}, counting from 0"


def read_tsv(task: GlueTask | str, split: str, data_dir: str | Path) -> list[Example]:
    """Read one split from ``<data_dir>/<Task>/<split>.tsv`` (the layout of the GLUE download)."""
    task = get_task(task) if isinstance(task, str) else task
    path = split_file(task, split, Path(data_dir))
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist (expected the GLUE download layout <data-dir>/{task.dirname}/"
                                f"{split}.tsv).")
    csv.field_size_limit(sys.maxsize)
    examples: list[Example] = []
    try:
        _read_rows(task, path, examples)
    except UnicodeDecodeError:
        raw = path.read_bytes()  # the reader decodes in chunks: find the offset in the file itself
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as err:
            line = raw[:err.start].count(b"\n") + 1
            where = f"{path}:{line}: byte {err.start} ({err.reason})"
        else:
            where = str(path)
        raise GlueDataError(f"{where}: not UTF-8 text; GLUE's files are UTF-8: convert it, e.g. "
                            "iconv -f latin1 -t utf-8.") from None
    if not examples:
        raise GlueDataError(f"{path} has no examples.")
    return examples


def _read_rows(task: GlueTask, path: Path, examples: list[Example]) -> None:
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
            width = len(header)
        else:
            text_idx = [int(c) for c in task.text_columns]
            label_idx = int(task.label_column)
            width = max(*text_idx, label_idx) + 1
        needed = max(*text_idx, label_idx) + 1
        blank = None  # an empty line is fine at the end of the file only
        for row in reader:
            where = f"{path}:{reader.line_num}"
            if not row or row == [""]:
                blank = blank or where
                continue
            if blank is not None:
                raise GlueDataError(f"{blank}: an empty line between rows; GLUE's files have none (a row lost its text, "
                                    "or two files were joined?). Remove the line or restore the row.")
            if len(row) < needed:
                raise GlueDataError(f"{where}: expected at least {needed} tab-separated fields ({_layout(task)}), found "
                                    f"{len(row)}.")
            if len(row) > width:  # a tab inside a text field would silently cut it
                raise GlueDataError(f"{where}: {len(row)} tab-separated fields, more than the {width} of "
                                    f"{task.name}'s layout (a tab inside a sentence?).")
            examples.append(Example(tuple(row[i] for i in text_idx), _parse_label(task, row[label_idx], where)))


def _hf_split(split: str) -> str:
    return {"dev": "validation", "dev_matched": "validation_matched", "dev_mismatched": "validation_mismatched"}.get(
        split, split
    )


def load_from_hub(task: GlueTask, split: str) -> list[Example]:
    """Fallback for users online: the ``nyu-mll/glue`` dataset on the Hugging Face hub."""
    from datasets import load_dataset

    rows = load_dataset(HF_DATASET, task.name, split=_hf_split(split))
    return [Example(tuple(r[c] for c in task.hf_text_columns), r["label"]) for r in rows]


def data_source(data_dir: str | Path | None = None) -> str:
    """Where ``load_split`` reads from: the local directory, or the hub dataset (for results.json)."""
    directory = Path(data_dir) if data_dir is not None else default_data_dir()
    return str(directory.resolve()) if directory is not None else f"hub:{HF_DATASET}"


def load_split(task: GlueTask | str, split: str, data_dir: str | Path | None = None) -> list[Example]:
    """The local TSVs when a directory is set (a missing split there is an error), else the hub; offline with
    neither, one message with both remedies."""
    task = get_task(task) if isinstance(task, str) else task
    directory = Path(data_dir) if data_dir is not None else default_data_dir()
    if directory is not None:
        source = "--data-dir" if data_dir is not None else "$" + next(v for v in ENV_VARS if os.environ.get(v))
        if not directory.is_dir():
            raise FileNotFoundError(f"{source} {directory} does not exist or is not a directory.")
        path = split_file(task, split, directory)
        if not path.is_file():
            near = [p.name for p in directory.iterdir() if p.is_dir() and p.name.lower() == task.dirname.lower()]
            hint = f" (found {near[0]}/: the GLUE layout spells it {task.dirname}/)" if near and near[0] != \
                task.dirname else ""
            other = (f", or go online (the hub is off: HF_HUB_OFFLINE/HF_DATASETS_OFFLINE) and unset {source} to "
                     f"download {HF_DATASET!r}" if hub_offline("HF_DATASETS_OFFLINE") else
                     f", or unset {source} to download {HF_DATASET!r} from the hub instead")
            raise FileNotFoundError(
                f"{source} {directory} has no {task.name} {split} split: expected {path}{hint}. Add the file{other}.")
        return read_tsv(task, split, directory)
    offline = hub_offline("HF_DATASETS_OFFLINE")
    remedy = (
        f"Provide the data in one of two ways: (1) point --data-dir (or ${ENV_VARS[0]}, or ${ENV_VARS[1]}) at a "
        f"directory with the original GLUE TSV layout, e.g. <dir>/{task.dirname}/{split}.tsv; or (2) go online so "
        f"the Hugging Face dataset {HF_DATASET!r} ({task.name}) can be downloaded."
    )
    if offline:
        raise FileNotFoundError(f"No local {task.name} {split} split (no --data-dir, ${ENV_VARS[0]} or "
                                f"${ENV_VARS[1]}) and the hub is offline. {remedy}")
    try:
        return load_from_hub(task, split)
    except Exception as err:  # network, missing package, hub errors: all lead to the same two remedies
        raise FileNotFoundError(f"No local {task.name} {split} split, and the hub failed ({err}). {remedy}") from err
