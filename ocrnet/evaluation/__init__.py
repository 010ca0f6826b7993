"""Evaluation: mmsegmentation's IoU metric and the dataset loop."""

from .evaluate import evaluate
from .metrics import IoUMetric, format_table, json_ready

__all__ = ["IoUMetric", "evaluate", "format_table", "json_ready"]
