"""Softmax cross-entropy for single-label classification."""

import torch.nn.functional as F
from torch import Tensor

from mtbert.losses.base import ClassLogitsOutputs


class CrossEntropyLoss(ClassLogitsOutputs):
    """Mean softmax cross-entropy between class logits and integer labels.

    Used for the five-way sentiment task (SST), as in the OptimusBERT report.

    References:
        - OptimusBERT report (shared/papers/optimusbert.txt): cross-entropy for SST.

    Inputs:
        - outputs: logits (B, C), float
        - labels: class indices (B,) in [0, C), any numeric dtype (cast to int64)

    Returns:
        Scalar mean loss.
    """

    def forward(self, outputs: Tensor, labels: Tensor) -> Tensor:
        if outputs.dim() != 2 or labels.dim() != 1 or outputs.shape[0] != labels.shape[0]:
            raise ValueError(
                "Expected logits of shape (B, C) and labels of shape (B,), "
                f"got {tuple(outputs.shape)} and {tuple(labels.shape)}."
            )
        return F.cross_entropy(outputs, labels.long())
