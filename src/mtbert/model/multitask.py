"""`MultitaskModel`: one shared encoder, optional task conditioning, one head per task."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from mtbert.config import TaskConfig
from mtbert.data.batching import Batch
from mtbert.model.bert import BertModel
from mtbert.model.heads import HeadOutput, build_head, pool


class MultitaskModel(nn.Module):
    """Batches are single-task: `forward(task, batch)` runs the encoder with that task's
    conditioning (if any) and that task's head."""

    def __init__(self, encoder: BertModel, tasks: Sequence[TaskConfig],
                 conditioning: nn.Module | None = None):
        super().__init__()
        self.encoder = encoder
        self.conditioning = conditioning
        self.tasks = {task.name: task for task in tasks}
        self.heads = nn.ModuleDict(
            {task.name: build_head(task, encoder.config.hidden_size) for task in tasks})

    def forward(self, task: str, batch: Batch) -> HeadOutput:
        return self.heads[task](self.sentence_vectors(task, batch), batch.pair_index)

    def sentence_vectors(self, task: str | None, batch: Batch, pooling: str = "mean") -> Tensor:
        """(R, H) pooled vectors of the batch's rows, as `task`'s head sees them (its
        conditioning and pooling); `task=None`: the plain encoder with `pooling`."""
        hooks = None
        if task is not None:
            hooks = self.conditioning.hooks(task) if self.conditioning is not None else None
            pooling = self.tasks[task].head.pooling
        hidden, pooled = self.encoder(batch.input_ids, batch.attention_mask,
                                      batch.token_type_ids, hooks)
        return pool(hidden, pooled, batch.attention_mask, pooling)

    def shared_parameters(self) -> list[nn.Parameter]:
        """Parameters every task's loss reaches: the encoder (gradient methods act on these)."""
        return [p for p in self.encoder.parameters() if p.requires_grad]

    def last_shared_parameters(self) -> list[nn.Parameter]:
        """The last encoder layer (GradNorm measures gradient norms here)."""
        return [p for p in self.encoder.layers[-1].parameters() if p.requires_grad]

    def task_parameters(self) -> list[nn.Parameter]:
        """Heads and conditioning: each keeps its own task's gradient."""
        shared = {id(p) for p in self.shared_parameters()}
        return [p for p in self.parameters() if p.requires_grad and id(p) not in shared]
