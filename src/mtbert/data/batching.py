"""Tokenize once, then batch by length: dynamic padding, shuffled length buckets.

A split is tokenized when it is loaded (or read from the token cache, `data/cache.py`), never
per step. Pair tasks are stored either jointly (`[CLS] a [SEP] b [SEP]`, for cross-encoders)
or as a table of distinct sentences plus an (N, 2) index (siamese heads), so a sentence that
occurs several times in a batch is encoded once. Token rows are views into flat arrays, which
may be memory-mapped: a split, its subsets and its batch plans hold row numbers and lengths,
never the tokens themselves.
"""

from __future__ import annotations

import itertools
import zlib
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from mtbert.data.readers import Example
from mtbert.tokenizer import Text, Tokenizer

# A bucket is this many batches' worth of shuffled examples, sorted by length before it is
# cut into batches: rows of a batch have similar lengths, yet batches stay random.
BUCKET_BATCHES = 50


@dataclass(eq=False)
class TokenRows:
    """Rows of token ids and token type ids: row r is `lengths[r]` values from position
    `starts[r]` of the chunks laid end to end (one chunk in memory; one per record batch of a
    memory-mapped cache file, so `ids` and `types` are never copied)."""

    ids: list[np.ndarray]  # per chunk, the token ids of its rows end to end
    types: list[np.ndarray]  # per chunk, the token type ids, aligned with `ids`
    starts: np.ndarray  # (R,) int64 position of each row's first token across the chunks
    lengths: np.ndarray  # (R,) int64

    def __post_init__(self) -> None:
        self._bounds = np.cumsum([0, *(len(chunk) for chunk in self.ids)])

    @classmethod
    def from_lists(cls, ids: Sequence[Sequence[int]], types: Sequence[Sequence[int]]) -> TokenRows:
        lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        total = int(lengths.sum())
        flat_ids = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int32, count=total)
        flat_types = np.fromiter(itertools.chain.from_iterable(types), dtype=np.int8,
                                 count=total)
        starts = np.cumsum(lengths) - lengths
        return cls([flat_ids], [flat_types], starts, lengths)

    def __len__(self) -> int:
        return len(self.starts)

    def row(self, r: int) -> tuple[np.ndarray, np.ndarray]:
        """Token ids and token type ids of row `r`."""
        start = int(self.starts[r])
        chunk = int(np.searchsorted(self._bounds, start, side="right")) - 1
        begin = start - int(self._bounds[chunk])
        end = begin + int(self.lengths[r])
        return self.ids[chunk][begin:end], self.types[chunk][begin:end]

    def take(self, rows: np.ndarray) -> TokenRows:
        """The rows `rows`, in that order (their positions are copied, not their tokens)."""
        return TokenRows(self.ids, self.types, self.starts[rows], self.lengths[rows])

    def max_id(self) -> int:
        return max(int(chunk.max(initial=0)) for chunk in self.ids)


class RowsOf(Sequence[str]):
    """`items[rows[i]]` for each i: a subset of example ids that copies row numbers only."""

    def __init__(self, items: Sequence[str], rows: np.ndarray):
        self.items, self.rows = items, rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> str:
        return self.items[int(self.rows[i])]


class RowNumbers(Sequence[str]):
    """"0", "1", ... "n-1" as ids, without a list of them."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> str:
        if not 0 <= i < self.n:
            raise IndexError(i)
        return str(i)


@dataclass
class EncodedSplit:
    """One task split, tokenized."""

    example_ids: Sequence[str]
    labels: Tensor | None  # (N,) float32
    tokens: TokenRows  # joint: a row per example; siamese: a row per distinct sentence
    pair_index: np.ndarray | None  # (N, 2) rows of `tokens`; None when joint

    def __len__(self) -> int:
        return len(self.example_ids)

    def subset(self, rows: np.ndarray) -> EncodedSplit:
        """The examples `rows`, in that order. A siamese split keeps only their sentences,
        numbered in order of first use as `encode_split` numbers them, so a subset equals
        the split encoded from those examples alone."""
        rows = np.asarray(rows, dtype=np.int64)
        labels = None if self.labels is None else self.labels[torch.from_numpy(rows)]
        ids = RowsOf(self.example_ids, rows)
        if self.pair_index is None:
            return EncodedSplit(ids, labels, self.tokens.take(rows), None)
        used, first, inverse = np.unique(self.pair_index[rows].ravel(), return_index=True,
                                         return_inverse=True)
        order = np.argsort(first)
        number = np.empty_like(order)
        number[order] = np.arange(len(order))
        return EncodedSplit(ids, labels, self.tokens.take(used[order]),
                            number[inverse.ravel()].reshape(len(rows), 2))

    def sentences(self) -> EncodedSplit:
        """The token rows as a split of their own (a siamese split's distinct sentences)."""
        return EncodedSplit(RowNumbers(len(self.tokens)), None, self.tokens, None)

    def lengths(self) -> np.ndarray:
        """Tokens each example costs the encoder."""
        if self.pair_index is None:
            return self.tokens.lengths
        return self.tokens.lengths[self.pair_index].sum(axis=1)


def encode_split(examples: Sequence[Example], tokenizer: Tokenizer,
                 siamese: bool) -> EncodedSplit:
    """Tokenize examples; `siamese` pairs are split into a table of distinct sentences."""
    labels = None
    if examples and examples[0].label is not None:
        labels = torch.tensor([e.label for e in examples], dtype=torch.float32)
    ids = [e.id for e in examples]
    if not siamese:
        texts = [joint_text(e) for e in examples]
        return EncodedSplit(ids, labels, TokenRows.from_lists(*tokenizer.encode(texts)), None)
    pair_index, sentences = sentence_table(examples, {})
    return EncodedSplit(ids, labels, TokenRows.from_lists(*tokenizer.encode(sentences)),
                        pair_index)


def joint_text(example: Example) -> Text:
    """What the tokenizer encodes for an example: its sentence, or its pair jointly."""
    return example.texts[0] if len(example.texts) == 1 else example.texts


def sentence_table(examples: Sequence[Example], table: dict[Hashable, int],
                   key: Callable[[str], Hashable] = str) -> tuple[np.ndarray, list[str]]:
    """Number each pair's sentences in `table` (new ones in order of first use), which maps
    `key(sentence)` to its number; returns the (N, 2) numbers of the examples' sentences and
    the sentences new to the table, in that order."""
    new, numbers = [], []
    for example in examples:
        for text in example.texts:
            name = key(text)
            number = table.get(name)
            if number is None:
                number = table[name] = len(table)
                new.append(text)
            numbers.append(number)
    return np.array(numbers, dtype=np.int64).reshape(len(examples), 2), new


@dataclass
class Batch:
    """Padded encoder inputs for some examples of one task."""

    input_ids: Tensor  # (R, T) R rows: examples, or distinct sentences when siamese
    attention_mask: Tensor  # (R, T)
    token_type_ids: Tensor  # (R, T)
    pair_index: Tensor | None  # (B, 2) rows of input_ids per example (siamese)
    labels: Tensor | None  # (B,)
    rows: Tensor  # (B,) positions of the examples in their split

    def __len__(self) -> int:
        return len(self.rows)

    def real_tokens(self) -> int:
        return int(self.attention_mask.sum())

    def to(self, device: torch.device | str) -> Batch:
        """The batch on `device`; host memory is pinned first so CUDA copies overlap."""
        device = torch.device(device)
        if device.type == "cpu":
            return self
        pin = device.type == "cuda"

        def move(t: Tensor | None) -> Tensor | None:
            if t is None:
                return None
            return (t.pin_memory() if pin else t).to(device, non_blocking=True)

        return Batch(move(self.input_ids), move(self.attention_mask), move(self.token_type_ids),
                     move(self.pair_index), move(self.labels), self.rows)


def collate(split: EncodedSplit, rows: Sequence[int], pad_id: int) -> Batch:
    """Pad the selected examples to the longest row of this batch only (the encoder computes
    real tokens only, so padding costs memory, not matrix products)."""
    rows = np.asarray(rows, dtype=np.int64)
    pair_index = None
    if split.pair_index is None:
        sequence_rows = rows
    else:
        sequence_rows, inverse = np.unique(split.pair_index[rows], return_inverse=True)
        pair_index = torch.from_numpy(inverse.reshape(len(rows), 2))
    width = int(split.tokens.lengths[sequence_rows].max())
    input_ids = np.full((len(sequence_rows), width), pad_id, dtype=np.int64)
    token_types = np.zeros((len(sequence_rows), width), dtype=np.int64)
    mask = np.zeros((len(sequence_rows), width), dtype=np.int64)
    for i, r in enumerate(sequence_rows):
        ids, types = split.tokens.row(r)
        input_ids[i, :len(ids)] = ids
        token_types[i, :len(ids)] = types
        mask[i, :len(ids)] = 1
    input_ids, token_types, mask = map(torch.from_numpy, (input_ids, token_types, mask))
    labels = None if split.labels is None else split.labels[torch.from_numpy(rows)]
    return Batch(input_ids, mask, token_types, pair_index, labels, torch.from_numpy(rows))


def bucketed_batches(lengths: np.ndarray, batch_size: int,
                     rng: np.random.Generator) -> list[np.ndarray]:
    """One epoch of shuffled batches whose rows have similar lengths."""
    order = rng.permutation(len(lengths))
    bucket = batch_size * BUCKET_BATCHES
    batches = []
    for start in range(0, len(order), bucket):
        chunk = order[start:start + bucket]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        batches.extend(chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size))
    return [batches[i] for i in rng.permutation(len(batches))]


def sorted_batches(lengths: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Batches in length order, for evaluation (least padding; order is restored by rows)."""
    order = np.argsort(lengths, kind="stable")
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def stable_seed(*parts: int | str) -> list[int]:
    """A seed sequence from ints and strings that is the same in every process."""
    return [p if isinstance(p, int) else zlib.crc32(p.encode()) for p in parts]


class TaskStream:
    """Endless length-bucketed batches of one task, reshuffled every pass over the data.

    With several ranks every rank plans the same global batches of `batch_size x
    world_size` rows and takes its own slice of each (the rows of a global batch have
    similar lengths, so do the slices): the ranks' slices are disjoint, together they are
    the batch one process with `batch_size x world_size` would draw, and a pass covers the
    data once across ranks. The position (`epoch`, `index`) is all its state, the same on
    every rank: a resumed run continues exactly.
    """

    def __init__(self, name: str, split: EncodedSplit, batch_size: int, seed: int, pad_id: int,
                 rank: int = 0, world_size: int = 1):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        self.name, self.split, self.batch_size = name, split, batch_size
        self.seed, self.pad_id = seed, pad_id
        self.rank, self.world_size = rank, world_size
        self._lengths = split.lengths()
        self.epoch, self.index = 0, 0
        self._batches = self._plan(0)

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.world_size

    def _plan(self, epoch: int) -> list[np.ndarray]:
        rng = np.random.default_rng(stable_seed(self.seed, self.name, epoch))
        # A global batch with fewer rows than ranks (the last one of an epoch can be) would
        # leave a rank without rows: it is skipped, at most world_size - 1 examples an epoch.
        return [np.array_split(rows, self.world_size)[self.rank] for rows in
                bucketed_batches(self._lengths, self.global_batch_size, rng)
                if len(rows) >= self.world_size]

    def __len__(self) -> int:
        """Batches per pass over the data."""
        return len(self._batches)

    def next(self) -> Batch:
        if self.index >= len(self._batches):
            self.epoch, self.index = self.epoch + 1, 0
            self._batches = self._plan(self.epoch)
        rows = self._batches[self.index]
        self.index += 1
        return collate(self.split, rows, self.pad_id)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self._batches = self._plan(self.epoch)
