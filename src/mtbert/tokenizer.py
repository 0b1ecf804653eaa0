"""BERT's WordPiece tokenizer on the Rust `tokenizers` library.

Built from the checkpoint's `tokenizer.json` when there is one, else from `vocab.txt` with
BERT's normalizer (lowercasing as `tokenizer_config.json` says), pre-tokenizer and
`[CLS] a [SEP] b [SEP]` template. Token ids match `transformers.BertTokenizerFast`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from tokenizers import Tokenizer as RustTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors

Text = str | tuple[str, str]


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

    def save(self, folder: str | Path) -> None:
        self.backend.save(str(Path(folder) / "tokenizer.json"))

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size()


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
