"""`MultitaskModel`: one shared encoder, optional task conditioning and task routing (mixture
of experts), one head per task."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from mtbert.auxiliary import SideOutputs
from mtbert.config import TaskConfig
from mtbert.data.batching import Batch
from mtbert.model.bert import BertModel, ChainedHooks, EncoderHooks
from mtbert.model.heads import HeadOutput, build_head, pool


class MultitaskModel(nn.Module):
    """Batches are single-task: `forward(task, batch)` runs the encoder with that task's
    conditioning and routing (if any) and that task's head. A training pass's output
    carries the auxiliary terms and statistics the encoder's layers returned (mixture of
    experts: balance and z-losses, expert load)."""

    def __init__(self, encoder: BertModel, tasks: Sequence[TaskConfig],
                 conditioning: nn.Module | None = None, routing: nn.Module | None = None):
        super().__init__()
        self.encoder = encoder
        self.conditioning = conditioning
        self.routing = routing  # per-task router logits of task-routed experts (model/moe.py)
        self.tasks = {task.name: task for task in tasks}
        self.heads = nn.ModuleDict(
            {task.name: build_head(task, encoder.config.hidden_size) for task in tasks})

    def forward(self, task: str, batch: Batch, extra_hooks: EncoderHooks | None = None
                ) -> HeadOutput:
        """`extra_hooks` run after the task's own (a regulariser's input perturbation)."""
        side = SideOutputs() if self.training else None
        output = self.heads[task](
            self.sentence_vectors(task, batch, extra_hooks=extra_hooks, side=side),
            batch.pair_index)
        if side is not None:
            output.auxiliary = side.auxiliary
            output.statistics = side.logged_statistics()
        return output

    def hooks(self, task: str, extra: EncoderHooks | None = None) -> EncoderHooks | None:
        """The encoder hooks of `task`: its conditioning's and its routing's, then `extra`;
        or None."""
        parts = [m.hooks(task) for m in (self.conditioning, self.routing) if m is not None]
        parts += [extra] if extra is not None else []
        return ChainedHooks(parts) if len(parts) > 1 else (parts[0] if parts else None)

    def sentence_vectors(self, task: str | None, batch: Batch, pooling: str = "mean",
                         extra_hooks: EncoderHooks | None = None,
                         side: SideOutputs | None = None) -> Tensor:
        """(R, H) pooled vectors of the batch's rows, as `task`'s head sees them (its
        conditioning and pooling, then `extra_hooks`); `task=None`: the plain encoder with
        `pooling`. `side` collects the pass's auxiliary terms and statistics."""
        hooks = extra_hooks
        if task is not None:
            hooks = self.hooks(task, extra_hooks)
            pooling = self.tasks[task].head.pooling
        hidden, pooled = self.encoder(batch.input_ids, batch.attention_mask,
                                      batch.token_type_ids, hooks, side)
        return pool(hidden, pooled, batch.attention_mask, pooling)

    def shared_parameters(self) -> list[nn.Parameter]:
        """Parameters every task's loss reaches: the encoder (gradient methods act on these)."""
        return [p for p in self.encoder.parameters() if p.requires_grad]

    def last_shared_parameters(self) -> list[nn.Parameter]:
        """The last encoder layer (GradNorm measures gradient norms here)."""
        return [p for p in self.encoder.layers[-1].parameters() if p.requires_grad]

    def task_parameters(self) -> list[nn.Parameter]:
        """Heads, conditioning and task routing: each keeps its own task's gradient."""
        shared = {id(p) for p in self.shared_parameters()}
        return [p for p in self.parameters() if p.requires_grad and id(p) not in shared]
