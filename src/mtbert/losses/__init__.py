"""Task losses: pure functions of head outputs and labels, looked up by name.

Each task loss subclasses `TaskLossFunction` (`losses/base.py`) and so declares what the head's
outputs mean: how many per example, how they decode, their class probabilities. The rest of
mtbert asks `loss_class(task)`; a new loss is a file plus `mtbert.register("loss", ...)`.
"""

import inspect

from torch import nn

from mtbert.losses.base import BinaryLogitOutputs, ClassLogitsOutputs, TaskLossFunction
from mtbert.losses.bce import BinaryCrossEntropyLoss
from mtbert.losses.cross_entropy import CrossEntropyLoss
from mtbert.losses.huber import HuberLoss
from mtbert.losses.mnrl import (
    POSITIVE_RULES,
    AuxiliaryMnrl,
    CosineThresholdPositives,
    LabelThresholdPositives,
    MultipleNegativesRankingLoss,
    ThresholdPositives,
    select_positive_pairs,
    selected_pairs_mnrl,
)
from mtbert.losses.mse import MSELoss
from mtbert.registry import Registry

LOSSES = Registry("loss", plural="losses", entries={
    "cross_entropy": CrossEntropyLoss,
    "bce": BinaryCrossEntropyLoss,
    "mse": MSELoss,
    "huber": HuberLoss,
})

# Auxiliary terms a task's config may switch on (`auxiliary.AuxiliaryLoss`): each class builds
# itself from the task (`from_task`, None where unused); the name is what is logged.
AUXILIARY_LOSSES = Registry("auxiliary_loss", plural="auxiliary_losses", entries={
    "mnrl": AuxiliaryMnrl,  # MNRL on a pair task's embeddings, a task's `mnrl:`
})


# The loss of a task that names none, by task kind.
DEFAULT_LOSSES = {"classification": "cross_entropy", "regression": "mse"}


def loss_name(task) -> str:
    return task.loss or DEFAULT_LOSSES[task.kind]


def loss_class(task) -> type[TaskLossFunction]:
    """The registered class of the task's loss: what its head's outputs mean."""
    return LOSSES[loss_name(task)]


def output_size(task) -> int:
    """Numbers a head outputs per example for `task`."""
    return loss_class(task).outputs_per_example(task)


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
    "DEFAULT_LOSSES",
    "LOSSES",
    "POSITIVE_RULES",
    "AUXILIARY_LOSSES",
    "TaskLossFunction",
    "BinaryCrossEntropyLoss",
    "BinaryLogitOutputs",
    "ClassLogitsOutputs",
    "CosineThresholdPositives",
    "CrossEntropyLoss",
    "HuberLoss",
    "LabelThresholdPositives",
    "MSELoss",
    "MultipleNegativesRankingLoss",
    "ThresholdPositives",
    "build_loss",
    "loss_class",
    "loss_name",
    "output_size",
    "select_positive_pairs",
    "selected_pairs_mnrl",
]
