"""Projected task-embedded attention with an activation (TEA-BERT, Mou, Xu & Yao, CS224N
report, approach 4).

As `projected`, then an activation and a per-layer projection (with bias):
Q_hat = W^Q_proj act(Q + W^Q E_task) + b^Q_proj, likewise K and V; `activation` is elu, tanh or
selu (the report's table). W_proj, like W, is shared across tasks (the report gives it no task
index). Added parameters: T * D + L * 3 * H * D + L * 3 * (H^2 + H).

This variant cannot start as the plain encoder: act is not linear, so no W_proj undoes it.
W_proj starts at the identity and b_proj at zero, which keeps queries, keys and values where
act(x) = x: x > 0 for elu, |x| small for tanh (selu scales x > 0 by 1.0507). W starts at
zero, so at initialisation every task sees the same encoder.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtbert.model.bert import BertConfig
from mtbert.model.conditioning.projected import ProjectedTaskAttention

ACTIVATIONS = {"elu": F.elu, "tanh": torch.tanh, "selu": F.selu}


class ProjectedActivationTaskAttention(ProjectedTaskAttention):
    def __init__(self, bert_config: BertConfig, task_names: list[str], *,
                 embedding_size: int | None = None, activation: str = "elu"):
        super().__init__(bert_config, task_names, embedding_size=embedding_size)
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation: unknown {activation!r}; known: {sorted(ACTIVATIONS)}")
        self.activation = activation
        self.act = ACTIVATIONS[activation]
        layers, hidden = bert_config.num_hidden_layers, bert_config.hidden_size
        # Per layer the Q, K and V projections: weights (L, 3, H, H), biases (L, 3, H).
        self.output_weight = nn.Parameter(torch.eye(hidden).repeat(layers, 3, 1, 1))
        self.output_bias = nn.Parameter(torch.zeros(layers, 3, hidden))

    def attention_qkv(self, task: str, layer: int, q: Tensor, k: Tensor, v: Tensor
                      ) -> tuple[Tensor, Tensor, Tensor]:
        q_task, k_task, v_task = self.task_qkv(task, layer)  # (H,) each
        w, b = self.output_weight[layer], self.output_bias[layer]  # (3, H, H), (3, H)
        return (F.linear(self.act(q + q_task), w[0], b[0]),
                F.linear(self.act(k + k_task), w[1], b[1]),
                F.linear(self.act(v + v_task), w[2], b[2]))

    def added_parameters(self) -> int:
        layers = self.output_weight.shape[0]
        return super().added_parameters() + layers * 3 * (self.hidden_size ** 2 + self.hidden_size)
