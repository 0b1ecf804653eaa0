"""Task embedding at the input (TEA-BERT, Mou, Xu & Yao, CS224N report, approach 1).

One learned H-vector per task is added to every token's summed input embeddings, before the
embedding LayerNorm: E_hat = E + E_task. Added parameters: T * H (T tasks, H hidden size).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mtbert.model.bert import BertConfig
from mtbert.model.conditioning.base import TaskConditioning


class InputTaskEmbedding(TaskConditioning):
    """E_task starts at zero, so at initialisation the encoder is exactly the plain one."""

    def __init__(self, bert_config: BertConfig, task_names: list[str]):
        super().__init__(task_names)
        self.hidden_size = bert_config.hidden_size
        self.embeddings = nn.ParameterDict(
            {task: nn.Parameter(torch.zeros(self.hidden_size)) for task in task_names})  # (H,)

    def input_embeddings(self, task: str, embeddings: Tensor) -> Tensor:
        return embeddings + self.embeddings[task]  # (N, H) + (H,)

    def added_parameters(self) -> int:
        return len(self.task_names) * self.hidden_size
