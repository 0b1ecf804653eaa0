"""Task losses: pure functions of head outputs and labels, looked up by name."""

import inspect

from torch import nn

from mtbert.losses.bce import BinaryCrossEntropyLoss
from mtbert.losses.cross_entropy import CrossEntropyLoss
from mtbert.losses.huber import HuberLoss
from mtbert.losses.mnrl import (
    POSITIVE_RULES,
    CosineThresholdPositives,
    LabelThresholdPositives,
    MultipleNegativesRankingLoss,
    ThresholdPositives,
    select_positive_pairs,
    selected_pairs_mnrl,
)
from mtbert.losses.mse import MSELoss

LOSSES: dict[str, type[nn.Module]] = {
    "cross_entropy": CrossEntropyLoss,
    "bce": BinaryCrossEntropyLoss,
    "mse": MSELoss,
    "huber": HuberLoss,
}  # MNRL is an auxiliary loss on a pair task's embeddings: configured by a task's `mnrl:`


def build_loss(name: str, **kwargs) -> nn.Module:
    """Instantiate the loss registered as ``name`` with ``kwargs`` (e.g. ``delta`` for huber)."""
    if name not in LOSSES:
        raise ValueError(f"Unknown loss {name!r}; known losses: {', '.join(sorted(LOSSES))}.")
    cls = LOSSES[name]
    try:
        inspect.signature(cls).bind(**kwargs)
    except TypeError as error:
        raise ValueError(f"Bad options {kwargs} for loss {name!r}: {error}.") from None
    return cls(**kwargs)


__all__ = [
    "LOSSES",
    "POSITIVE_RULES",
    "BinaryCrossEntropyLoss",
    "CosineThresholdPositives",
    "CrossEntropyLoss",
    "HuberLoss",
    "LabelThresholdPositives",
    "MSELoss",
    "MultipleNegativesRankingLoss",
    "ThresholdPositives",
    "build_loss",
    "select_positive_pairs",
    "selected_pairs_mnrl",
]
