"""The metrics a task may declare (`metric:` in its YAML), GLUE's among them (Wang et al. 2019).

Each takes predictions and gold labels (1-D arrays; class indices or scores) and returns a
float, higher is better (a correlation of constant predictions is undefined: NaN). A metric
declares the task kind it scores, whether it needs two classes, and the lowest value it takes
(correlation-like metrics: -1), which the overall score's `normalised` mode maps to 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy import stats


@dataclass(frozen=True)
class Metric:
    function: Callable[[np.ndarray, np.ndarray], float]
    task_kind: str  # "classification" or "regression"
    short: str  # as tables name it: "Acc", "F1", ...
    low: float = 0.0  # the range is [low, 1]
    binary: bool = False  # needs two classes (class 1 is the positive one)

    def normalised(self, value: float) -> float:
        """The value mapped from [low, 1] to [0, 1]."""
        return (value - self.low) / (1.0 - self.low)


def accuracy(predictions: np.ndarray, labels: np.ndarray) -> float:
    return float((predictions == labels).mean())


def f1(predictions: np.ndarray, labels: np.ndarray) -> float:
    """F1 of class 1 (MRPC: "equivalent"); 0 when no example is predicted or labelled 1."""
    predicted, gold = predictions == 1, labels == 1
    true_positives = float(np.sum(predicted & gold))
    denominator = float(predicted.sum() + gold.sum())
    return 2 * true_positives / denominator if denominator else 0.0


def matthews(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Matthews correlation (Matthews 1975; for K classes Gorodkin 2004), GLUE's CoLA metric;
    0 when every prediction or every label is one class (as scikit-learn scores it)."""
    classes, codes = np.unique(np.concatenate([labels, predictions]), return_inverse=True)
    gold, predicted = codes[:len(labels)], codes[len(labels):]
    confusion = np.zeros((len(classes), len(classes)))
    np.add.at(confusion, (gold, predicted), 1)
    true_counts, predicted_counts = confusion.sum(1), confusion.sum(0)
    total, correct = confusion.sum(), np.trace(confusion)
    covariance = correct * total - true_counts @ predicted_counts
    spread = (total ** 2 - predicted_counts @ predicted_counts) * (
        total ** 2 - true_counts @ true_counts)
    return float(covariance / np.sqrt(spread)) if spread > 0 else 0.0


def _correlation(function: Callable) -> Callable[[np.ndarray, np.ndarray], float]:
    def correlation(predictions: np.ndarray, labels: np.ndarray) -> float:
        if np.std(predictions) == 0:  # constant predictions: undefined (the caller decides)
            return math.nan
        return float(function(predictions, labels).statistic)
    return correlation


METRICS: dict[str, Metric] = {
    "accuracy": Metric(accuracy, "classification", "Acc"),
    "f1": Metric(f1, "classification", "F1", binary=True),
    "matthews": Metric(matthews, "classification", "MCC", low=-1.0),
    "pearson": Metric(_correlation(stats.pearsonr), "regression", "Corr", low=-1.0),
    # Spearman's rho: Pearson's r of the ranks, tied values taking their mean rank.
    "spearman": Metric(_correlation(stats.spearmanr), "regression",
                       "Spearman Corr", low=-1.0),
}
