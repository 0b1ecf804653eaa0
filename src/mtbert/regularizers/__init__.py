"""Regularisers: auxiliary terms of the training loss (`train.regularizers`), looked up by name.

A regulariser is built as `cls(model, **options)` and is called as
`regularizer(model, task, batch, output) -> Tensor`: an unweighted scalar term for one task's
batch, given the model's output on it. It is not part of the task's loss: the trainer adds
`weight * term` after the loss weighting and distillation, so neither rescales nor switches it
off. `after_optimizer_step(model)` follows every good optimizer step; `state_dict()` holds
what a resumed run needs (tensors). `check(**options)` raises `ValueError` naming an option
that cannot act; the config checks call it when the config is read.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor, nn

from mtbert.auxiliary import AuxiliaryTerm
from mtbert.registry import Registry
from mtbert.regularizers.base import Regularizer
from mtbert.regularizers.smart import BregmanProximal, SmoothnessRegularizer

if TYPE_CHECKING:
    from mtbert.config import RegularizerConfig, TaskConfig
    from mtbert.data.batching import Batch
    from mtbert.model.heads import HeadOutput

REGULARIZERS = Registry("regularizer", {
    "smart": SmoothnessRegularizer,
    "smart_proximal": BregmanProximal,
})


class Regularizers:
    """The run's regularisers: each task's terms with their weights, by the regularisers'
    names."""

    def __init__(self, configs: list[RegularizerConfig], model: nn.Module):
        self.parts = [(c.name, c.weight, REGULARIZERS[c.name](model, **c.options))
                      for c in configs]

    def __call__(self, model: nn.Module, task: TaskConfig, batch: Batch,
                 output: HeadOutput) -> dict[str, AuxiliaryTerm]:
        return {name: AuxiliaryTerm(regularizer(model, task, batch, output), weight)
                for name, weight, regularizer in self.parts}

    def after_optimizer_step(self, model: nn.Module) -> None:
        for _, _, regularizer in self.parts:
            regularizer.after_optimizer_step(model)

    def state_dict(self) -> dict[str, Tensor]:
        return {f"{index}.{key}": value for index, (_, _, regularizer) in enumerate(self.parts)
                for key, value in regularizer.state_dict().items()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        for index, (_, _, regularizer) in enumerate(self.parts):
            prefix = f"{index}."
            regularizer.load_state_dict({k.removeprefix(prefix): v for k, v in state.items()
                                         if k.startswith(prefix)})


__all__ = ["REGULARIZERS", "BregmanProximal", "Regularizer", "Regularizers",
           "SmoothnessRegularizer"]
