"""What a task loss declares for the rest of mtbert.

A task loss is an `nn.Module` `loss(outputs, labels) -> scalar`. Its class also says what the
head's outputs mean, since the loss is what trains them to mean it: how many numbers a head
outputs per example, how they decode into predicted labels or scores, and how they turn into
class probabilities. Heads, evaluation, the API, the report and the exports ask these
classmethods and never branch on a loss's name. The defaults are a regression score.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class TaskLossFunction(nn.Module):
    """Base of the task losses. `task_kind`: the kind of task it trains ("classification" or
    "regression"); `binary`: classification of two classes only (checked by
    `check_techniques` before training)."""

    task_kind = "regression"
    binary = False

    @classmethod
    def outputs_per_example(cls, task) -> int:
        """Numbers the head outputs per example."""
        return 1

    @classmethod
    def decode(cls, task, outputs: Tensor) -> Tensor:
        """Head outputs -> predictions (N,): class indices as floats, or scores in the task's
        label range."""
        low, high = task.label_range
        return outputs.clamp(low, high)

    @classmethod
    def probabilities(cls, task, outputs: Tensor) -> Tensor:
        """Head outputs -> class probabilities (N, C); regression losses have none."""
        raise ValueError(f"{cls.__name__} trains scores, not class probabilities")


class ClassLogitsOutputs(TaskLossFunction):
    """One logit per class: argmax decodes, softmax gives the probabilities."""

    task_kind = "classification"

    @classmethod
    def outputs_per_example(cls, task) -> int:
        return task.num_classes

    @classmethod
    def decode(cls, task, outputs: Tensor) -> Tensor:
        return outputs.argmax(-1).float()

    @classmethod
    def probabilities(cls, task, outputs: Tensor) -> Tensor:
        return outputs.softmax(-1)


class BinaryLogitOutputs(TaskLossFunction):
    """One logit per example for two classes: class 1 when it is positive."""

    task_kind = "classification"
    binary = True

    @classmethod
    def decode(cls, task, outputs: Tensor) -> Tensor:
        return (outputs > 0).float()

    @classmethod
    def probabilities(cls, task, outputs: Tensor) -> Tensor:
        positive = outputs.sigmoid()
        return torch.stack([1 - positive, positive], dim=-1)
