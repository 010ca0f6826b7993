"""Evaluation: mmsegmentation's IoU metric (:mod:`.metrics`), the dataset loop
(:func:`ocrnet.evaluation.evaluate.evaluate`, which needs the data extra: OpenCV), the speed
protocol of ``ocrnet bench`` (:mod:`.speed`) and its training-memory measurement
(:mod:`.train_memory`)."""

from .metrics import IoUMetric, format_table, json_ready

__all__ = ["IoUMetric", "format_table", "json_ready"]
