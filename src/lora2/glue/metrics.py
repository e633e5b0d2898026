"""GLUE metrics as the benchmark defines them, computed with scikit-learn and SciPy (no hub scripts)."""

from __future__ import annotations

import math
import warnings

import numpy as np
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from .tasks import GlueTask


def _finite(value: float) -> float:
    """Constant predictions make correlations undefined; report 0 rather than NaN so runs compare."""
    return 0.0 if value is None or math.isnan(value) else float(value)


def compute_metrics(task: GlueTask, predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Metrics of one dev split. ``predictions``: logits (N, C), or scores (N,)/(N, 1) for STS-B."""
    predictions = np.asarray(predictions)
    labels = np.asarray(labels)
    if len(predictions) != len(labels) or len(labels) == 0:
        raise ValueError(f"{task.name}: {len(predictions)} predictions for {len(labels)} labels.")
    if np.issubdtype(predictions.dtype, np.floating) and not np.isfinite(predictions).all():
        # a diverged model: argmax would read NaN logits as class 0 and score it like a majority-class run
        names = ("pearson", "spearman") if task.is_regression else task.metrics
        return {name: math.nan for name in names}
    if task.is_regression:
        scores = predictions.reshape(len(predictions), -1)[:, 0].astype(np.float64)
        if np.ptp(scores) == 0:
            warnings.warn(f"{task.name.upper()}: every dev prediction is {scores[0]:g} (a collapsed regression head): "
                          "Pearson and Spearman are undefined and reported as 0. Check the learning rate.",
                          RuntimeWarning, stacklevel=2)
            return {"pearson": 0.0, "spearman": 0.0}
        return {
            "pearson": _finite(pearsonr(scores, labels.astype(np.float64))[0]),
            "spearman": _finite(spearmanr(scores, labels)[0]),
        }
    classes = predictions.argmax(axis=-1) if predictions.ndim == 2 else predictions.astype(int)
    out: dict[str, float] = {}
    for metric in task.metrics:
        if metric == "accuracy":
            out["accuracy"] = float(accuracy_score(labels, classes))
        elif metric == "f1":
            out["f1"] = float(f1_score(labels, classes, zero_division=0))
        elif metric == "mcc":
            out["mcc"] = _finite(matthews_corrcoef(labels, classes))
        else:
            raise ValueError(f"Unknown metric {metric!r} for {task.name}.")
    return out


def flatten_split_metrics(task: GlueTask, per_split: dict[str, dict[str, float]]) -> dict[str, float]:
    """One flat dict: MNLI gets ``accuracy_matched`` / ``accuracy_mismatched``, other tasks keep names."""
    if len(per_split) == 1:
        return dict(next(iter(per_split.values())))
    flat = {}
    for split, metrics in per_split.items():
        suffix = split.replace("dev_", "")
        for name, value in metrics.items():
            flat[f"{name}_{suffix}"] = value
    return flat


def main_score(task: GlueTask, metrics: dict[str, float]) -> float:
    """The number 'best during training' is judged by (the paper's headline metric per task)."""
    return metrics[task.main_metric]
