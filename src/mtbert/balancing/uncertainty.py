"""Homoscedastic uncertainty weighting with one learned log-variance per task."""

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from mtbert.balancing.base import LossWeighting, TaskContext

TASK_KINDS = ("classification", "regression")


class UncertaintyWeighting(LossWeighting):
    """Weights each loss by a learned task uncertainty (homoscedastic, task-dependent noise).

    With ``s = log sigma^2`` (a parameter per task, initialised to 0) the term of a task is

    - regression (Gaussian likelihood):   ``0.5 * exp(-s) * L + 0.5 * s``
    - classification (scaled softmax):    ``exp(-s) * L + 0.5 * s``

    so ``d term / d s = -c * exp(-s) * L + 0.5`` with ``c`` = 0.5 or 1: the learned variance
    grows with the task's loss, down-weighting noisy tasks, and ``0.5 * s`` (``log sigma``)
    keeps it from growing without bound. At initialisation the weights are 0.5 (regression)
    and 1 (classification). ``log_vars`` must be trained by the optimizer and be part of the
    combiner's ``other_params``. Under DDP the trainer averages their gradients over the
    ranks, so they stay the same on every rank.

    Args:
        task_names: Names of all tasks.
        task_kinds: ``"classification"`` or ``"regression"`` for every task name.

    References:
        - Kendall, Gal & Cipolla 2018, Multi-Task Learning Using Uncertainty to Weigh Losses for
          Scene Geometry and Semantics, https://arxiv.org/abs/1705.07115
        - OptimusBERT report (shared/papers/optimusbert.txt): homoscedastic loss weighting.
    """

    @classmethod
    def from_context(cls, context: TaskContext, **options) -> "UncertaintyWeighting":
        return cls(context.names, context.kinds, **options)

    def __init__(self, task_names: Sequence[str], task_kinds: dict[str, str]):
        super().__init__(task_names)
        missing = [name for name in self.task_names if name not in task_kinds]
        if missing:
            raise ValueError(f"UncertaintyWeighting needs a task kind for {missing}.")
        bad = {n: task_kinds[n] for n in self.task_names if task_kinds[n] not in TASK_KINDS}
        if bad:
            raise ValueError(f"Task kinds must be one of {TASK_KINDS}, got {bad}.")
        self.task_kinds = {name: task_kinds[name] for name in self.task_names}
        self.log_vars = nn.Parameter(torch.zeros(len(self.task_names)))  # (T,)
        # c per task: 0.5 for regression, 1 for classification
        self.register_buffer(
            "loss_factors",
            torch.tensor([0.5 if self.task_kinds[n] == "regression" else 1.0 for n in task_names]),
        )  # (T,)

    def forward(
        self, losses: dict[str, Tensor], last_shared: Sequence[nn.Parameter]
    ) -> dict[str, Tensor]:
        self.check_losses(losses)
        terms = {}
        for name, loss in losses.items():
            i = self.task_names.index(name)
            s = self.log_vars[i]
            terms[name] = self.loss_factors[i] * torch.exp(-s) * loss + 0.5 * s
        return terms

    def weights(self) -> dict[str, float]:
        values = (self.loss_factors * torch.exp(-self.log_vars.detach())).tolist()
        return dict(zip(self.task_names, values, strict=True))
