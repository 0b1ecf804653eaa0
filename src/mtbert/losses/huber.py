"""Huber (smooth L1) loss for regression tasks."""

import torch.nn.functional as F
from torch import Tensor

from mtbert.losses._shapes import scores_like_labels
from mtbert.losses.base import TaskLossFunction


class HuberLoss(TaskLossFunction):
    """Huber loss: quadratic for errors up to ``delta``, linear beyond, so outliers pull less.

    Per example: ``0.5 * e**2`` if ``|e| <= delta`` else ``delta * (|e| - 0.5 * delta)``, with
    ``e = prediction - label``. The OptimusBERT report uses it for semantic similarity (STS).

    Args:
        delta: Error size where the loss turns from quadratic to linear (> 0).

    References:
        - Huber 1964, Robust Estimation of a Location Parameter, Ann. Math. Statist. 35(1).
        - OptimusBERT report (shared/papers/optimusbert.txt): Huber loss for STS.

    Inputs:
        - outputs: predictions (B,) or (B, 1), float
        - labels: targets (B,), float

    Returns:
        Scalar mean loss.
    """

    def __init__(self, delta: float = 1.0):
        super().__init__()
        if delta <= 0:
            raise ValueError(f"HuberLoss needs delta > 0, got {delta}.")
        self.delta = delta

    def forward(self, outputs: Tensor, labels: Tensor) -> Tensor:
        predictions = scores_like_labels(outputs, labels)  # (B,)
        return F.huber_loss(predictions, labels.to(predictions.dtype), delta=self.delta)
