"""Loss weightings (losses -> weighted terms) and gradient combiners (terms -> ``.grad``)."""

from mtbert.balancing.base import (
    GradientCombiner,
    LossWeighting,
    TaskContext,
    accumulate_flat_grad,
    per_task_gradients,
)
from mtbert.balancing.dwa import DynamicWeightAverage
from mtbert.balancing.gradnorm import GradNormWeighting
from mtbert.balancing.pcgrad import PCGrad, project_conflicting
from mtbert.balancing.static import StaticWeighting, SumWeighting
from mtbert.balancing.summed import SumGradients
from mtbert.balancing.uncertainty import UncertaintyWeighting

WEIGHTINGS: dict[str, type[LossWeighting]] = {
    "sum": SumWeighting,
    "static": StaticWeighting,
    "uncertainty": UncertaintyWeighting,
    "gradnorm": GradNormWeighting,
    "dwa": DynamicWeightAverage,
}

COMBINERS: dict[str, type[GradientCombiner]] = {
    "sum": SumGradients,
    "pcgrad": PCGrad,
}


def build_weighting(name: str, context: TaskContext, **options) -> LossWeighting:
    """Instantiate the weighting registered as ``name`` for the run's tasks."""
    return _build(WEIGHTINGS, "loss weighting", name, context, options)


def build_combiner(name: str, context: TaskContext, **options) -> GradientCombiner:
    """Instantiate the gradient combiner registered as ``name``."""
    return _build(COMBINERS, "gradient combiner", name, context, options)


def _build(registry: dict, kind: str, name: str, context: TaskContext, options: dict):
    if name not in registry:
        raise ValueError(f"Unknown {kind} {name!r}; known: {', '.join(sorted(registry))}.")
    try:
        return registry[name].from_context(context, **options)
    except TypeError as error:  # an unknown, missing or repeated option
        raise ValueError(f"Bad options {options} for {kind} {name!r}: {error}.") from None


__all__ = [
    "COMBINERS",
    "WEIGHTINGS",
    "DynamicWeightAverage",
    "GradNormWeighting",
    "GradientCombiner",
    "LossWeighting",
    "PCGrad",
    "StaticWeighting",
    "SumGradients",
    "SumWeighting",
    "TaskContext",
    "UncertaintyWeighting",
    "accumulate_flat_grad",
    "build_combiner",
    "build_weighting",
    "per_task_gradients",
    "project_conflicting",
]
