"""Task heads: they turn pooled sentence vectors into logits or scores, nothing more.

Losses live in `mtbert.losses`; a head returns predictions and, for siamese heads, the two
sentence embeddings (for auxiliary losses such as MNRL).

A head class is built as `Head(task, hidden_size)` and declares, for the config checks and the
batching: `siamese` (True: the two sentences of a pair are encoded apart and the batch holds
`pair_index`) and `max_classes` (how many classes it can tell apart). How many numbers it
outputs per example and how they decode into labels is the task's loss's business
(`losses.loss_class(task)`: `outputs_per_example`, `decode`, `probabilities`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtbert.auxiliary import AuxiliaryTerm
from mtbert.losses import output_size
from mtbert.model.bert import Dropout, mean_pool
from mtbert.registry import Registry

if TYPE_CHECKING:
    from mtbert.config import TaskConfig


@dataclass
class HeadOutput:
    predictions: Tensor  # (B, C) logits, or (B,) one logit or score per example
    embeddings: tuple[Tensor, Tensor] | None = None  # siamese heads: (u, v), (B, H) each
    # Set by the model, not the head, in training: the encoder's auxiliary terms (mixture of
    # experts; they join the final loss beside the task's, `mtbert.auxiliary`) and
    # statistics to log.
    auxiliary: dict[str, AuxiliaryTerm] = field(default_factory=dict)
    statistics: dict[str, float] = field(default_factory=dict)


def pool(hidden: Tensor, pooled: Tensor, attention_mask: Tensor, pooling: str) -> Tensor:
    """Sentence vectors (R, H) from encoder states: BERT's pooler, raw [CLS], or token mean."""
    if pooling == "pooler":
        return pooled
    if pooling == "cls":
        return hidden[:, 0]
    return mean_pool(hidden, attention_mask)


def mlp(in_size: int, out_size: int, hidden_layers: int, hidden_size: int,
        dropout: float) -> nn.Sequential:
    """dropout -> (linear -> ReLU -> dropout) x hidden_layers -> linear."""
    layers: list[nn.Module] = [Dropout(dropout)]
    for _ in range(hidden_layers):
        layers += [nn.Linear(in_size, hidden_size), nn.ReLU(), Dropout(dropout)]
        in_size = hidden_size
    layers.append(nn.Linear(in_size, out_size))
    return nn.Sequential(*layers)


class ClassifierHead(nn.Module):
    """An MLP on one vector per example: a sentence, or a jointly encoded pair
    (a cross-encoder, as in BERT's sentence-pair fine-tuning, Devlin et al. 2019)."""

    siamese = False
    max_classes = math.inf

    def __init__(self, task: TaskConfig, hidden_size: int):
        super().__init__()
        config = task.head
        self.net = mlp(hidden_size, output_size(task), config.hidden_layers,
                       config.hidden_size or hidden_size, config.dropout)

    def forward(self, vectors: Tensor, pair_index: Tensor | None) -> HeadOutput:
        logits = self.net(vectors)  # (B, C)
        return HeadOutput(logits.squeeze(-1) if logits.shape[-1] == 1 else logits)


def split_pairs(vectors: Tensor, pair_index: Tensor | None) -> tuple[Tensor, Tensor]:
    if pair_index is None:
        raise ValueError("a siamese head needs a batch encoded as separate sentences")
    return vectors[pair_index[:, 0]], vectors[pair_index[:, 1]]


class CosineHead(nn.Module):
    """Siamese cosine similarity of the two sentence embeddings (Reimers & Gurevych 2019,
    "Sentence-BERT").

    Regression with `cosine_scale: fixed`: score = low + (high - low) * ReLU(cos); with
    `learned`: score = a * cos + b. Binary classification: logit = a * cos + b (learned).
    """

    siamese = True
    max_classes = 2  # one score: a cosine above or below a learned boundary

    def __init__(self, task: TaskConfig, hidden_size: int):
        super().__init__()
        config = task.head
        self.low, self.high = task.label_range or (0.0, 1.0)
        self.learned = config.cosine_scale == "learned" or task.kind == "classification"
        if task.kind == "classification":  # a cosine of ~0.5 is the boundary at start
            scale, bias = 10.0, -5.0
        else:
            scale, bias = self.high - self.low, self.low
        self.scale = nn.Parameter(torch.tensor(scale)) if self.learned else None
        self.bias = nn.Parameter(torch.tensor(bias)) if self.learned else None

    def forward(self, vectors: Tensor, pair_index: Tensor | None) -> HeadOutput:
        u, v = split_pairs(vectors, pair_index)
        cos = F.cosine_similarity(u, v, dim=-1)  # (B,)
        if self.learned:
            out = self.scale * cos + self.bias
        else:
            out = self.low + (self.high - self.low) * F.relu(cos)
        return HeadOutput(out, (u, v))


class PairFeaturesHead(nn.Module):
    """MLP on [u, v, |u - v|, u * v] of the two sentence embeddings (Reimers & Gurevych 2019;
    the features to use are configurable)."""

    FEATURES = {
        "u": lambda u, v: u,
        "v": lambda u, v: v,
        "abs_diff": lambda u, v: (u - v).abs(),
        "product": lambda u, v: u * v,
    }

    siamese = True
    max_classes = math.inf

    def __init__(self, task: TaskConfig, hidden_size: int):
        super().__init__()
        config = task.head
        unknown = set(config.features) - self.FEATURES.keys()
        if unknown or not config.features:
            raise ValueError(f"head.features: unknown {sorted(unknown)}; "
                             f"choose from {sorted(self.FEATURES)}")
        self.features = list(config.features)
        self.net = mlp(hidden_size * len(self.features), output_size(task), config.hidden_layers,
                       config.hidden_size or hidden_size, config.dropout)

    def forward(self, vectors: Tensor, pair_index: Tensor | None) -> HeadOutput:
        u, v = split_pairs(vectors, pair_index)
        features = torch.cat([self.FEATURES[f](u, v) for f in self.features], dim=-1)
        logits = self.net(features)
        return HeadOutput(logits.squeeze(-1) if logits.shape[-1] == 1 else logits, (u, v))


HEADS = Registry("head", {
    "classifier": ClassifierHead,
    "cosine": CosineHead,
    "pair_features": PairFeaturesHead,
})


def build_head(task: TaskConfig, hidden_size: int) -> nn.Module:
    return HEADS[task.head.type](task, hidden_size)


def is_siamese(task: TaskConfig) -> bool:
    """Whether the task's pairs are encoded as two separate sentences."""
    return HEADS[task.head.type].siamese
