"""BERT's WordPiece tokenizer on the Rust `tokenizers` library.

Built from the checkpoint's `tokenizer.json` when there is one, else from `vocab.txt` with
BERT's normalizer (lowercasing as `tokenizer_config.json` says), pre-tokenizer and
`[CLS] a [SEP] b [SEP]` template. Token ids match `transformers.BertTokenizerFast`.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer as RustTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors

Text = str | tuple[str, str]
WORDS_KEPT = 1 << 18  # distinct words whose ids `encode_flat` remembers (~150 B each)


class Tokenizer:
    """Turns sentences or sentence pairs into token ids and token type ids (no padding)."""

    def __init__(self, backend: RustTokenizer, max_length: int = 128):
        self.backend = backend
        self.backend.no_padding()
        self.max_length = max_length
        self.truncated = 0
        self.pad_id = self._special_id("[PAD]")
        self.cls_id = self._special_id("[CLS]")
        self.sep_id = self._special_id("[SEP]")

    @classmethod
    def from_folder(cls, folder: str | Path, max_length: int = 128) -> Tokenizer:
        folder = Path(folder)
        if (folder / "tokenizer.json").is_file():
            backend = RustTokenizer.from_file(str(folder / "tokenizer.json"))
        elif (folder / "vocab.txt").is_file():
            backend = wordpiece_from_vocab(folder / "vocab.txt", lowercase=_lowercases(folder))
        else:
            raise ValueError(f"{folder} has neither tokenizer.json nor vocab.txt")
        return cls(backend, max_length)

    def _special_id(self, token: str) -> int:
        token_id = self.backend.token_to_id(token)
        if token_id is None:
            raise ValueError(f"the vocabulary has no {token} token")
        return token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @max_length.setter
    def max_length(self, value: int) -> None:
        if value < 8:
            raise ValueError(f"max_length must be at least 8, got {value}")
        self._max_length = value
        self.backend.enable_truncation(value, strategy="longest_first")

    def encode(self, texts: Sequence[Text]) -> tuple[list[list[int]], list[list[int]]]:
        """Token ids and token type ids of sentences or (a, b) pairs, truncated, unpadded
        (`truncated` counts the texts cut to `max_length` so far)."""
        encodings = self.backend.encode_batch(list(texts))
        self.truncated += sum(1 for e in encodings if e.overflowing)
        return [e.ids for e in encodings], [e.type_ids for e in encodings]

    def encode_flat(self, texts: Sequence[Text], known_words: dict[str, bytes] | None = None,
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """What `encode` gives, laid end to end: token ids (int32), token type ids (int8) and
        each text's length, without a Python list per text.

        Most of `encode`'s time is the Rust pipeline's per-text work (the normalizer above
        all). BERT's normalizer and pre-tokenizer act on each character and split at spaces,
        and WordPiece acts on each word, so a sentence's ids are those of its space-separated
        words laid end to end, then truncated and framed by [CLS] ... [SEP] as `encode`
        does: the pipeline runs once per distinct word. Words already encoded are looked up
        in `known_words`, which keeps the new ones (up to WORDS_KEPT, then it starts over):
        give the same dict to the calls of one pass over a file. Pairs, sentences holding an
        added token's text, and tokenizers that are not BERT's take `encode`'s path."""
        texts = list(texts)
        fast = []
        if self._word_backend is not None:
            fast = [i for i, text in enumerate(texts) if isinstance(text, str)]
            together = "\0".join(texts[i] for i in fast)  # one search where no text holds one
            if any(token in together for token in self._added):
                fast = [i for i in fast if not any(token in texts[i] for token in self._added)]
        other = sorted(set(range(len(texts))).difference(fast)) if fast else range(len(texts))
        parts = []
        if fast:
            parts.append((fast, *self._encode_by_words([texts[i] for i in fast],
                                                       {} if known_words is None else known_words)))
        if other:
            encodings = self.backend.encode_batch_fast([texts[i] for i in other])
            self.truncated += sum(1 for e in encodings if e.overflowing)
            ids, types = [e.ids for e in encodings], [e.type_ids for e in encodings]
            lengths = np.fromiter(map(len, ids), np.int64, len(ids))
            parts.append((other, _flat(ids, np.int32, lengths), _flat(types, np.int8, lengths),
                          lengths))
        return _merged(parts, len(texts))

    @cached_property
    def _word_backend(self) -> RustTokenizer | None:
        """The backend without post-processor and truncation, to encode single words; None
        when this tokenizer is not BERT's (its normalizer, pre-tokenizer, WordPiece, [CLS] $A
        [SEP] template and right truncation) or has added tokens matched after normalizing."""
        config = json.loads(self.backend.to_str())
        processor = config.get("post_processor") or {}
        specials = processor.get("special_tokens", {})
        bert_template = [{"SpecialToken": {"id": "[CLS]", "type_id": 0}},
                         {"Sequence": {"id": "A", "type_id": 0}},
                         {"SpecialToken": {"id": "[SEP]", "type_id": 0}}]
        truncation = self.backend.truncation or {}
        added = self.backend.get_added_tokens_decoder().values()
        if ((config.get("normalizer") or {"type": "BertNormalizer"})["type"] != "BertNormalizer"
                or (config.get("pre_tokenizer") or {}).get("type") != "BertPreTokenizer"
                or config["model"]["type"] != "WordPiece"
                or processor.get("type") != "TemplateProcessing"
                or processor.get("single") != bert_template
                or [specials.get(t, {}).get("ids") for t in ("[CLS]", "[SEP]")]
                != [[self.cls_id], [self.sep_id]]
                or truncation.get("direction") != "right" or truncation.get("stride")
                or any(token.normalized for token in added)):
            return None
        self._added = [token.content for token in added]  # matched in the raw text
        words = RustTokenizer.from_str(self.backend.to_str())
        words.post_processor = None
        words.no_truncation()
        return words

    def _encode_by_words(self, sentences: list[str], known: dict[str, bytes],
                         ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """`encode_flat` of sentences; `known` maps words to their ids as int32 bytes."""
        words = [sentence.split(" ") for sentence in sentences]
        counts = np.fromiter(map(len, words), np.int64, len(words))
        words = list(itertools.chain.from_iterable(words))
        new = list(dict.fromkeys(word for word in words if word not in known))
        if len(known) + len(new) > WORDS_KEPT:
            known.clear()
            new = list(dict.fromkeys(words))
        encodings = self._word_backend.encode_batch_fast(new, add_special_tokens=False)
        known.update(zip(new, (np.array(e.ids, np.int32).tobytes() for e in encodings)))
        word_ids = list(map(known.__getitem__, words))
        word_lengths = np.fromiter(map(len, word_ids), np.int64, len(word_ids)) // 4
        content = np.add.reduceat(word_lengths, np.cumsum(counts) - counts)
        flat = np.frombuffer(b"".join(word_ids), np.int32)
        kept = np.minimum(content, self.max_length - 2)
        if (kept < content).any():
            self.truncated += int((kept < content).sum())
            within = np.arange(len(flat)) - np.repeat(np.cumsum(content) - content, content)
            flat = flat[within < np.repeat(kept, content)]
        lengths = kept + 2
        ends = np.cumsum(lengths)
        framed = np.empty(int(ends[-1]), np.int32)
        body = np.ones(len(framed), bool)
        body[ends - lengths] = body[ends - 1] = False
        framed[ends - lengths], framed[ends - 1], framed[body] = self.cls_id, self.sep_id, flat
        return framed, np.zeros(len(framed), np.int8), lengths

    def save(self, folder: str | Path) -> None:
        self.backend.save(str(Path(folder) / "tokenizer.json"))

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size()


def _flat(rows: list[list[int]], dtype: type, lengths: np.ndarray) -> np.ndarray:
    return np.fromiter(itertools.chain.from_iterable(rows), dtype, int(lengths.sum()))


def _merged(parts: list[tuple[Sequence[int], np.ndarray, np.ndarray, np.ndarray]],
            count: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rows, ids, types, lengths) of disjoint sets of `count` texts as one set, in order."""
    if len(parts) == 1:
        return parts[0][1:]
    lengths = np.zeros(count, np.int64)
    for rows, _, _, part_lengths in parts:
        lengths[np.asarray(rows, np.int64)] = part_lengths
    starts = np.cumsum(lengths) - lengths
    ids, types = np.empty(int(lengths.sum()), np.int32), np.empty(int(lengths.sum()), np.int8)
    for rows, part_ids, part_types, part_lengths in parts:
        part_starts = np.cumsum(part_lengths) - part_lengths
        at = (np.repeat(starts[np.asarray(rows, np.int64)] - part_starts, part_lengths)
              + np.arange(len(part_ids)))
        ids[at], types[at] = part_ids, part_types
    return ids, types, lengths


def _lowercases(folder: Path) -> bool:
    config_file = folder / "tokenizer_config.json"
    if config_file.is_file():
        return bool(json.loads(config_file.read_text(encoding="utf-8")).get("do_lower_case", True))
    return True


def wordpiece_from_vocab(vocab_file: Path, lowercase: bool = True) -> RustTokenizer:
    """BERT's tokenizer pipeline around the WordPiece vocabulary in `vocab_file`."""
    vocab = {}
    with open(vocab_file, encoding="utf-8") as lines:
        for index, line in enumerate(lines):
            vocab[line.rstrip("\n")] = index
    backend = RustTokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=lowercase)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    cls_id, sep_id = vocab["[CLS]"], vocab["[SEP]"]
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
    backend.decoder = decoders.WordPiece(prefix="##")
    return backend
