"""A task's whole training loss: its loss function plus its auxiliary terms."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor, nn

from mtbert.losses import build_loss, loss_name
from mtbert.losses.mnrl import (
    POSITIVE_RULES,
    MultipleNegativesRankingLoss,
    select_positive_pairs,
    selected_pairs_mnrl,
)

if TYPE_CHECKING:
    from mtbert.config import TaskConfig


class TaskLoss(nn.Module):
    """A task's loss on its head's output, plus its auxiliary MNRL term if configured and the
    model's own auxiliary terms (`HeadOutput.auxiliary`: mixture-of-experts balancing and
    z-losses, already weighted). Parts are logged; so are the output's routing statistics."""

    def __init__(self, task: TaskConfig):
        super().__init__()
        self.loss = build_loss(loss_name(task), **task.loss_options)
        self.mnrl = self.rule = None
        if task.mnrl is not None:
            self.mnrl = MultipleNegativesRankingLoss(scale=task.mnrl.scale)
            self.rule = POSITIVE_RULES[task.mnrl.rule](task.mnrl.start, task.mnrl.step_per_epoch)
            self.mnrl_weight = task.mnrl.weight

    def forward(self, output, labels: Tensor, epoch: int) -> tuple[Tensor, dict[str, float]]:
        loss = self.loss(output.predictions.float(), labels)  # fp32 loss under bf16 autocast
        parts = {"loss": loss.item()}
        if self.mnrl is not None:
            u, v = (e.float() for e in output.embeddings)
            mask = select_positive_pairs(self.rule, u, v, labels, epoch)
            auxiliary = selected_pairs_mnrl(self.mnrl, u, v, mask)
            parts["mnrl"] = auxiliary.item()
            loss = loss + self.mnrl_weight * auxiliary
        for name, term in output.auxiliary.items():
            parts[name] = term.item()
            loss = loss + term.float()
        parts.update(output.statistics)
        return loss, parts
