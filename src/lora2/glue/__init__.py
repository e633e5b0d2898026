"""GLUE fine-tuning pipeline: task table, data loading, metrics, and training runs."""

from .data import Example, GlueDataError, load_split, read_tsv
from .tasks import TASKS, GlueTask, get_task

__all__ = ["TASKS", "Example", "GlueDataError", "GlueTask", "get_task", "load_split", "read_tsv"]
