"""minBERT: the BERT encoder (Devlin et al. 2019, "BERT: Pre-training of Deep Bidirectional
Transformers for Language Understanding"), written bottom-up in plain PyTorch.

Post-LN transformer layers, absolute position embeddings, attention through
`scaled_dot_product_attention`. With no task conditioning it reproduces Hugging Face's
`BertModel` to float precision; `model/loading.py` maps checkpoint key names onto ours.

The layers compute only a batch's real tokens, packed into one (tokens, H) matrix, and pad
just around attention (`TokenLayout`): padding costs no matrix products.

Task conditioning (task embeddings, PALs, LoRA) plugs in through `EncoderHooks`: the encoder
calls the hooks at fixed points and knows nothing else about tasks. A layer's feed-forward
block is a module of its own, `BertLayer.feed_forward`: a `FeedForward`, or what replaces it
whole (a mixture of experts, `model/moe.py`). A forward pass may hand the layers a
`SideOutputs` (`mtbert.auxiliary`) to add auxiliary loss terms and statistics to; no layer
keeps them.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtbert.auxiliary import SideOutputs


@dataclass
class BertConfig:
    """The subset of a Hugging Face BERT `config.json` that defines the network."""

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    initializer_range: float = 0.02

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be a multiple of "
                f"num_attention_heads ({self.num_attention_heads})"
            )
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(
                f"hidden_act {self.hidden_act!r} is not supported; known: {sorted(ACTIVATIONS)}"
            )

    @classmethod
    def from_dict(cls, values: dict) -> BertConfig:
        """Build from a `config.json` dict, ignoring keys that do not shape the network."""
        if values.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError("only absolute position embeddings are supported")
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})

    @classmethod
    def from_json(cls, path: str | Path) -> BertConfig:
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))

    def to_hf_dict(self) -> dict:
        """A `config.json` that `transformers.BertModel` reads."""
        return {"architectures": ["BertModel"], "model_type": "bert", **asdict(self)}


def _gelu_tanh(x: Tensor) -> Tensor:
    return F.gelu(x, approximate="tanh")


ACTIVATIONS = {"gelu": F.gelu, "gelu_new": _gelu_tanh, "gelu_pytorch_tanh": _gelu_tanh,
               "relu": F.relu}


def dropout(x: Tensor, p: float) -> Tensor:
    """Inverted dropout (Srivastava et al. 2014) with a cheaper mask on CPU.

    `F.dropout` draws one Bernoulli number per element from the CPU generator, ~9% of a
    MiniLM training step here. This draws one 64-bit word per 4 elements and keeps an element
    when 15 of its 16 bits, read as an integer, are >= round(p * 2^15): the drop probability is
    p to within 2^-16. The mask comes from torch's global generator, so runs stay reproducible.
    Other devices use `F.dropout`.
    """
    if p == 0.0:
        return x
    if x.device.type != "cpu":
        return F.dropout(x, p, training=True)
    count = x.numel()
    words = torch.empty((count + 3) // 4, dtype=torch.int64).random_()  # 63 random bits
    draws = words.view(torch.int16)[:count].view(x.shape) & 0x7FFF  # 15 bits each
    keep = draws >= round(p * 2**15)
    return x * keep.to(x.dtype).mul_(1.0 / (1.0 - p))


class Dropout(nn.Module):
    """`dropout` as a module: active in training mode only."""

    def __init__(self, p: float):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        return dropout(x, self.p) if self.training else x

    def extra_repr(self) -> str:
        return f"p={self.p}"


BF16_CPU_ROW_MULTIPLE = 64  # see `BertModel.row_multiple`


class TokenLayout:
    """Where a padded (B, T) batch's real tokens are, so the encoder can work on those alone.

    The encoder's layers see hidden states as a 2-D (N, H) matrix of the N tokens they
    compute: token-wise work (projections, feed-forward, LayerNorm, dropout) is done for real
    tokens only, and `attention` scatters them into the padded (B, T) grid and back. This is
    the "unpadding" MosaicBERT uses (Portes et al. 2023, "MosaicBERT: A Bidirectional Encoder
    Optimized for Fast Pretraining"). Results equal the padded computation's at every real
    token; padded positions come out as zeros.
    """

    def __init__(self, batch: int, length: int, index: Tensor | None, mask: Tensor | None,
                 tokens: int | None = None):
        self.batch, self.length = batch, length
        self.index = index  # (N,) positions in the flattened (B * T) grid; None: all of them
        self.mask = mask  # (B, 1, 1, T) keys a query may attend to; None: every key
        # the first `tokens` rows of `index` are the real tokens; rows after them repeat the
        # first token so that N is a multiple of `packed`'s `row_multiple`
        self.tokens = tokens if tokens is not None or index is None else index.numel()

    @classmethod
    def packed(cls, attention_mask: Tensor, row_multiple: int = 1) -> TokenLayout:
        """Real tokens only; no index and no mask at all when the batch has no padding.

        `row_multiple` > 1 rounds the computed rows N up to a multiple of it with copies of
        the first token, which only fill rows: they are dropped before attention and at the
        end, so results and gradients are those of the real tokens.
        """
        batch, length = attention_mask.shape
        full = bool(attention_mask.all())
        if full and (batch * length) % row_multiple == 0:
            return cls(batch, length, None, None)
        index = attention_mask.flatten().nonzero().squeeze(1)
        tokens = index.numel()
        index = torch.cat([index, index[:1].expand(-tokens % row_multiple)])
        return cls(batch, length, index, None if full else attention_mask[:, None, None, :].bool(),
                   tokens)

    @classmethod
    def padded(cls, attention_mask: Tensor) -> TokenLayout:
        """Every position, padding included, with the mask always applied: a computation that
        does not depend on where the padding is (what an exported graph needs)."""
        batch, length = attention_mask.shape
        return cls(batch, length, None, attention_mask[:, None, None, :].bool())

    def pack(self, x: Tensor) -> Tensor:
        """(B, T, ...) -> (N, ...): the computed tokens."""
        x = x.reshape(self.batch * self.length, *x.shape[2:])
        return x if self.index is None else x.index_select(0, self.index)

    def unpack(self, x: Tensor) -> Tensor:
        """(N, C) -> (B, T, C), zeros at the positions not computed."""
        if self.index is not None:
            grid = x.new_zeros(self.batch * self.length, x.shape[-1])
            x = grid.index_copy(0, self.index[:self.tokens], x[:self.tokens])
        return x.reshape(self.batch, self.length, x.shape[-1])

    def attention(self, q: Tensor, k: Tensor, v: Tensor, heads: int, dropout_p: float) -> Tensor:
        """Multi-head scaled dot-product attention within each sequence: (N, D) x 3 -> (N, D)."""
        B, T, D = self.batch, self.length, q.shape[-1]
        q, k, v = (self.unpack(t).view(B, T, heads, D // heads).transpose(1, 2)
                   for t in (q, k, v))  # (B, heads, T, D / heads)
        if dropout_p and q.device.type == "cpu":
            y = attention_with_dropout(q, k, v, self.mask, dropout_p)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask, dropout_p=dropout_p)
        return self.pack(y.transpose(1, 2).reshape(B, T, D))


def attention_with_dropout(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None,
                           dropout_p: float) -> Tensor:
    """dropout(softmax(q k^T / sqrt(d), keys outside `mask` excluded)) v: what
    `scaled_dot_product_attention` computes, with `dropout`'s cheaper mask.

    On CPUs that function has no fused kernel with dropout and falls back to its generic
    path, which draws a Bernoulli number per score and guards every (B, heads, T, T) score
    row against having all its keys masked (isneginf, all, where over every score: a large
    share of attention's time once the matrix products run in bf16). No row here can be:
    each sequence has a real token. (B, heads, T, d) x 3 -> (B, heads, T, d).
    """
    scores = q @ k.transpose(-1, -2)  # (B, heads, T, T)
    scores.mul_(q.shape[-1] ** -0.5)
    if mask is not None:
        scores.masked_fill_(mask.logical_not(), float("-inf"))
    return dropout(scores.softmax(-1), dropout_p) @ v


class EncoderHooks(nn.Module):
    """Points where a task-conditioning module may change the encoder's computation.

    Each default is the identity, so a subclass overrides only the hooks it needs. Hidden
    states are (N, H): the N tokens the encoder computes (see `TokenLayout`), H hidden size.
    """

    def input_embeddings(self, embeddings: Tensor) -> Tensor:
        """(N, H) summed input embeddings, before LayerNorm."""
        return embeddings

    def attention_qkv(self, layer: int, q: Tensor, k: Tensor, v: Tensor
                      ) -> tuple[Tensor, Tensor, Tensor]:
        """(N, H) each: queries, keys and values of `layer` before the split into heads."""
        return q, k, v

    def attention_branch(self, layer: int, hidden: Tensor, layout: TokenLayout
                         ) -> Tensor | None:
        """Extra (N, H) term added beside self-attention's output (PALs), or None.

        `hidden` is the layer's input; `layout.attention` attends within each sequence.
        """
        return None

    def projection(self, layer: int, name: str, x: Tensor, y: Tensor) -> Tensor:
        """(N, out) output `y` of `layer`'s linear map `name` (a key of `PROJECTIONS`) on its
        (N, in) input `x`; adapters (LoRA) add a low-rank term."""
        return y


    def router_logits(self, layer: int, hidden: Tensor) -> Tensor | None:
        """Task-dependent router logits, (E,) or (N, E), added to a mixture-of-experts
        layer's own (see `model/moe.py`); None: the layer routes on the tokens alone."""
        return None


class ChainedHooks(EncoderHooks):
    """Several `EncoderHooks` at once (task conditioning and task routing): each hook runs
    them in order; extra terms (attention branches, router logits) add up."""

    def __init__(self, parts: list[EncoderHooks]):
        super().__init__()
        self.parts = parts  # a plain list: the parts' owners register their parameters

    def input_embeddings(self, embeddings: Tensor) -> Tensor:
        for part in self.parts:
            embeddings = part.input_embeddings(embeddings)
        return embeddings

    def attention_qkv(self, layer: int, q: Tensor, k: Tensor, v: Tensor
                      ) -> tuple[Tensor, Tensor, Tensor]:
        for part in self.parts:
            q, k, v = part.attention_qkv(layer, q, k, v)
        return q, k, v

    def attention_branch(self, layer: int, hidden: Tensor, layout: TokenLayout
                         ) -> Tensor | None:
        return _sum(part.attention_branch(layer, hidden, layout) for part in self.parts)

    def router_logits(self, layer: int, hidden: Tensor) -> Tensor | None:
        return _sum(part.router_logits(layer, hidden) for part in self.parts)

    def projection(self, layer: int, name: str, x: Tensor, y: Tensor) -> Tensor:
        for part in self.parts:
            y = part.projection(layer, name, x, y)
        return y


def _sum(terms) -> Tensor | None:
    """The sum of the terms that are not None; None if all are."""
    present = [t for t in terms if t is not None]
    return sum(present[1:], present[0]) if present else None


# The linear maps of a layer that `EncoderHooks.projection` sees (adapters fold into their
# weights, `BertLayer.linear_maps`): self-attention's two, then the feed-forward block's two.
ATTENTION_PROJECTIONS = {"qkv": "qkv", "attention_output": "output"}  # name -> attribute
FEED_FORWARD_PROJECTIONS = ("intermediate", "output")
PROJECTIONS = (*ATTENTION_PROJECTIONS, *FEED_FORWARD_PROJECTIONS)


def project(linear: nn.Linear, x: Tensor, layer: int, name: str,
            hooks: EncoderHooks | None) -> Tensor:
    """`linear(x)`, passed through the `projection` hook when there are hooks."""
    y = linear(x)
    return y if hooks is None else hooks.projection(layer, name, x, y)


class BertEmbeddings(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size,
                                            padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids: Tensor, token_type_ids: Tensor, layout: TokenLayout,
                hooks: EncoderHooks | None) -> Tensor:
        """(B, T) ids -> (N, H) embeddings of the tokens `layout` computes."""
        positions = torch.arange(layout.length, device=input_ids.device).expand_as(input_ids)
        x = (self.word_embeddings(layout.pack(input_ids))
             + self.position_embeddings(layout.pack(positions))
             + self.token_type_embeddings(layout.pack(token_type_ids)))  # (N, H)
        if hooks is not None:
            x = hooks.input_embeddings(x)
        return self.dropout(self.norm(x))


class BertSelfAttention(nn.Module):
    """Multi-head self-attention; Q, K and V come from one fused projection."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.output = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout_p = config.attention_probs_dropout_prob

    def forward(self, x: Tensor, layout: TokenLayout, layer: int,
                hooks: EncoderHooks | None) -> Tensor:
        q, k, v = project(self.qkv, x, layer, "qkv", hooks).split(x.shape[-1], dim=-1)  # (N, H)
        if hooks is not None:
            q, k, v = hooks.attention_qkv(layer, q, k, v)
        y = layout.attention(q, k, v, self.num_heads, self.dropout_p if self.training else 0.0)
        return project(self.output, y, layer, "attention_output", hooks)


class FeedForward(nn.Module):
    """BERT's position-wise FFN: intermediate (H -> I), activation, output (I -> H).

    The interface of a layer's feed-forward block, which a mixture of experts
    (`model/moe.py`) implements too: `forward(x, layout, layer, hooks, side)` maps the
    (N, H) tokens to (N, H), `linear_maps(name)` lists the linear maps the `projection` hook
    `name` adapts (what `fold` adds an adapter's weight to).
    """

    def __init__(self, config: BertConfig):
        super().__init__()
        self.intermediate = nn.Linear(config.hidden_size, config.intermediate_size)
        self.output = nn.Linear(config.intermediate_size, config.hidden_size)
        self.act = ACTIVATIONS[config.hidden_act]

    def forward(self, x: Tensor, layout: TokenLayout, layer: int, hooks: EncoderHooks | None,
                side: SideOutputs | None = None) -> Tensor:
        """(N, H) -> (N, H), before dropout and the residual (a per-token map: `layout` only
        says which rows are real tokens; a dense FFN adds nothing to `side`)."""
        return self.transform(x, layer, hooks)

    def transform(self, x: Tensor, layer: int, hooks: EncoderHooks | None) -> Tensor:
        """The FFN of each row of `x` (M, H) -> (M, H), through the `projection` hooks."""
        h = self.act(project(self.intermediate, x, layer, "intermediate", hooks))  # (M, I)
        return project(self.output, h, layer, "output", hooks)

    def linear_maps(self, name: str) -> list[nn.Linear]:
        return [getattr(self, name)]


class BertLayer(nn.Module):
    """Post-LN block: x = LN(x + attention(x)); x = LN(x + FFN(x))."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.attention = BertSelfAttention(config)
        self.attention_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.feed_forward = FeedForward(config)
        self.output_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = Dropout(config.hidden_dropout_prob)

    def forward(self, x: Tensor, layout: TokenLayout, layer: int,
                hooks: EncoderHooks | None, side: SideOutputs | None = None) -> Tensor:
        attended = self.dropout(self.attention(x, layout, layer, hooks))
        if hooks is not None:
            branch = hooks.attention_branch(layer, x, layout)
            if branch is not None:
                attended = attended + branch
        x = self.attention_norm(x + attended)
        fed = self.feed_forward(x, layout, layer, hooks, side)
        return self.output_norm(x + self.dropout(fed))

    def linear_maps(self, name: str) -> list[nn.Linear]:
        """The linear maps of projection `name` (of `PROJECTIONS`): one, or one per expert."""
        if name in ATTENTION_PROJECTIONS:
            return [getattr(self.attention, ATTENTION_PROJECTIONS[name])]
        return self.feed_forward.linear_maps(name)



def current_key(key: str, prefix: str = "") -> str:
    """A `BertModel` state-dict key (under `prefix`) as it is named now: weights saved
    before the feed-forward block was a module, `layers.N.intermediate.*`,
    `layers.N.output.*` and (mixture of experts) `layers.N.moe.*`, are under
    `layers.N.feed_forward.`; other keys are unchanged."""
    layer = re.match(rf"{re.escape(prefix)}layers\.\d+\.", key)
    if layer is None:
        return key
    head, rest = key[:layer.end()], key[layer.end():]
    if rest.startswith(("intermediate.", "output.")):
        return f"{head}feed_forward.{rest}"
    return f"{head}feed_forward.{rest[4:]}" if rest.startswith("moe.") else key


class BertPooler(nn.Module):
    """dense + tanh on the [CLS] token."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, hidden: Tensor) -> Tensor:
        return torch.tanh(self.dense(hidden[:, 0]))


class BertModel(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.layers = nn.ModuleList(BertLayer(config) for _ in range(config.num_hidden_layers))
        self.pooler = BertPooler(config)
        self.apply(self._init_weights)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """Checkpoints from before the FFN was a module load too (`current_key`)."""
        for key in [k for k in state_dict if k.startswith(prefix)]:
            if (renamed := current_key(key, prefix)) != key:
                state_dict[renamed] = state_dict.pop(key)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _init_weights(self, module: nn.Module) -> None:
        """BERT's initialisation, for weights a checkpoint does not provide."""
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=std)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=std)
            if module.padding_idx is not None:
                module.weight.data[module.padding_idx].zero_()

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                token_type_ids: Tensor | None = None, hooks: EncoderHooks | None = None,
                side: SideOutputs | None = None) -> tuple[Tensor, Tensor]:
        """Returns (last hidden states (B, T, H), pooled [CLS] (B, H)).

        `attention_mask` is (B, T) with 1 for real tokens and 0 for padding; hidden states at
        padding are zeros. Given `side`, layers add this pass's auxiliary terms and
        statistics to it (mixture-of-experts losses and expert load).
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        layout = TokenLayout.packed(attention_mask, self.row_multiple(input_ids.device))
        hidden = self.encode(input_ids, token_type_ids, layout, hooks, side)
        return hidden, self.pooler(hidden)

    def row_multiple(self, device: torch.device) -> int:
        """How many rows the packed tokens are rounded up to (`TokenLayout.packed`).

        bf16 matrix products on CPUs go through oneDNN, which JIT-compiles a kernel for every
        new shape (milliseconds each): packed batches have a new token count almost every
        step, so bf16 steps paid that again and again. Rounding to `BF16_CPU_ROW_MULTIPLE`
        rows leaves a few dozen shapes, built once. fp32 products need no such kernels and
        keep the exact count.
        """
        bf16 = self.embeddings.word_embeddings.weight.dtype == torch.bfloat16 or (
            torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16)
        return BF16_CPU_ROW_MULTIPLE if device.type == "cpu" and bf16 else 1

    def encode(self, input_ids: Tensor, token_type_ids: Tensor | None, layout: TokenLayout,
               hooks: EncoderHooks | None = None, side: SideOutputs | None = None) -> Tensor:
        """Last hidden states (B, T, H) of the tokens `layout` computes (zeros elsewhere)."""
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        x = self.embeddings(input_ids, token_type_ids, layout, hooks)  # (N, H)
        for index, layer in enumerate(self.layers):
            x = layer(x, layout, index, hooks, side)
        return layout.unpack(x)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def mean_pool(hidden: Tensor, attention_mask: Tensor) -> Tensor:
    """Average of the real tokens' hidden states: (B, T, H), (B, T) -> (B, H)."""
    weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)
