"""Fixed loss weights: the plain sum and hand-set per-task weights."""

from collections.abc import Sequence

from torch import Tensor, nn

from mtbert.balancing.base import LossWeighting, TaskContext


class StaticWeighting(LossWeighting):
    """Each task's loss times a fixed, hand-set weight.

    In a config the weights are the tasks' ``weight`` keys (``tasks: [{name: sst, weight:
    2.0}]``); ``weights`` in ``train.weighting_options`` overrides them.

    Args:
        task_names: Names of all tasks.
        weights: One weight per task name, finite and >= 0.

    References:
        - Caruana 1997, Multitask Learning, Machine Learning 28: weighted sum of task losses.
    """

    uses_task_weights = True

    @classmethod
    def from_context(cls, context: TaskContext, **options) -> "StaticWeighting":
        return cls(context.names, **{"weights": context.weights, **options})

    def __init__(self, task_names: Sequence[str], weights: dict[str, float]):
        super().__init__(task_names)
        if set(weights) != set(self.task_names):
            raise ValueError(
                f"Static weights must name exactly the tasks {list(self.task_names)}, "
                f"got {sorted(weights)}."
            )
        if not all(0 <= w < float("inf") for w in weights.values()):
            raise ValueError(f"Static weights must be finite and >= 0, got {weights}.")
        self.task_weights = {name: float(weights[name]) for name in self.task_names}

    def forward(
        self, losses: dict[str, Tensor], last_shared: Sequence[nn.Parameter]
    ) -> dict[str, Tensor]:
        self.check_losses(losses)
        return {name: self.task_weights[name] * loss for name, loss in losses.items()}

    def weights(self) -> dict[str, float]:
        return dict(self.task_weights)


class SumWeighting(StaticWeighting):
    """Unweighted sum of the task losses (every weight 1), the usual multi-task baseline.

    References:
        - Caruana 1997, Multitask Learning, Machine Learning 28.
        - OptimusBERT report (shared/papers/optimusbert.txt): the three losses are added.
    """

    uses_task_weights = False

    @classmethod
    def from_context(cls, context: TaskContext, **options) -> "SumWeighting":
        return cls(context.names, **options)

    def __init__(self, task_names: Sequence[str]):
        super().__init__(task_names, dict.fromkeys(task_names, 1.0))
