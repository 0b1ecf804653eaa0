"""PCGrad: project conflicting per-task gradients of the shared parameters."""

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from mtbert.balancing.base import (
    GradientCombiner,
    TaskContext,
    accumulate_flat_grad,
    per_task_gradients,
    trainable,
)
from mtbert.distributed import mean_across_ranks


def project_conflicting(grads: Tensor, orders: Sequence[Sequence[int]]) -> Tensor:
    """Project each task gradient off the tasks it conflicts with, in the given orders.

    For task i and each j in ``orders[i]`` (j != i): if ``g_i_pc . g_j < 0`` then
    ``g_i_pc -= (g_i_pc . g_j) / ||g_j||^2 * g_j``, always against the ORIGINAL ``g_j``.

    References:
        - Yu et al. 2020, Gradient Surgery for Multi-Task Learning,
          https://arxiv.org/abs/2001.06782 (Algorithm 1)

    Inputs:
        - grads: (T, P) flattened per-task gradients
        - orders: T sequences; ``orders[i]`` lists the other task indices for task i

    Returns:
        Tensor (T, P) of projected gradients.
    """
    projected = grads.clone()  # (T, P)
    # (T,); clamped so a zero gradient (never conflicting) does not divide 0 by 0
    squared_norms = (grads * grads).sum(dim=1).clamp(min=torch.finfo(grads.dtype).tiny)
    for i, order in enumerate(orders):
        for j in order:
            if j == i:
                raise ValueError(f"The projection order of task {i} must not contain itself.")
            dot = (projected[i] @ grads[j]).clamp(max=0)  # (), 0 unless conflicting
            projected[i] -= dot / squared_norms[j] * grads[j]
    return projected


class PCGrad(GradientCombiner):
    """Gradient surgery: conflicting shared-parameter gradients are projected before summing.

    Per-task gradients ``g_i`` are taken w.r.t. the SHARED params only and projected with
    ``project_conflicting`` in a random order per task; their sum is added to the shared
    ``.grad``. Task-specific params (heads, loss-weighting params) get the plain gradient of
    ``sum(terms)``. The auxiliary terms (MNRL, mixture-of-experts losses) are no task: their
    gradient is added to the projected sum unprojected, and to the task-specific params'
    gradient. The order comes from a generator seeded by ``(seed, calls)``, so every DDP
    rank and a resumed run (after ``load_state_dict``) draw the same orders; ``calls`` counts
    ``backward`` calls, micro-batches included. Under DDP each task's gradient is averaged
    over the ranks BEFORE the projection (one all-reduce of the (T, P) matrix, T times the
    traffic of a plain step), so every rank projects the global gradients and writes the
    same result; DDP's own all-reduce is off for these steps (``averages_across_ranks``).

    Args:
        seed: Seed of the projection orders (>= 0).

    References:
        - Yu et al. 2020, Gradient Surgery for Multi-Task Learning,
          https://arxiv.org/abs/2001.06782
        - OptimusBERT report (shared/papers/optimusbert.txt): PCGrad on the shared encoder.
    """

    needs_several_tasks = True
    needs_encoder_gradients = True
    averages_across_ranks = True

    @classmethod
    def from_context(cls, context: TaskContext, **options) -> "PCGrad":
        return cls(**{"seed": context.seed, **options})

    def __init__(self, seed: int):
        if seed < 0:
            raise ValueError(f"PCGrad needs a seed >= 0, got {seed}.")
        self.seed = seed
        self.calls = 0

    def orders(self, num_tasks: int) -> list[list[int]]:
        """Random order of the other tasks for each task, a pure function of (seed, calls)."""
        seed = int(np.random.SeedSequence([self.seed, self.calls]).generate_state(1)[0])
        generator = torch.Generator().manual_seed(seed)
        return [
            [j for j in torch.randperm(num_tasks, generator=generator).tolist() if j != i]
            for i in range(num_tasks)
        ]

    def backward(
        self,
        terms: dict[str, Tensor],
        shared_params: Sequence[nn.Parameter],
        other_params: Sequence[nn.Parameter],
        auxiliary: Tensor | None = None,
    ) -> None:
        if not terms:
            raise ValueError("PCGrad needs at least one term.")
        names = sorted(terms)  # same task order whatever order the caller built the dict in
        rows = [terms[n] for n in names]
        if auxiliary is not None:  # one more row, averaged in the same all-reduce
            rows.append(auxiliary)
        # (T [+ 1], P), the mean over ranks: the gradients of the global batch
        grads = mean_across_ranks(per_task_gradients(
            {str(i): row for i, row in enumerate(rows)}, shared_params))
        projected = project_conflicting(grads[:len(names)], self.orders(len(names)))  # (T, P)
        combined = projected.sum(dim=0)  # (P,)
        if auxiliary is not None:
            combined = combined + grads[-1]
        accumulate_flat_grad(combined, shared_params)
        others = trainable(other_params)
        if others:
            total = torch.stack(rows).sum()  # ()
            torch.autograd.backward(total, inputs=others)
        self.calls += 1

    def state_dict(self) -> dict:
        return {"calls": self.calls}

    def load_state_dict(self, state: dict) -> None:
        self.calls = int(state["calls"])
