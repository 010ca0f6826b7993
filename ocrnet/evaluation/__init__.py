"""Evaluation: mmsegmentation's IoU metric (:mod:`.metrics`), the dataset loop
(:func:`ocrnet.evaluation.evaluate.evaluate`, which needs the data extra: OpenCV) and the speed
protocol of ``ocrnet bench`` (:mod:`.speed`)."""

from .metrics import IoUMetric, format_table, json_ready

__all__ = ["IoUMetric", "format_table", "json_ready"]
