"""Task-embedded attention (EmBERT: Maziarka & Danel 2021, "Multitask Learning Using BERT with
Task-Embedded Attention", IJCNN; TEA-BERT approach 2).

Per task and per layer three learned H-vectors are added to the queries, keys and values before
the split into heads: Q_hat = Q + Q_task, K_hat = K + K_task, V_hat = V + V_task.
Added parameters: T * L * 3 * H (T tasks, L layers, H hidden size).

K_task adds the same score q . K_task to every key a query sees, which the softmax cancels: it
is kept for fidelity to the papers but receives no gradient (up to rounding). V_task shifts
the attention output by a constant, i.e. a per-task bias.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mtbert.model.bert import BertConfig
from mtbert.model.conditioning.base import TaskConditioning


class TaskEmbeddedAttention(TaskConditioning):
    """The vectors start at zero, so at initialisation the encoder is exactly the plain one."""

    def __init__(self, bert_config: BertConfig, task_names: list[str]):
        super().__init__(task_names)
        self.shape = (bert_config.num_hidden_layers, 3, bert_config.hidden_size)
        self.vectors = nn.ParameterDict(
            {task: nn.Parameter(torch.zeros(self.shape)) for task in task_names})  # (L, 3, H)

    def attention_qkv(self, task: str, layer: int, q: Tensor, k: Tensor, v: Tensor
                      ) -> tuple[Tensor, Tensor, Tensor]:
        q_task, k_task, v_task = self.vectors[task][layer]  # (H,) each
        return q + q_task, k + k_task, v + v_task

    def added_parameters(self) -> int:
        layers, three, hidden = self.shape
        return len(self.task_names) * layers * three * hidden
