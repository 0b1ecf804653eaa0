"""Averages of a model's weights along training (`train.weight_average`): what is evaluated,
kept as `best/` and exported, while the optimizer goes on with the raw weights.

- `ema`: an exponential moving average, debiased like Adam's moments (Kingma & Ba 2015), so
  the weights it starts from do not linger: after n updates it is
  sum_i decay^(n-i) (1 - decay) theta_i / (1 - decay^n).
- `swa`: stochastic weight averaging (Izmailov et al. 2018), the plain mean of the weights
  after every step from `start` on.

Both are `average += rate(n) * (theta - average)` at the n-th update, with rate
(1 - decay) / (1 - decay^n) or 1 / n. The SMART regulariser's proximal mentor is such an
average too (`regularizers/smart.py`).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from mtbert.registry import Registry


class WeightAverage:
    """A running average of `model`'s trainable parameters, starting from their current
    values; `update(model)` after each optimizer step folds the new weights in."""

    def __init__(self, model: nn.Module):
        self.averaged = {name: p.detach().clone() for name, p in model.named_parameters()
                         if p.requires_grad}
        self.updates = 0

    def rate(self, n: int) -> float:
        """How far the n-th update (1-based) moves the average towards the weights."""
        raise NotImplementedError

    @staticmethod
    def check(**options) -> None:
        """Raise `ValueError` ("OPTION: why") if the options leave the average unable to act."""

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        params = dict(model.named_parameters())
        names = list(self.averaged)
        torch._foreach_lerp_([self.averaged[n] for n in names], [params[n] for n in names],
                             self.rate(self.updates))

    @contextlib.contextmanager
    def swapped_in(self, model: nn.Module) -> Iterator[None]:
        """`model` holds the average inside the block (the raw weights before any update)."""
        if not self.updates:
            yield
            return
        params = dict(model.named_parameters())
        raw = {name: params[name].detach().clone() for name in self.averaged}
        with torch.no_grad():
            for name, value in self.averaged.items():
                params[name].copy_(value)
        try:
            yield
        finally:
            with torch.no_grad():
                for name, value in raw.items():
                    params[name].copy_(value)

    def state_dict(self) -> dict[str, Tensor]:
        return {"updates": torch.tensor(self.updates),
                **{f"averaged.{name}": value for name, value in self.averaged.items()}}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.updates = int(state["updates"])
        for name, value in self.averaged.items():
            value.copy_(state[f"averaged.{name}"])


class ExponentialAverage(WeightAverage):
    """EMA of the weights with `decay` per step, debiased."""

    def __init__(self, model: nn.Module, decay: float = 0.999):
        super().__init__(model)
        self.decay = decay

    def rate(self, n: int) -> float:
        return (1 - self.decay) / (1 - self.decay ** n)

    @staticmethod
    def check(decay: float) -> None:
        if not 0 < decay < 1:
            raise ValueError(f"decay: must be in (0, 1), got {decay}")


class StochasticAverage(WeightAverage):
    """SWA: the mean of every update's weights."""

    def rate(self, n: int) -> float:
        return 1 / n


AVERAGES = Registry("weight_average", {
    "ema": ExponentialAverage,
    "swa": StochasticAverage,
})


class TrainingAverage:
    """`train.weight_average` in a run of `total_steps` optimizer steps: the average takes in
    the weights after each good step beyond the first `start` share of the run."""

    def __init__(self, average: WeightAverage, start: float, total_steps: int):
        self.average = average
        self.first_step = math.floor(start * total_steps) + 1  # 1-based, <= total_steps

    def after_optimizer_step(self, model: nn.Module, steps_taken: int) -> None:
        if steps_taken >= self.first_step:
            self.average.update(model)


def build_weight_average(config, model: nn.Module, total_steps: int) -> TrainingAverage | None:
    """The run's weight average (`config`: a `WeightAverageConfig` or None)."""
    if config is None:
        return None
    options = {} if config.decay is None else {"decay": config.decay}
    return TrainingAverage(AVERAGES[config.method](model, **options), config.start, total_steps)
