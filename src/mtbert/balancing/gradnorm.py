"""GradNorm: learn loss weights that balance the tasks' gradient norms on the last shared layer."""

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from mtbert.balancing.base import LossWeighting, per_task_gradients, trainable
from mtbert.distributed import mean_across_ranks


class GradNormWeighting(LossWeighting):
    """Learned weights ``w`` pulling each task's gradient norm towards a common target.

    On the last shared params W, with ``n_i = ||grad_W L_i||`` (autograd.grad on the raw loss,
    detached) and ``G_i = w_i * n_i``:

    - ``r_i = (L_i / L_i(0)) / mean_j(L_j / L_j(0))``, the relative inverse training rate, where
      ``L_i(0)`` are the losses of the first call (kept in a buffer, so they survive a resume);
    - ``target_i = mean(G) * r_i ** alpha``, treated as a constant;
    - ``forward`` SETS ``w.grad`` (overwriting it) to ``d/dw sum_i |G_i - target_i|``
      ``= sign(G_i - target_i) * n_i`` and returns ``w_i.detach() * L_i``, so the terms give
      ``w`` no other gradient. With gradient accumulation the last micro-batch's ``w.grad``
      is the one the optimizer sees.

    ``w`` (``loss_weights``, init 1) is trained by the caller's optimizer (its own param group);
    ``after_optimizer_step`` then clamps ``w`` to >= ``min_weight`` and rescales it so that
    ``sum(w) = T``. Needs the loss of every task at every step (round-robin sampling). Under DDP
    the losses and each task's gradient on W are averaged over the ranks before the norms
    are taken (one extra all-reduce of T x |W| values per step), so ``L_i(0)``, ``w.grad``
    and thus ``w`` are the same on every rank: those of the global batch.

    Args:
        task_names: Names of all tasks.
        alpha: Strength of the pull towards equal training rates (0 = equal gradient norms).
        min_weight: Floor applied to ``w`` before renormalising, keeping it positive.

    References:
        - Chen et al. 2018, GradNorm: Gradient Normalization for Adaptive Loss Balancing in Deep
          Multitask Networks, https://arxiv.org/abs/1711.02257
    """

    needs_every_task = True
    needs_several_tasks = True
    needs_encoder_gradients = True

    def __init__(self, task_names: Sequence[str], alpha: float = 1.5, min_weight: float = 1e-3):
        super().__init__(task_names)
        if alpha < 0:
            raise ValueError(f"GradNorm needs alpha >= 0, got {alpha}.")
        if min_weight <= 0:
            raise ValueError(f"GradNorm needs min_weight > 0, got {min_weight}.")
        self.alpha = alpha
        self.min_weight = min_weight
        self.loss_weights = nn.Parameter(torch.ones(len(self.task_names)))  # (T,)
        # L_i(0); NaN until the first forward call
        self.register_buffer("initial_losses", torch.full((len(self.task_names),), float("nan")))

    def forward(
        self, losses: dict[str, Tensor], last_shared: Sequence[nn.Parameter]
    ) -> dict[str, Tensor]:
        self.check_losses(losses)
        if set(losses) != set(self.task_names):
            raise ValueError(
                f"GradNorm needs the loss of every task {list(self.task_names)} at each step, "
                f"got {sorted(losses)}; use round-robin sampling."
            )
        if not trainable(last_shared):
            raise ValueError("GradNorm needs the trainable parameters of the last shared layer.")
        ordered = {name: losses[name] for name in self.task_names}
        current = mean_across_ranks(torch.stack(list(ordered.values())).detach())  # (T,)
        if torch.isnan(self.initial_losses).any():
            if (current <= 0).any():
                raise ValueError(f"GradNorm needs positive initial losses, got {current.tolist()}.")
            self.initial_losses.copy_(current)
        norms = mean_across_ranks(per_task_gradients(ordered, last_shared)).norm(dim=1)  # (T,)
        with torch.no_grad():
            weighted_norms = self.loss_weights * norms  # G, (T,)
            ratios = current / self.initial_losses  # (T,)
            target = weighted_norms.mean() * (ratios / ratios.mean()) ** self.alpha  # (T,)
            self.loss_weights.grad = torch.sign(weighted_norms - target) * norms  # (T,)
        w = self.loss_weights.detach()
        return {name: w[i] * loss for i, (name, loss) in enumerate(ordered.items())}

    def weights(self) -> dict[str, float]:
        return dict(zip(self.task_names, self.loss_weights.detach().tolist(), strict=True))

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        """Clamp ``w`` to >= ``min_weight`` and rescale it so that it sums to the task count."""
        self.loss_weights.clamp_(min=self.min_weight)
        self.loss_weights.mul_(len(self.task_names) / self.loss_weights.sum())
