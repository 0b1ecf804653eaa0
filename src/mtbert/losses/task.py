"""A task's training loss and, apart from it, its auxiliary terms."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor, nn

from mtbert.auxiliary import AuxiliaryTerm
from mtbert.losses import AUXILIARY_LOSSES, build_loss, loss_name

if TYPE_CHECKING:
    from mtbert.config import TaskConfig


class TaskLoss(nn.Module):
    """A task's loss on its head's output, and apart from it the auxiliary terms: the task's
    auxiliary losses (`losses.AUXILIARY_LOSSES` it configures, e.g. MNRL) and the model's own
    (`HeadOutput.auxiliary`: mixture-of-experts balance and z-losses). The task's loss goes
    on to the weighting and distillation; the auxiliary terms do not (`mtbert.auxiliary`).
    Values are logged, and so are the output's statistics (expert load)."""

    def __init__(self, task: TaskConfig):
        super().__init__()
        self.loss = build_loss(loss_name(task), **task.loss_options)
        built = {name: cls.from_task(task) for name, cls in AUXILIARY_LOSSES.items()}
        self.auxiliary_losses = nn.ModuleDict({n: r for n, r in built.items() if r is not None})

    def task_loss(self, output, labels: Tensor) -> Tensor:
        """The task's loss alone, in fp32 under bf16 autocast; no auxiliary term is made (TAG's
        look-ahead steps measure this)."""
        return self.loss(output.predictions.float(), labels)

    def forward(self, output, labels: Tensor, epoch: int
                ) -> tuple[Tensor, dict[str, AuxiliaryTerm], dict[str, float]]:
        """(the task's loss, {name: auxiliary term}, {name: value to log})."""
        loss = self.task_loss(output, labels)
        auxiliary = dict(output.auxiliary)
        for name, auxiliary_loss in self.auxiliary_losses.items():
            auxiliary[name] = AuxiliaryTerm(auxiliary_loss(output, labels, epoch),
                                           auxiliary_loss.weight)
        parts = {"loss": loss.item(), **{n: t.value.item() for n, t in auxiliary.items()}}
        parts.update(output.statistics)
        return loss, auxiliary, parts
