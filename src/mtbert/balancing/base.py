"""Interfaces for loss weighting and gradient combination, and the per-task gradient helpers.

Split as in LibMTL: a ``LossWeighting`` turns per-task losses into weighted per-task terms, a
``GradientCombiner`` turns those terms into ``.grad`` on the parameters.

References:
    - Lin & Zhang 2023, LibMTL: A Python Library for Multi-Task Learning,
      https://arxiv.org/abs/2203.14338
"""

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class TaskContext:
    """What a weighting or combiner may know of the run: every builder gets this one object.

    names: the task names, in order; kinds: "classification" or "regression" per task;
    weights: each task's `weight` key (read by weightings that declare `uses_task_weights`);
    seed: the run's seed.
    """

    names: tuple[str, ...]
    kinds: dict[str, str] = field(default_factory=dict)
    weights: dict[str, float] = field(default_factory=dict)
    seed: int = 0


def trainable(params: Sequence[nn.Parameter]) -> list[nn.Parameter]:
    """The parameters that require grad, in order: the layout of every flat gradient vector."""
    return [p for p in params if p.requires_grad]


def per_task_gradients(terms: dict[str, Tensor], shared_params: Sequence[nn.Parameter]) -> Tensor:
    """Flattened gradient of each term w.r.t. the trainable shared params, rows in ``terms`` order.

    One ``torch.autograd.grad`` call per term with ``retain_graph=True``, so the graph survives
    for later backward passes; parameters a term does not reach get zeros. Only the gradient
    vectors are stored, never a copy of the model.

    Returns:
        Tensor (T, P): T terms, P = total number of trainable shared parameter elements.
    """
    params = trainable(shared_params)
    rows = []
    for term in terms.values():
        grads = torch.autograd.grad(term, params, retain_graph=True, allow_unused=True)
        rows.append(
            torch.cat(
                [
                    (torch.zeros_like(p) if g is None else g).reshape(-1)
                    for g, p in zip(grads, params, strict=True)
                ]
            )
        )  # (P,)
    return torch.stack(rows)  # (T, P)


def accumulate_flat_grad(flat: Tensor, params: Sequence[nn.Parameter]) -> None:
    """Add (+=) the flat vector (P,) into ``.grad`` of the trainable ``params``, in order."""
    offset = 0
    for p in trainable(params):
        piece = flat[offset : offset + p.numel()].view_as(p)
        offset += p.numel()
        if p.grad is None:
            p.grad = piece.clone()
        else:
            p.grad.add_(piece)
    if offset != flat.numel():
        raise ValueError(
            f"The flat gradient has {flat.numel()} elements but the parameters have {offset}."
        )


class LossWeighting(nn.Module):
    """Turns per-task losses into the per-task terms whose sum is the objective.

    The losses are the tasks' own (after distillation); auxiliary terms (MNRL,
    mixture-of-experts losses, ``mtbert.auxiliary``) never reach a weighting: the trainer
    hands them to the combiner beside the terms, unweighted.

    ``forward`` accepts any non-empty subset of the tasks (samplers that draw one task per step
    give one loss); methods that need every task say so. Learned weights are parameters of this
    module: give them to the optimizer and list them as ``other_params`` of the combiner.

    Requirements, declared for the config checks (nothing outside this file names a method):
    ``needs_every_task``: the method needs every task's loss at every step (a sampler that
    draws all tasks); ``acts_from_epoch``: the first epoch (1-based) in which the weights can
    differ from the plain sum, so a shorter run is an error; ``uses_task_weights``: reads the
    tasks' ``weight`` keys (every other weighting rejects weights other than 1);
    ``needs_encoder_gradients``: the method reads gradients of the shared encoder, so it
    cannot act with the encoder frozen (``adapt.freeze_encoder``); ``needs_several_tasks``:
    its weights only move relative to other tasks' (they are renormalised to sum to the number
    of tasks), so with one task it is the plain sum.

    Args:
        task_names: Names of all tasks, unique; the order of ``weights()``.
    """

    needs_every_task = False
    needs_several_tasks = False
    acts_from_epoch = 1
    uses_task_weights = False
    needs_encoder_gradients = False

    @classmethod
    def from_context(cls, context: TaskContext, **options) -> "LossWeighting":
        """Build from the run's tasks; methods that need more of the context override this."""
        return cls(context.names, **options)

    def __init__(self, task_names: Sequence[str]):
        super().__init__()
        if len(task_names) == 0:
            raise ValueError("A loss weighting needs at least one task.")
        if len(set(task_names)) != len(task_names):
            raise ValueError(f"Task names must be unique, got {list(task_names)}.")
        self.task_names = tuple(task_names)

    def check_losses(self, losses: dict[str, Tensor]) -> None:
        """Raise ValueError unless ``losses`` is a non-empty dict over known task names."""
        unknown = set(losses) - set(self.task_names)
        if not losses or unknown:
            raise ValueError(
                f"Expected losses for a non-empty subset of {list(self.task_names)}, "
                f"got {sorted(losses)}."
            )

    def forward(
        self, losses: dict[str, Tensor], last_shared: Sequence[nn.Parameter]
    ) -> dict[str, Tensor]:
        """Weighted terms (same keys as ``losses``).

        ``last_shared`` is the last shared layer's parameters, used only by methods that look at
        gradient norms (GradNorm); such methods may set ``.grad`` on their own parameters.
        """
        raise NotImplementedError

    def weights(self) -> dict[str, float]:
        """Current weight of every task, for logging."""
        raise NotImplementedError

    def on_epoch_end(self) -> None:
        """Hook called once after each epoch (no-op by default)."""

    def after_optimizer_step(self) -> None:
        """Hook called after each optimizer step (no-op by default)."""

    def after_skipped_step(self) -> None:
        """Hook called instead of ``after_optimizer_step`` when the step was skipped for
        NaN/inf losses or gradients: forget what ``forward`` saw in it (no-op by default)."""


class GradientCombiner:
    """Turns per-task terms into gradients on the parameters.

    Only ``shared_params`` and ``other_params`` receive gradients (the weighting's own
    parameters, e.g. uncertainty log-variances, belong in ``other_params``).
    ``needs_several_tasks``: the combiner only differs from the plain sum when a step holds
    several tasks; ``needs_encoder_gradients``: it acts on the shared encoder's gradients
    (both declared for the config checks). ``averages_across_ranks``: under DDP,
    ``backward`` averages the shared parameters' gradients over the ranks itself, so the
    trainer keeps DDP's own all-reduce out of its backward pass and averages the other
    parameters' gradients afterwards.
    """

    needs_several_tasks = False
    needs_encoder_gradients = False
    averages_across_ranks = False

    @classmethod
    def from_context(cls, context: TaskContext, **options) -> "GradientCombiner":
        return cls(**options)

    def backward(
        self,
        terms: dict[str, Tensor],
        shared_params: Sequence[nn.Parameter],
        other_params: Sequence[nn.Parameter],
        auxiliary: Tensor | None = None,
    ) -> None:
        """ACCUMULATE (+=) into ``.grad``; never zeroes it, so gradient accumulation works.

        ``auxiliary`` is the weighted sum of the step's auxiliary terms (``mtbert.auxiliary``:
        MNRL, mixture-of-experts losses), or None: not a task's term, so a combiner that
        treats tasks apart adds its plain gradient to every parameter it reaches.
        """
        raise NotImplementedError

    def state_dict(self) -> dict:
        """State to checkpoint (none by default)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what ``state_dict`` returned (nothing by default)."""
