"""MTL-LoRA (Yang et al. 2024, "MTL-LoRA: Low-Rank Adaptation for Multi-Task Learning").

LoRA with the tasks sharing the low-rank space: per layer and targeted projection, one down
projection A (r, in) and `up_projections` up projections B_1..B_n (out, r) are shared by all
tasks; each task has its own transform Lambda_task (r, r) inside the low-rank space and its own
mixing weights w_task (n,) over the up projections:
h = W x + (alpha / r) sum_i softmax(w_task / temperature)_i B_i Lambda_task A x.
Added parameters: L * sum over targets of (r in + n r out + T (r^2 + n)).

B_i start at zero (the encoder is exactly the plain one at initialisation), Lambda_task at the
identity and w_task uniform in [-1/sqrt(n), 1/sqrt(n)], as the authors' code does (Kaiming
uniform of the (T, n) mixing matrix). Random mixes are what tell the B_i apart: from an even
mix every B_i would get the same gradient and the w_task none (the B_i would stay equal, and
part only through rounding noise). A and the B_i are trained by every task: like the
projected variants, they are conditioning parameters, outside PCGrad's shared set.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtbert.model.bert import BertConfig
from mtbert.model.conditioning.base import positive_int
from mtbert.model.conditioning.low_rank import LowRankAdapters, down_projection


class _SharedLowRank(nn.Module):
    def __init__(self, size_out: int, size_in: int, rank: int, up_projections: int):
        super().__init__()
        self.down = down_projection(rank, size_in)  # A (r, in)
        self.up = nn.Parameter(torch.zeros(up_projections, size_out, rank))  # B_i (n, out, r)


class _TaskLowRank(nn.Module):
    def __init__(self, rank: int, up_projections: int):
        super().__init__()
        self.transform = nn.Parameter(torch.eye(rank))  # Lambda_task (r, r)
        bound = 1 / up_projections ** 0.5
        self.mix = nn.Parameter(torch.empty(up_projections).uniform_(-bound, bound))  # w_task


class MultiTaskLoRA(LowRankAdapters):
    def __init__(self, bert_config: BertConfig, task_names: list[str], *, rank: int = 8,
                 alpha: float = 16.0, targets: Sequence[str] | None = None,
                 up_projections: int = 3, temperature: float = 1.0):
        super().__init__(bert_config, task_names, rank, alpha, targets)
        self.up_projections = positive_int("up_projections", up_projections)
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
                or temperature <= 0:
            raise ValueError(f"temperature: expected a positive number, got {temperature!r}")
        self.temperature = temperature
        self.shared = nn.ModuleList(
            nn.ModuleDict({name: _SharedLowRank(*shape, self.rank, self.up_projections)
                           for name, shape in self.shapes.items()})
            for _ in range(self.layers))
        self.tasks = nn.ModuleDict({task: nn.ModuleList(
            nn.ModuleDict({name: _TaskLowRank(self.rank, self.up_projections)
                           for name in self.shapes})
            for _ in range(self.layers)) for task in task_names})

    def _parts(self, task: str, layer: int, name: str) -> tuple[Tensor, Tensor, Tensor]:
        """(A (r, in), Lambda_task (r, r), sum_i weight_i B_i (out, r))."""
        shared, own = self.shared[layer][name], self.tasks[task][layer][name]
        weights = (own.mix / self.temperature).softmax(0)  # (n,)
        # The mix in fp32 under bf16 autocast too: the B_i part only slowly (Adam moves them
        # alike), and in bf16 their difference, hence the w_task's gradient, rounds to zero.
        with torch.autocast(shared.up.device.type, enabled=False):
            up = torch.einsum("n,nor->or", weights, shared.up)
        return shared.down, own.transform, up

    def delta(self, task: str, layer: int, name: str, x: Tensor) -> Tensor:
        down, transform, up = self._parts(task, layer, name)
        low = F.linear(F.linear(x, down), transform)  # (N, r)
        return F.linear(low, up) * self.scale  # (N, out)

    def delta_weight(self, task: str, layer: int, name: str) -> Tensor:
        down, transform, up = self._parts(task, layer, name)
        return self.scale * up @ transform @ down

    def added_parameters(self) -> int:
        r, n, tasks = self.rank, self.up_projections, len(self.task_names)
        return self.layers * sum(r * size_in + n * r * size_out + tasks * (r * r + n)
                                 for size_out, size_in in self.shapes.values())
