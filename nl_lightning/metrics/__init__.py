"""Continual-learning metrics: the accuracy matrix and the metrics derived from it (ACC, BWT, FWT, forgetting)."""

from nl_lightning.metrics.accuracy_matrix import AccuracyMatrix, continual_metrics

__all__ = ["AccuracyMatrix", "continual_metrics"]
