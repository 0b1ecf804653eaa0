"""Sparse mixture-of-experts feed-forward blocks inside minBERT.

The FFN of every `every`-th encoder layer becomes E experts, each a BERT FFN, and a router
sends each token to its top k (Shazeer et al. 2017, "Outrageously Large Neural Networks: The
Sparsely-Gated Mixture-of-Experts Layer"; the layer every other block as in GShard and
Switch). Parts, each following its paper:

- Noisy top-k gating (Shazeer et al. 2017): in training the router's logits get Gaussian noise
  scaled by softplus(x W_noise); W_g and W_noise start at zero, as in the paper.
- Combine weights: the kept probabilities renormalised to sum to 1 (Shazeer et al.'s softmax
  over the kept logits). Their gradient is that of the un-normalised probabilities divided by
  their sum (the sum is detached), so a top-1 router still learns from the task's loss, as
  Switch's does (Fedus et al. 2022), where a plain renormalisation would give it weight 1 and
  no gradient.
- Capacity (Switch): in training an expert takes at most ceil(factor * N * k / E) of the N
  tokens' N * k assignments, first choices before second choices, then in token order; the
  rest are dropped (the token passes through the residual) and counted. At inference nothing
  is dropped, so a prediction does not depend on the rest of its batch.
- Auxiliary losses, summed over the MoE layers: Switch's load balancing E * sum_i f_i P_i
  (f_i: share of assignments routed to expert i, P_i: mean router probability of i; 1 when
  both are uniform) and the router z-loss mean(logsumexp(logits)^2) (Zoph et al. 2022,
  "ST-MoE: Designing Stable and Transferable Sparse Expert Models").
- Auxiliary terms are returned with the pass (`SideOutputs`), never kept on the module: a
  training pass adds them and the expert load to the pass's `side`, and leaves no graph
  behind (`mtbert.auxiliary`: they join the final loss after weighting and distillation).
- Sparse upcycling (Komatsuzaki et al. 2023, "Sparse Upcycling: Training Mixture-of-Experts
  from Dense Checkpoints"): every expert starts as a copy of the pretrained dense FFN, and
  since the combine weights sum to 1, the model computes what the dense model computes.

`MixtureOfExperts` replaces a layer's whole `FeedForward` (`BertLayer.feed_forward`); each
expert is a `FeedForward` and runs through the `projection` hooks, so low-rank adapters
(LoRA, MTL-LoRA) on `intermediate` / `output` adapt every expert of the layer by the same
update, and fold into each expert's weights.

Dispatch works on the encoder's packed (N, H) tokens: the N * k assignments are sorted by
expert (a permutation), each expert runs one pair of matrix products on its own contiguous
rows, and the inverse permutation puts the weighted outputs back, where each token's k rows
are summed. Both permutations are gathers, forward and backward. The loop runs over experts,
never over tokens.

Routing (`MoEConfig.routing`): `token`, a learned gate on each token's hidden state; `task`
(Task-MoE, Kudugunta et al. 2021, "Beyond Distillation: Task-level Mixture-of-Experts for
Efficient Inference"), learned per-task logits, so all of a task's tokens take the same
experts and the task's path extracts to a dense encoder (`extract_task_encoder`);
`task_aware` (Gupta et al. 2022, "Sparsely Activated Mixture-of-Experts are Robust Multi-Task
Learners"), a gate on the token and a task embedding: W [x; e_t] = W_x x + W_e e_t, the token
gate plus a per-task term. The encoder knows no tasks: the per-task logits come from a
`TaskConditioning` through the `router_logits` hook, and the experts and the token gate are
encoder (shared) parameters.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtbert.auxiliary import SideOutputs
from mtbert.model.bert import BertConfig, BertModel, EncoderHooks, FeedForward, TokenLayout
from mtbert.model.conditioning.base import TaskConditioning

if TYPE_CHECKING:
    from mtbert.config import MoEConfig


# ---------------------------------------------------------------- routing arithmetic


def top_k_gates(logits: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """(N, E) router logits -> probabilities (N, E), chosen experts (N, k) and combine
    weights (N, k): the kept probabilities over their (detached) sum."""
    probs = logits.softmax(dim=-1)
    kept, experts = probs.topk(k, dim=-1)
    return probs, experts, kept / kept.sum(dim=-1, keepdim=True).detach()


def expert_capacity(tokens: int, experts: int, k: int, factor: float) -> int:
    """How many assignments one expert takes: ceil(factor * tokens * k / experts)."""
    return math.ceil(factor * tokens * k / experts)


def load_balancing_loss(probs: Tensor, counts: Tensor) -> Tensor:
    """Switch's E * sum_i f_i P_i: (N, E) router probabilities, (E,) assignments per expert."""
    share = counts.to(probs.dtype) / counts.sum()
    return probs.shape[-1] * (share * probs.mean(dim=0)).sum()


def router_z_loss(logits: Tensor) -> Tensor:
    """ST-MoE's mean over tokens of logsumexp(logits)^2: keeps router logits small."""
    return logits.logsumexp(dim=-1).square().mean()


# ---------------------------------------------------------------- the layer


class MixtureOfExperts(nn.Module):
    """E experts (`FeedForward`s), top-k routing with capacity: a layer's feed-forward block
    (the `FeedForward` interface). Given a pass's `side` it adds the auxiliary losses
    (`moe_balance`, `moe_z`, weighted by `balance_weight`, `z_weight`) and the expert load
    (`moe_load.LAYER`, `moe_dropped.LAYER`). `token_gate`: the router reads each token (W_g,
    and W_noise if `noisy`); without it the logits come from the task alone (`router_logits`
    hook)."""

    def __init__(self, config: BertConfig, *, experts: int, top_k: int,
                 capacity_factor: float | None, token_gate: bool, noisy: bool,
                 balance_weight: float, z_weight: float):
        super().__init__()
        if not 1 <= top_k <= experts:
            raise ValueError(f"top_k ({top_k}) must be between 1 and experts ({experts})")
        self.top_k, self.capacity_factor = top_k, capacity_factor
        self.balance_weight, self.z_weight = balance_weight, z_weight
        self.experts = nn.ModuleList(FeedForward(config) for _ in range(experts))
        self.gate = self.noise = None
        if token_gate:
            self.gate = nn.Linear(config.hidden_size, experts, bias=False)
            nn.init.zeros_(self.gate.weight)
            if noisy:
                self.noise = nn.Linear(config.hidden_size, experts, bias=False)
                nn.init.zeros_(self.noise.weight)

    def forward(self, x: Tensor, layout: TokenLayout, layer: int, hooks: EncoderHooks | None,
                side: SideOutputs | None = None) -> Tensor:
        """(N, H) -> (N, H). Routes the real tokens only: rows that `TokenLayout.packed` adds
        to round N up (bf16 on CPUs) would take capacity and enter the load statistics and
        auxiliary losses. Their output rows are zeros (they are dropped before attention and
        at the end)."""
        real = len(x) if layout.tokens is None else layout.tokens
        y = self.route(x[:real], layer, hooks, side)
        return y if real == len(x) else torch.cat([y, y.new_zeros(len(x) - real, y.shape[1])])

    def route(self, x: Tensor, layer: int, hooks: EncoderHooks | None,
              side: SideOutputs | None = None) -> Tensor:
        """(N, H) tokens -> (N, H): each token's experts, weighted."""
        task_logits = None if hooks is None else hooks.router_logits(layer, x)
        logits = self.logits(x, task_logits, layer)  # (N, E)
        noisy = logits
        if self.noise is not None and self.training:
            noisy = logits + torch.randn_like(logits) * F.softplus(self.noise(x))
        probs, experts, weights = top_k_gates(noisy, self.top_k)
        capacity = None
        if self.training and self.capacity_factor is not None:
            capacity = expert_capacity(len(x), len(self.experts), self.top_k,
                                       self.capacity_factor)
        y, counts, kept = self.dispatch(x, experts, weights, capacity, layer, hooks)
        if side is not None:  # what the losses and the logs need; inference skips the work
            assignments = experts.numel()
            if logits.requires_grad:  # a frozen router (train --from): they train nothing
                side.add("moe_balance", load_balancing_loss(probs, counts), self.balance_weight)
                side.add("moe_z", router_z_loss(logits), self.z_weight)
            side.statistics[f"moe_load.{layer}"] = counts / assignments
            side.statistics[f"moe_dropped.{layer}"] = 1 - kept.sum() / assignments
        return y

    def linear_maps(self, name: str) -> list[nn.Linear]:
        return [linear for expert in self.experts for linear in expert.linear_maps(name)]

    def logits(self, x: Tensor, task_logits: Tensor | None, layer: int) -> Tensor:
        if self.gate is None:
            if task_logits is None:
                raise ValueError(f"layer {layer}: task-routed experts need a task; "
                                 "run the encoder with a task's hooks")
            return task_logits.expand(len(x), len(self.experts))
        logits = self.gate(x)
        return logits if task_logits is None else logits + task_logits

    def dispatch(self, x: Tensor, experts: Tensor, weights: Tensor, capacity: int | None,
                 layer: int = 0, hooks: EncoderHooks | None = None
                 ) -> tuple[Tensor, Tensor, Tensor]:
        """Run each expert on its tokens (through `layer`'s projection hooks). (N, H),
        (N, k) expert ids, (N, k) weights -> (N, H) combined output, (E,) assignments routed
        and (E,) kept per expert."""
        n, k = experts.shape
        flat = experts.t().reshape(-1)  # (k N,) choice-major: first choices come first
        order = flat.argsort(stable=True)  # assignments grouped by expert, priority kept
        counts = torch.bincount(flat, minlength=len(self.experts))
        kept = counts if capacity is None else counts.clamp(max=capacity)
        # Row j * N + t of the repeated tokens is token t's (j+1)-th choice.
        grouped = permute_rows(x.repeat(k, 1) if k > 1 else x, order)  # (k N, H)
        pieces, start = [], 0
        for expert, routed, keep in zip(self.experts, counts.tolist(), kept.tolist()):
            if keep:
                pieces.append(expert.transform(grouped[start:start + keep], layer, hooks))
            if routed > keep:  # dropped: the expert adds nothing, the residual carries on
                pieces.append(x.new_zeros(routed - keep, x.shape[-1]))
            start += routed
        gates = weights.t().reshape(-1)[order, None]  # (k N, 1)
        combined = permute_rows(torch.cat(pieces) * gates, order.argsort())  # (k N, H)
        return combined.view(k, n, -1).sum(0), counts, kept


class _PermuteRows(torch.autograd.Function):
    """x[order] for a permutation `order`, whose backward is the inverse permutation's gather
    (autograd's own `index_select` backward is a scatter-add, the largest single cost of an
    MoE layer on CPU under `torch.profiler`)."""

    @staticmethod
    def forward(ctx, x: Tensor, order: Tensor) -> Tensor:
        ctx.save_for_backward(order)
        return x.index_select(0, order)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        (order,) = ctx.saved_tensors
        return grad.index_select(0, order.argsort()), None


def permute_rows(x: Tensor, order: Tensor) -> Tensor:
    """(M, H) rows in the order of the permutation `order` (M,)."""
    return _PermuteRows.apply(x, order)


# ---------------------------------------------------------------- task routers


class TaskRouterLogits(TaskConditioning):
    """Task-MoE: per task and MoE layer, E learned router logits (the task's gate), drawn
    from N(0, initializer_range) so that tasks start on different experts."""

    def __init__(self, bert_config: BertConfig, task_names: list[str], layers: list[int],
                 config: MoEConfig):
        super().__init__(task_names)
        self.position = {layer: i for i, layer in enumerate(layers)}
        shape, std = (len(layers), config.experts), bert_config.initializer_range
        self.logits = nn.ParameterDict(
            {task: nn.Parameter(torch.randn(shape) * std) for task in task_names})

    def router_logits(self, task: str, layer: int, hidden: Tensor) -> Tensor:
        return self.logits[task][self.position[layer]]  # (E,)

    def added_parameters(self) -> int:
        return sum(p.numel() for p in self.logits.values())


class TaskEmbeddingRouter(TaskConditioning):
    """Task-aware gate: a task embedding e_t (d, from N(0, initializer_range)) and, per MoE
    layer, the task half W_e (E, d) of the gate on [x; e_t], zero at the start like W_g."""

    def __init__(self, bert_config: BertConfig, task_names: list[str], layers: list[int],
                 config: MoEConfig):
        super().__init__(task_names)
        self.position = {layer: i for i, layer in enumerate(layers)}
        size, std = config.task_embedding_size, bert_config.initializer_range
        self.embeddings = nn.ParameterDict(
            {task: nn.Parameter(torch.randn(size) * std) for task in task_names})
        self.projections = nn.Parameter(torch.zeros(len(layers), config.experts, size))

    def router_logits(self, task: str, layer: int, hidden: Tensor) -> Tensor:
        return self.projections[self.position[layer]] @ self.embeddings[task]  # (E,)

    def added_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


@dataclass(frozen=True)
class Routing:
    token_gate: bool  # the experts' own router reads each token
    task_router: type[TaskConditioning] | None  # adds per-task logits through the hooks


ROUTINGS = {"token": Routing(True, None), "task": Routing(False, TaskRouterLogits),
            "task_aware": Routing(True, TaskEmbeddingRouter)}


# ---------------------------------------------------------------- building and extracting


def moe_layer_indices(num_layers: int, every: int) -> list[int]:
    """The every-th layers, counting from 1: every=2 of 6 layers gives 1, 3, 5."""
    return [index for index in range(num_layers) if (index + 1) % every == 0]


def upcycle(encoder: BertModel, config: MoEConfig, task_names: Sequence[str]
            ) -> TaskConditioning | None:
    """Turn the FFN of every `config.every`-th layer of `encoder` (in place) into experts that
    copy it (sparse upcycling); returns the task router of `config.routing`, if it has one."""
    bert_config = encoder.config
    layers = moe_layer_indices(bert_config.num_hidden_layers, config.every)
    if not layers:
        raise ValueError(f"every ({config.every}) is more than the backbone's "
                         f"{bert_config.num_hidden_layers} layers: no layer would get experts")
    routing = ROUTINGS[config.routing]
    for index in layers:
        layer = encoder.layers[index]
        moe = MixtureOfExperts(
            bert_config, experts=config.experts, top_k=config.top_k,
            capacity_factor=config.capacity_factor, token_gate=routing.token_gate,
            noisy=config.noisy_gating, balance_weight=config.balance_weight,
            z_weight=config.z_weight)
        for expert in moe.experts:
            expert.load_state_dict(layer.feed_forward.state_dict())
        layer.feed_forward = moe
    if routing.task_router is None:
        return None
    return routing.task_router(bert_config, list(task_names), layers, config)


def experts_of(module: nn.Module) -> list[MixtureOfExperts]:
    return [m for m in module.modules() if isinstance(m, MixtureOfExperts)]


def extract_task_encoder(encoder: BertModel, router: TaskConditioning, task: str) -> BertModel:
    """A dense `BertModel` that computes what the Task-MoE `encoder` computes for `task`
    at inference: each MoE layer's FFN is the expert the task's logits choose (top-1 only:
    top-k > 1 mixes k experts, which no single dense FFN of the same width computes)."""
    if not isinstance(router, TaskRouterLogits):
        raise ValueError("only task-routed experts (model.moe.routing: task) extract to a "
                         "dense encoder; token routing depends on each token")
    state = encoder.state_dict()
    for index, layer in enumerate(encoder.layers):
        moe = layer.feed_forward
        if not isinstance(moe, MixtureOfExperts):
            continue
        if moe.top_k != 1:
            raise ValueError(f"top_k is {moe.top_k}: a task's path is a mix of "
                             "experts, not one dense FFN; extraction needs top_k 1")
        logits = router.router_logits(task, index, None)
        choice = int(top_k_gates(logits[None], 1)[1])
        block = f"layers.{index}.feed_forward."
        chosen = f"{block}experts.{choice}."
        state = {block + k.removeprefix(chosen) if k.startswith(chosen) else k: v
                 for k, v in state.items() if k.startswith(chosen) or not k.startswith(block)}
    dense = BertModel(encoder.config)
    dense.load_state_dict(state)
    return dense.train(encoder.training)
