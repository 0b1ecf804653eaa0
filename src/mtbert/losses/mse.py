"""Mean squared error for regression tasks."""

import torch.nn.functional as F
from torch import Tensor

from mtbert.losses._shapes import scores_like_labels
from mtbert.losses.base import TaskLossFunction


class MSELoss(TaskLossFunction):
    """Mean squared error between predicted scores and float labels.

    The Gaussian-likelihood loss that the regression form of uncertainty weighting assumes
    (Kendall et al. 2018); the usual choice for semantic similarity (STS) scores.

    References:
        - Kendall, Gal & Cipolla 2018, Multi-Task Learning Using Uncertainty to Weigh Losses for
          Scene Geometry and Semantics, https://arxiv.org/abs/1705.07115

    Inputs:
        - outputs: predictions (B,) or (B, 1), float
        - labels: targets (B,), float

    Returns:
        Scalar mean loss.
    """

    def forward(self, outputs: Tensor, labels: Tensor) -> Tensor:
        predictions = scores_like_labels(outputs, labels)  # (B,)
        return F.mse_loss(predictions, labels.to(predictions.dtype))
