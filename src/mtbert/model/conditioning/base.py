"""What the task-conditioning variants share: per-task hook methods and hooks bound to a task.

A variant subclasses `TaskConditioning` and overrides the hook methods it needs; each takes the
task's name first. Per-task parameters live in dicts keyed by the task's name, so a parameter's
state-dict name says which task owns it (`embeddings.sst`, `pals.quora.encoder.weight`); names
without a task are shared by every task.
"""

from __future__ import annotations

from functools import partial

from torch import Tensor, nn

from mtbert.model.bert import EncoderHooks, TokenLayout


class TaskConditioning(nn.Module):
    """Base of the variants: `hooks(task)` returns `EncoderHooks` bound to one task."""

    def __init__(self, task_names: list[str]):
        super().__init__()
        for task in task_names:
            if not task or "." in task:
                raise ValueError(f"task name {task!r} cannot name a parameter (empty or has '.')")
        self.task_names = list(task_names)
        # A plain dict: the bound hooks are not submodules, so no weight is registered twice.
        self._hooks = {task: _TaskHooks(self, task) for task in task_names}

    def hooks(self, task: str) -> EncoderHooks:
        if task not in self._hooks:
            raise ValueError(f"no conditioning for task {task!r}; tasks: {self.task_names}")
        return self._hooks[task]

    def added_parameters(self) -> int:
        """Parameters the variant adds to the encoder, from its formula."""
        raise NotImplementedError

    def input_embeddings(self, task: str, embeddings: Tensor) -> Tensor:
        return embeddings

    def attention_qkv(self, task: str, layer: int, q: Tensor, k: Tensor, v: Tensor
                      ) -> tuple[Tensor, Tensor, Tensor]:
        return q, k, v

    def attention_branch(self, task: str, layer: int, hidden: Tensor,
                         layout: TokenLayout) -> Tensor | None:
        return None

    def projection(self, task: str, layer: int, name: str, x: Tensor, y: Tensor) -> Tensor:
        return y

    def router_logits(self, task: str, layer: int, hidden: Tensor) -> Tensor | None:
        return None


class _TaskHooks(EncoderHooks):
    """A `TaskConditioning`'s hook methods with the task filled in."""

    def __init__(self, owner: TaskConditioning, task: str):
        super().__init__()
        # Bound methods, not the owner itself, which would register it as our submodule.
        self._input_embeddings = partial(owner.input_embeddings, task)
        self._attention_qkv = partial(owner.attention_qkv, task)
        self._attention_branch = partial(owner.attention_branch, task)
        self._projection = partial(owner.projection, task)
        self._router_logits = partial(owner.router_logits, task)

    def input_embeddings(self, embeddings: Tensor) -> Tensor:
        return self._input_embeddings(embeddings)

    def attention_qkv(self, layer: int, q: Tensor, k: Tensor, v: Tensor
                      ) -> tuple[Tensor, Tensor, Tensor]:
        return self._attention_qkv(layer, q, k, v)

    def attention_branch(self, layer: int, hidden: Tensor, layout: TokenLayout
                         ) -> Tensor | None:
        return self._attention_branch(layer, hidden, layout)

    def projection(self, layer: int, name: str, x: Tensor, y: Tensor) -> Tensor:
        return self._projection(layer, name, x, y)

    def router_logits(self, layer: int, hidden: Tensor) -> Tensor | None:
        return self._router_logits(layer, hidden)


def positive_int(name: str, value: object) -> int:
    """An option that must be a positive integer; the error names it."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: expected a positive integer, got {value!r}")
    return value
