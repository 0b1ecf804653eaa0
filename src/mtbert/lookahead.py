"""Inter-task affinity from look-ahead steps: TAG (Fifty et al. 2021, "Efficiently Identifying
Task Groupings for Multi-Task Learning").

With `train.affinity_every: N`, every N-th optimizer step the trainer passes the step's
batches (one per task: the sampler must draw every task) to `lookahead_affinity`. For each
task i the shared encoder alone takes a plain gradient step on i's loss,
theta_i = theta - lr * grad_theta L_i(theta), heads and conditioning unchanged, and every
task j's loss on the same batch of j is compared before and after:

    Z_{i->j} = 1 - L_j(theta_i) / L_j(theta)

Z > 0: a step on task i lowers task j's loss. The trainer sums Z over the measured steps
(`TrainState.affinity`) and logs the mean in each `metrics.jsonl` record (`"affinity":
{i: {j: Z}}`). TAG steps with the training learning rate; here `lr` is the configured
`train.lr`, not the scheduled one (warm-up starts at 0, where every Z would be 0), so every
measured step has the same step size. The losses are computed without dropout (the ratio
measures the step, not two dropout draws, and the training random stream is not touched, so
a run trains exactly as without the measurement) and in fp32, outside autocast (a step of
lr 1e-5 changes a loss by far less than bf16 resolves). Each parameter vector theta_i is
built by `torch.func.functional_call`: no copy of the model per task, nothing written into
the model's weights.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.func import functional_call

from mtbert.data.batching import Batch
from mtbert.distributed import reduce_values
from mtbert.evaluation import evaluating
from mtbert.model.heads import HeadOutput
from mtbert.model.multitask import MultitaskModel

LossOf = Callable[[str, HeadOutput, Batch], Tensor]
Affinity = dict[str, dict[str, float]]  # source -> target -> Z


def lookahead_affinity(model: MultitaskModel, batches: dict[str, Batch], loss_of: LossOf,
                       lr: float) -> Affinity:
    """{i: {j: Z_{i->j}}} over the tasks of `batches` (Z_{i->i} included); `loss_of(task,
    output, batch)` is the task's training loss."""
    shared = {id(p) for p in model.shared_parameters()}
    named = [(name, p) for name, p in model.named_parameters() if id(p) in shared]
    params = [p for _, p in named]
    affinity: Affinity = {}
    with evaluating(model), torch.autocast(params[0].device.type, enabled=False):
        before = {task: loss_of(task, model(task, batch), batch)
                  for task, batch in batches.items()}
        for source in batches:
            grads = torch.autograd.grad(before[source], params, retain_graph=True,
                                        allow_unused=True)
            with torch.no_grad():
                stepped = {name: p if g is None else p - lr * g
                           for (name, p), g in zip(named, grads)}
                affinity[source] = {
                    target: 1.0 - loss_of(target, functional_call(model, stepped, (target, batch)),
                                          batch).item() / before[target].item()
                    for target, batch in batches.items()}
    return affinity


def mean_over_ranks(affinity: Affinity) -> Affinity:
    """Under DDP each rank measures on its own slice of the step's batches: the mean of all."""
    flat = reduce_values({f"{source}\t{target}": value for source, row in affinity.items()
                          for target, value in row.items()})
    mean: Affinity = {}
    for key, value in flat.items():
        source, target = key.split("\t")
        mean.setdefault(source, {})[target] = value
    return mean


def add_affinity(sums: Affinity, measured: Affinity) -> None:
    """Add one measurement into running sums, in place."""
    for source, row in measured.items():
        for target, value in row.items():
            sums.setdefault(source, {})[target] = sums.get(source, {}).get(target, 0.0) + value


def mean_affinity(sums: Affinity, steps: int) -> Affinity:
    return {source: {target: value / steps for target, value in row.items()}
            for source, row in sums.items()}
