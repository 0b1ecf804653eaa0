"""Binary cross-entropy on logits for yes/no tasks."""

import torch.nn.functional as F
from torch import Tensor

from mtbert.losses._shapes import scores_like_labels
from mtbert.losses.base import BinaryLogitOutputs


class BinaryCrossEntropyLoss(BinaryLogitOutputs):
    """Mean binary cross-entropy of a sigmoid over one logit per example.

    Computed with ``binary_cross_entropy_with_logits`` (log-sum-exp form), which is numerically
    stable where sigmoid followed by log is not. Used for paraphrase detection (Quora), as in the
    OptimusBERT report.

    References:
        - OptimusBERT report (shared/papers/optimusbert.txt): binary cross-entropy for paraphrase.

    Inputs:
        - outputs: logits (B,) or (B, 1), float
        - labels: targets (B,), 0/1 (any numeric dtype; cast to the logits' dtype)

    Returns:
        Scalar mean loss.
    """

    def forward(self, outputs: Tensor, labels: Tensor) -> Tensor:
        logits = scores_like_labels(outputs, labels)  # (B,)
        return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))
