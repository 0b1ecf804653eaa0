"""Dynamic Weight Average: weights from how fast each task's loss fell over the last epochs."""

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from mtbert.balancing.base import LossWeighting
from mtbert.distributed import mean_across_ranks


class DynamicWeightAverage(LossWeighting):
    """Weights ``w_i = T * softmax_i(r_i / temperature)``, ``r_i = Lbar_i(e-1) / Lbar_i(e-2)``.

    ``Lbar_i(e)`` is the mean of the losses that ``forward`` saw for task i in epoch e (each
    call adds ``L_i.detach()`` to the step's sums, which ``after_optimizer_step`` adds to the
    epoch's and ``after_skipped_step`` drops, so a NaN step never enters a mean);
    ``on_epoch_end`` turns the sums into that epoch's means and computes the weights used in
    the next epoch. A task whose loss falls slowly (``r_i`` near or above 1) gets more
    weight. The first two epochs use weight 1, so DWA acts from epoch 3. Epochs are the
    trainer's schedule epochs: epochs of data, or shorter ones in a run that a step cap stops
    early (`TaskSampler.fit_schedule`).
    Every task must have been seen in each epoch. All state is in buffers, so ``state_dict``
    saves and restores it. Under DDP ``after_optimizer_step`` adds the step's loss sums
    averaged over the ranks (they drew the same tasks, so the counts agree): every rank holds
    the same state at every step, so rank 0's checkpoint resumes every rank exactly.

    Args:
        task_names: Names of all tasks.
        temperature: Softmax temperature (> 0); larger gives weights closer to 1.

    References:
        - Liu, Johns & Davison 2019, End-to-End Multi-Task Learning with Attention,
          https://arxiv.org/abs/1803.10704
    """

    acts_from_epoch = 3
    needs_several_tasks = True

    def __init__(self, task_names: Sequence[str], temperature: float = 2.0):
        super().__init__(task_names)
        if temperature <= 0:
            raise ValueError(f"DWA needs temperature > 0, got {temperature}.")
        self.temperature = temperature
        num_tasks = len(self.task_names)
        self.register_buffer("epoch_loss_sum", torch.zeros(num_tasks, dtype=torch.float64))
        self.register_buffer("epoch_loss_count", torch.zeros(num_tasks, dtype=torch.long))
        self.register_buffer("step_loss_sum", torch.zeros(num_tasks, dtype=torch.float64))
        self.register_buffer("step_loss_count", torch.zeros(num_tasks, dtype=torch.long))
        # rows: mean losses of epochs e-2 and e-1; NaN until those epochs have ended
        self.register_buffer(
            "epoch_means", torch.full((2, num_tasks), float("nan"), dtype=torch.float64)
        )
        self.register_buffer("task_weights", torch.ones(num_tasks))  # (T,)

    def forward(
        self, losses: dict[str, Tensor], last_shared: Sequence[nn.Parameter]
    ) -> dict[str, Tensor]:
        self.check_losses(losses)
        terms = {}
        for name, loss in losses.items():
            i = self.task_names.index(name)
            self.step_loss_sum[i] += loss.detach().to(self.step_loss_sum.dtype)
            self.step_loss_count[i] += 1
            terms[name] = self.task_weights[i].to(loss.dtype) * loss
        return terms

    def weights(self) -> dict[str, float]:
        return dict(zip(self.task_names, self.task_weights.tolist(), strict=True))

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        self.epoch_loss_sum += mean_across_ranks(self.step_loss_sum)
        self.epoch_loss_count += self.step_loss_count
        self.after_skipped_step()

    @torch.no_grad()
    def after_skipped_step(self) -> None:
        self.step_loss_sum.zero_()
        self.step_loss_count.zero_()

    @torch.no_grad()
    def on_epoch_end(self) -> None:
        """Close the epoch: store its mean losses, update the weights, reset the running sums."""
        unseen = [n for n, c in zip(self.task_names, self.epoch_loss_count, strict=True) if c == 0]
        if unseen:
            raise ValueError(f"DWA saw no loss for {unseen} in this epoch.")
        self.epoch_means[0] = self.epoch_means[1]
        self.epoch_means[1] = self.epoch_loss_sum / self.epoch_loss_count  # (T,)
        if not torch.isnan(self.epoch_means[0]).any():
            ratios = self.epoch_means[1] / self.epoch_means[0]  # (T,)
            weights = len(self.task_names) * torch.softmax(ratios / self.temperature, dim=0)
            self.task_weights.copy_(weights)
        self.epoch_loss_sum.zero_()
        self.epoch_loss_count.zero_()
