"""Auxiliary loss terms: regularisers that train beside the tasks' losses.

An auxiliary term is a named scalar and its weight (MNRL on a pair task's embeddings, the
mixture-of-experts balance and z-losses, ...). It is not a task's loss: the loss weightings
(`balancing/`) and teacher annealing (`distillation.py`) see the tasks' own losses only, and
the trainer adds `weight * value` of every auxiliary term after them. PCGrad adds the terms'
gradient to its projected sum without projecting it (docs/architecture.md says which terms
each technique sees).

Three places make them: the model's forward pass (layers add to the pass's `SideOutputs`,
which the pass returns: nothing is kept on a module), a task's auxiliary losses (`losses/`,
`AuxiliaryLoss` subclasses registered in `losses.AUXILIARY_LOSSES`), which read the head's
output, and the regularisers of `train.regularizers` (`regularizers/`: SMART), which run
forward passes of their own. This module imports nothing of mtbert.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn


@dataclass
class AuxiliaryTerm:
    """`weight * value` joins the final loss; `value` (a scalar with its graph) is logged."""

    value: Tensor
    weight: float

    def weighted(self) -> Tensor:
        return self.weight * self.value.float()


def total(terms: Iterable[AuxiliaryTerm]) -> Tensor | None:
    """The sum of the terms' weighted values; None when there are none."""
    weighted = [term.weighted() for term in terms]
    return sum(weighted[1:], weighted[0]) if weighted else None


@dataclass
class SideOutputs:
    """What one forward pass yields beside its hidden states: auxiliary terms and statistics
    to log (detached tensors). Made for one pass and handed down its layers, which add to it;
    the pass returns it, so no module keeps a graph between passes."""

    auxiliary: dict[str, AuxiliaryTerm] = field(default_factory=dict)
    statistics: dict[str, Tensor] = field(default_factory=dict)

    def add(self, name: str, value: Tensor, weight: float) -> None:
        """Add a term; terms of one name (one per layer) sum, under their common weight."""
        if name not in self.auxiliary:
            self.auxiliary[name] = AuxiliaryTerm(value, weight)
            return
        term = self.auxiliary[name]
        if term.weight != weight:
            raise ValueError(f"auxiliary term {name!r} has weights {term.weight} and {weight}")
        term.value = term.value + value

    def logged_statistics(self) -> dict[str, float]:
        """Statistics as plain numbers (one transfer for all); a vector `s` gives `s.0`,
        `s.1`, ..."""
        if not self.statistics:
            return {}
        values = iter(torch.cat([s.detach().float().reshape(-1)
                                 for s in self.statistics.values()]).tolist())
        logged = {}
        for name, tensor in self.statistics.items():
            if tensor.dim() == 0:
                logged[name] = next(values)
            else:
                logged.update({f"{name}.{i}": next(values) for i in range(tensor.numel())})
        return logged


class AuxiliaryLoss(nn.Module):
    """A task's auxiliary term computed from its head's output (`model.heads.HeadOutput`),
    labels and the schedule epoch: one file, registered in `losses.AUXILIARY_LOSSES`.

    `from_task(task)` builds it from the task's config, or returns None where the task does
    not use it; `weight` multiplies its value in the final loss.
    """

    weight: float = 1.0

    @classmethod
    def from_task(cls, task) -> AuxiliaryLoss | None:
        raise NotImplementedError

    def forward(self, output, labels: Tensor, epoch: int) -> Tensor:
        """The term's value, a scalar with its graph."""
        raise NotImplementedError
