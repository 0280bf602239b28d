"""GLUE metrics as torchmetrics collections, the per-task GLUE score, and a causal LM's token-mean loss and perplexity."""

from __future__ import annotations

import torch
from torchmetrics import Accuracy, F1Score, MatthewsCorrCoef, Metric, MetricCollection, PearsonCorrCoef, SpearmanCorrCoef

from kdlora.data.tasks import TaskSpec


def _make_metric(name: str, num_labels: int) -> Metric:
    if name == "mcc":
        return MatthewsCorrCoef(task="multiclass", num_classes=num_labels)
    if name == "accuracy":
        return Accuracy(task="multiclass", num_classes=num_labels)
    if name == "f1":  # GLUE's F1 is binary F1 of the positive class (MRPC, QQP)
        return F1Score(task="binary")
    if name == "pearson":
        return PearsonCorrCoef()
    if name == "spearman":
        return SpearmanCorrCoef()
    raise ValueError(f"unknown metric {name!r}")


def task_metrics(spec: TaskSpec) -> MetricCollection:
    """A fresh collection of the task's metrics (one per evaluation split)."""
    return MetricCollection({m: _make_metric(m, spec.num_labels) for m in spec.metrics})


def predictions_from_logits(logits: torch.Tensor, is_regression: bool) -> torch.Tensor:
    """Class ids for classification, the scalar output for regression."""
    return logits.squeeze(-1).float() if is_regression else logits.argmax(dim=-1)


def glue_score(values: dict[str, float]) -> float:
    """A task's GLUE score: the mean of its metrics (e.g. MRPC = (F1 + accuracy) / 2)."""
    if not values:
        raise ValueError("no metric values to average")
    return float(sum(values.values()) / len(values))

