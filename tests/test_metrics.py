"""GLUE metrics against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch
from scipy.stats import pearsonr, spearmanr

from kdlora.data.tasks import get_task
from kdlora.eval.metrics import glue_score, predictions_from_logits, task_metrics


def _compute(task, preds, labels):
    m = task_metrics(get_task(task))
    m.update(torch.tensor(preds), torch.tensor(labels))
    return {k: float(v) for k, v in m.compute().items()}


def test_cola_matthews_by_hand():
    preds = [1, 1, 0, 0, 1, 0, 1, 1]
    labels = [1, 0, 0, 1, 1, 0, 1, 0]
    tp, tn, fp, fn = 3, 2, 2, 1
    mcc = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    assert _compute("cola", preds, labels) == {"mcc": pytest.approx(mcc)}


def test_mrpc_f1_and_accuracy_by_hand():
    preds = [1, 1, 0, 0, 1, 0, 1, 1, 1, 0]
    labels = [1, 0, 0, 1, 1, 0, 1, 1, 0, 0]
    tp, fp, fn = 4, 2, 1
    f1 = 2 * tp / (2 * tp + fp + fn)
    out = _compute("mrpc", preds, labels)
    assert out == {"f1": pytest.approx(f1), "accuracy": pytest.approx(7 / 10)}
    assert glue_score(out) == pytest.approx((f1 + 0.7) / 2)


def test_mnli_accuracy_three_classes():
    assert _compute("mnli", [0, 1, 2, 2, 1], [0, 1, 1, 2, 0]) == {"accuracy": pytest.approx(3 / 5)}


def test_stsb_correlations_match_scipy():
    preds = [0.1, 2.5, 3.0, 4.9, 1.2, 3.3]
    labels = [0.0, 2.0, 3.5, 5.0, 1.0, 2.9]
    out = _compute("stsb", preds, labels)
    assert out["pearson"] == pytest.approx(pearsonr(preds, labels)[0], abs=1e-5)
    assert out["spearman"] == pytest.approx(spearmanr(preds, labels)[0], abs=1e-5)


def test_predictions_from_logits():
    logits = torch.tensor([[0.1, 2.0], [3.0, -1.0]])
    assert predictions_from_logits(logits, False).tolist() == [1, 0]
    assert predictions_from_logits(torch.tensor([[2.5], [0.5]]), True).tolist() == [2.5, 0.5]
