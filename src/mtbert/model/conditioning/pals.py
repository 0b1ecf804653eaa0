"""Projected attention layers (Stickland & Murray 2019, "BERT and PALs: Projected Attention
Layers for Efficient Adaptation in Multi-Task Learning", ICML).

Per task, a low-rank multi-head attention runs in parallel with every layer's self-attention:
h <- LN(h + SA(h) + PAL(h)), PAL(h) = V^D MHA(V^E h). The encoder V^E (H -> r) and decoder
V^D (r -> H) are per task and shared across layers; each layer has its own MHA of size r (Q, K
and V maps r -> r with biases, no output map: V^D follows). The paper uses r = 204 for H = 768
with 12 heads; `rank` defaults to the multiple of `heads` nearest 0.266 H, and `heads` to the
largest divisor of `rank` up to 12.
Added parameters: T * (2 H r + r + H + L * 3 * (r^2 + r)) (T tasks, L layers).

V^D starts at zero, so at initialisation the encoder is exactly the plain one; the other
weights start as BERT's, N(0, initializer_range) with zero biases.
"""

from __future__ import annotations

from torch import Tensor, nn

from mtbert.model.bert import BertConfig, TokenLayout
from mtbert.model.conditioning.base import TaskConditioning, positive_int

RANK_RATIO = 0.266  # the paper's r = 204 for H = 768
MAX_HEADS = 12


def pal_shape(hidden_size: int, rank: int | None, heads: int | None) -> tuple[int, int]:
    """(rank, heads) from the options, with `rank` a multiple of `heads`."""
    if rank is None:
        heads = MAX_HEADS if heads is None else positive_int("heads", heads)
        return heads * max(1, round(RANK_RATIO * hidden_size / heads)), heads
    rank = positive_int("rank", rank)
    if heads is None:
        return rank, max(h for h in range(1, min(rank, MAX_HEADS) + 1) if rank % h == 0)
    if rank % positive_int("heads", heads):
        raise ValueError(f"rank ({rank}) must be a multiple of heads ({heads})")
    return rank, heads


class _TaskPAL(nn.Module):
    """One task's PALs: V^E and V^D shared by the layers, a multi-head attention per layer."""

    def __init__(self, config: BertConfig, rank: int, heads: int):
        super().__init__()
        self.heads = heads
        self.dropout_p = config.attention_probs_dropout_prob
        self.encoder = nn.Linear(config.hidden_size, rank)  # V^E
        self.decoder = nn.Linear(rank, config.hidden_size)  # V^D
        self.attention = nn.ModuleList(  # per layer [Q; K; V]
            nn.Linear(rank, 3 * rank) for _ in range(config.num_hidden_layers))
        for linear in (self.encoder, *self.attention):
            nn.init.normal_(linear.weight, std=config.initializer_range)
            nn.init.zeros_(linear.bias)
        nn.init.zeros_(self.decoder.weight)
        nn.init.zeros_(self.decoder.bias)

    def forward(self, layer: int, hidden: Tensor, layout: TokenLayout) -> Tensor:
        x = self.encoder(hidden)  # (N, r)
        q, k, v = self.attention[layer](x).split(x.shape[-1], dim=-1)  # (N, r) each
        y = layout.attention(q, k, v, self.heads, self.dropout_p if self.training else 0.0)
        return self.decoder(y)  # (N, H)


class ProjectedAttentionLayers(TaskConditioning):
    def __init__(self, bert_config: BertConfig, task_names: list[str], *,
                 rank: int | None = None, heads: int | None = None):
        super().__init__(task_names)
        self.rank, self.heads = pal_shape(bert_config.hidden_size, rank, heads)
        self.hidden_size, self.layers = bert_config.hidden_size, bert_config.num_hidden_layers
        self.pals = nn.ModuleDict(
            {task: _TaskPAL(bert_config, self.rank, self.heads) for task in task_names})

    def attention_branch(self, task: str, layer: int, hidden: Tensor,
                         layout: TokenLayout) -> Tensor:
        return self.pals[task](layer, hidden, layout)

    def added_parameters(self) -> int:
        h, r = self.hidden_size, self.rank
        return len(self.task_names) * (2 * h * r + r + h + self.layers * 3 * (r * r + r))
