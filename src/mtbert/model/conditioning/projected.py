"""Projected task-embedded attention (TEA-BERT, Mou, Xu & Yao, CS224N report, approach 3).

Each task has one embedding E_task (size D = `embedding_size`, default H), shared by all
layers; per layer, projections map it into query, key and value space and the results are added
before the split into heads: Q_hat = Q + W^Q E_task, K_hat = K + W^K E_task, V_hat = V + W^V E_task.

The projections are shared across tasks: the report counts this variant as adding "Hidden
Size^2 many" parameters, with no factor for the number of tasks, and a per-task W^Q_task would
make W^Q_task E_task just a free per-task vector, i.e. the `attention` variant again. So all
tasks' gradients reach W (it is conditioning, not part of the encoder's shared parameters).
Added parameters: T * D + L * 3 * H * D (T tasks, L layers, H hidden size).

W starts at zero, so at initialisation the encoder is exactly the plain one; E_task starts
random (BERT's N(0, initializer_range)) so that W receives a gradient (with both at zero,
neither would).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mtbert.model.bert import BertConfig
from mtbert.model.conditioning.base import TaskConditioning, positive_int


class ProjectedTaskAttention(TaskConditioning):
    def __init__(self, bert_config: BertConfig, task_names: list[str], *,
                 embedding_size: int | None = None):
        super().__init__(task_names)
        hidden, layers = bert_config.hidden_size, bert_config.num_hidden_layers
        self.hidden_size = hidden
        self.embedding_size = positive_int(
            "embedding_size", hidden if embedding_size is None else embedding_size)
        self.embeddings = nn.ParameterDict({
            task: nn.Parameter(torch.randn(self.embedding_size) * bert_config.initializer_range)
            for task in task_names})  # (D,)
        # Per layer [W^Q; W^K; W^V] stacked: (L, 3H, D).
        self.projections = nn.Parameter(torch.zeros(layers, 3 * hidden, self.embedding_size))

    def task_qkv(self, task: str, layer: int) -> tuple[Tensor, Tensor, Tensor]:
        """(W^Q E_task, W^K E_task, W^V E_task), (H,) each."""
        return (self.projections[layer] @ self.embeddings[task]).split(self.hidden_size)

    def attention_qkv(self, task: str, layer: int, q: Tensor, k: Tensor, v: Tensor
                      ) -> tuple[Tensor, Tensor, Tensor]:
        q_task, k_task, v_task = self.task_qkv(task, layer)
        return q + q_task, k + k_task, v + v_task

    def added_parameters(self) -> int:
        layers = self.projections.shape[0]
        return (len(self.task_names) * self.embedding_size
                + layers * 3 * self.hidden_size * self.embedding_size)
