"""Loss weightings (losses -> weighted terms) and gradient combiners (terms -> ``.grad``)."""

import inspect
from collections.abc import Sequence

from mtbert.balancing.base import (
    GradientCombiner,
    LossWeighting,
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


def _checked_options(kind: str, name: str, cls: type, *args, **options) -> None:
    """Raise ValueError when ``cls(*args, **options)`` would not bind (missing/unknown option)."""
    try:
        inspect.signature(cls).bind(*args, **options)
    except TypeError as error:
        raise ValueError(f"Bad options {options} for {kind} {name!r}: {error}.") from None


def build_weighting(
    name: str, task_names: Sequence[str], task_kinds: dict[str, str], **options
) -> LossWeighting:
    """Instantiate the weighting ``name``; ``task_kinds`` is passed only to those that use it."""
    if name not in WEIGHTINGS:
        raise ValueError(
            f"Unknown loss weighting {name!r}; known weightings: {', '.join(sorted(WEIGHTINGS))}."
        )
    cls = WEIGHTINGS[name]
    if cls is UncertaintyWeighting:
        options["task_kinds"] = task_kinds
    _checked_options("loss weighting", name, cls, task_names, **options)
    return cls(task_names, **options)


def build_combiner(name: str, seed: int, **options) -> GradientCombiner:
    """Instantiate the gradient combiner ``name``; ``seed`` is passed only to those that use it."""
    if name not in COMBINERS:
        raise ValueError(
            f"Unknown gradient combiner {name!r}; known combiners: {', '.join(sorted(COMBINERS))}."
        )
    cls = COMBINERS[name]
    if cls is PCGrad:
        options["seed"] = seed
    _checked_options("gradient combiner", name, cls, **options)
    return cls(**options)


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
    "UncertaintyWeighting",
    "accumulate_flat_grad",
    "build_combiner",
    "build_weighting",
    "per_task_gradients",
    "project_conflicting",
]
