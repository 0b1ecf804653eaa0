"""LoRA per task (Hu et al. 2022, "LoRA: Low-Rank Adaptation of Large Language Models").

Each task has its own rank-r update of every targeted projection of every layer:
h = W x + (alpha / r) B_task A_task x (see `low_rank.py`). With the encoder frozen
(`adapt.freeze_encoder`) the tasks share nothing but the frozen weights, and each task's
model is the backbone plus its adapters, which fold into the weights for inference.
Added parameters: T * L * sum over targets of r * (in + out) (T tasks, L layers).

B starts at zero, so at initialisation the encoder is exactly the plain one.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtbert.model.bert import BertConfig
from mtbert.model.conditioning.low_rank import LowRankAdapters, down_projection


class _LowRank(nn.Module):
    """One update B A of an (out, in) map."""

    def __init__(self, size_out: int, size_in: int, rank: int):
        super().__init__()
        self.down = down_projection(rank, size_in)  # A (r, in)
        self.up = nn.Parameter(torch.zeros(size_out, rank))  # B (out, r)


class LoRA(LowRankAdapters):
    def __init__(self, bert_config: BertConfig, task_names: list[str], *, rank: int = 8,
                 alpha: float = 16.0, targets: Sequence[str] | None = None):
        super().__init__(bert_config, task_names, rank, alpha, targets)
        self.adapters = nn.ModuleDict({task: nn.ModuleList(
            nn.ModuleDict({name: _LowRank(*shape, self.rank)
                           for name, shape in self.shapes.items()})
            for _ in range(self.layers)) for task in task_names})

    def delta(self, task: str, layer: int, name: str, x: Tensor) -> Tensor:
        update = self.adapters[task][layer][name]
        return F.linear(F.linear(x, update.down), update.up) * self.scale  # (N, r) -> (N, out)

    def delta_weight(self, task: str, layer: int, name: str) -> Tensor:
        update = self.adapters[task][layer][name]
        return self.scale * update.up @ update.down

    def added_parameters(self) -> int:
        per_layer = sum(self.rank * (size_out + size_in)
                        for size_out, size_in in self.shapes.values())
        return len(self.task_names) * self.layers * per_layer
