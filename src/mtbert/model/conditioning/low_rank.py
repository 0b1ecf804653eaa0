"""Low-rank adapters on the encoder's linear maps, and folding them into the weights.

LoRA (Hu et al. 2022, "LoRA: Low-Rank Adaptation of Large Language Models", ICLR): a linear
map W (out, in) gets a trainable update of rank r, h = W x + (alpha / r) B A x, with A (r, in)
random and B (out, r) zero, so the adapted encoder starts exactly as the plain one. Because
the update is linear it can be folded into the weights, W' = W + (alpha / r) B A, and the
plain encoder with W' computes what the adapted one does: no cost at inference.

`LowRankAdapters` is the base of the two conditioning variants (`lora`, `mtl_lora`): it adds
`delta(task, layer, name, x)` to the targeted projections (`EncoderHooks.projection`) and
says what that is as a weight, `delta_weight(task, layer, name)`, which `fold` adds to a copy
of the encoder.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from mtbert.model.bert import PROJECTIONS, BertConfig, BertModel
from mtbert.model.conditioning.base import TaskConditioning, positive_int


def projection_shapes(config: BertConfig) -> dict[str, tuple[int, int]]:
    """(out, in) of each linear map a layer exposes to the `projection` hook."""
    h, i = config.hidden_size, config.intermediate_size
    return {"qkv": (3 * h, h), "attention_output": (h, h), "intermediate": (i, h),
            "output": (h, i)}


def down_projection(rank: int, size_in: int) -> nn.Parameter:
    """A (r, in) initialised like `nn.Linear`'s weight (Kaiming uniform), as LoRA does."""
    weight = torch.empty(rank, size_in)
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
    return nn.Parameter(weight)


class LowRankAdapters(TaskConditioning):
    """Options shared by the variants: `rank` r, `alpha` (the update is scaled by alpha / r),
    `targets` (which of `PROJECTIONS` get an adapter; default all four)."""

    def __init__(self, bert_config: BertConfig, task_names: list[str], rank: int,
                 alpha: float, targets: Sequence[str] | None):
        super().__init__(task_names)
        self.rank = positive_int("rank", rank)
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha <= 0:
            raise ValueError(f"alpha: expected a positive number, got {alpha!r}")
        self.scale = alpha / self.rank
        self.targets = list(PROJECTIONS) if targets is None else list(targets)
        unknown = sorted(set(self.targets) - set(PROJECTIONS))
        if unknown or not self.targets or len(set(self.targets)) != len(self.targets):
            raise ValueError(f"targets: distinct names among {list(PROJECTIONS)}, got "
                             f"{self.targets}")
        self.layers = bert_config.num_hidden_layers
        self.shapes = {name: projection_shapes(bert_config)[name] for name in self.targets}

    def delta(self, task: str, layer: int, name: str, x: Tensor) -> Tensor:
        """(N, out) update of projection `name` for `task` on its (N, in) input."""
        raise NotImplementedError

    def delta_weight(self, task: str, layer: int, name: str) -> Tensor:
        """The same update as an (out, in) weight: delta(x) == x @ delta_weight.T."""
        raise NotImplementedError

    def projection(self, task: str, layer: int, name: str, x: Tensor, y: Tensor) -> Tensor:
        return y + self.delta(task, layer, name, x) if name in self.shapes else y


@torch.no_grad()
def fold(encoder: BertModel, adapters: LowRankAdapters, task: str) -> BertModel:
    """An encoder without adapters, `task`'s folded in (W + delta_weight): its forward
    without hooks equals `encoder` with `adapters.hooks(task)`, to float rounding. In a
    mixture-of-experts layer the update is every expert's (the hook adapts each of them)."""
    folded = copy.deepcopy(encoder)
    for index, layer in enumerate(folded.layers):
        for name in adapters.shapes:
            delta = adapters.delta_weight(task, index, name)
            for linear in layer.linear_maps(name):  # each expert's, in a mixture of experts
                linear.weight += delta.to(linear.weight.dtype)
    return folded
