"""Our WordPiece pipeline against transformers.BertTokenizerFast."""

import csv
import itertools

import numpy as np
import pytest
from tokenizers import normalizers

from mtbert import tokenizer as tokenizer_module
from mtbert.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")


def read_column_rows(path, columns, n):
    with open(path, encoding="utf-8") as f:
        rows = csv.DictReader(f, delimiter="\t")
        out = []
        for row in rows:
            values = [row.get(c) for c in columns]
            if all(values):
                out.append(tuple(v.strip() for v in values))
            if len(out) == n:
                return out
    return out


@pytest.mark.parametrize("source", ["tokenizer.json", "vocab.txt"])
def test_ids_match_bert_tokenizer_fast(tmp_path, backbone_dir, data_dir, source):
    folder = backbone_dir
    if source == "vocab.txt":  # force the vocab.txt path: copy only the vocabulary and config
        for name in ("vocab.txt", "tokenizer_config.json"):
            (tmp_path / name).write_bytes((backbone_dir / name).read_bytes())
        folder = tmp_path
    ours = Tokenizer.from_folder(folder, max_length=64)
    theirs = transformers.BertTokenizerFast.from_pretrained(backbone_dir)
    singles = [r[0] for r in read_column_rows(data_dir / "ids-sst-train.csv", ["sentence"], 500)]
    singles += [r[0] for r in read_column_rows(data_dir / "ids-cfimdb-dev.csv", ["sentence"], 50)]
    pairs = read_column_rows(data_dir / "quora-train.csv", ["sentence1", "sentence2"], 300)
    pairs += read_column_rows(data_dir / "sts-train.csv", ["sentence1", "sentence2"], 200)
    ids, types = ours.encode(singles)
    expected = theirs(singles, truncation=True, max_length=64)
    assert ids == expected["input_ids"]
    assert types == expected["token_type_ids"]
    assert any(len(row) == 64 for row in ids), "some rows must be truncated"
    ids, types = ours.encode(pairs)
    expected = theirs([a for a, _ in pairs], [b for _, b in pairs], truncation=True, max_length=64)
    assert ids == expected["input_ids"]
    assert types == expected["token_type_ids"]
    assert len(singles) + len(pairs) >= 1000


# What word-by-word tokenizing could get wrong: spaces, tabs and other whitespace, accents
# (combined or combining, also after a space), Chinese characters, control characters, case
# beyond ASCII, added tokens' text, words too long for WordPiece, truncation.
TRICKY = ["Hello  World", "tab\tand\nnewline", "caf\u00e9 na\u0131ve", "e \u0301accent",
          "\u4e2d\u6587 mixed\u5b57", "ctrl\x07char\x1fhere", "nbsp\u00a0space\u2003em",
          "[SEP] in text", "a[MASK]b", "[sep] lowercased", "x" * 150, "don't stop-now!!",
          "\u01c5ungla \u0130stanbul \u03a3\u0391\u03a3", " leading", "trailing ",
          "\U0001f600 emoji", "word " * 80, "\ufffdreplacement"]


@pytest.mark.parametrize("source", ["tokenizer.json", "vocab.txt"])
def test_encode_flat_is_encode_laid_flat(tmp_path, backbone_dir, data_dir, source,
                                         monkeypatch):
    """`encode_flat`, which tokenizes sentences word by word, gives `encode`'s ids, types and
    truncation count, also once its remembered words are forgotten (WORDS_KEPT)."""
    folder = backbone_dir
    if source == "vocab.txt":
        for name in ("vocab.txt", "tokenizer_config.json"):
            (tmp_path / name).write_bytes((backbone_dir / name).read_bytes())
        folder = tmp_path
    singles = [r[0] for r in read_column_rows(data_dir / "ids-sst-train.csv", ["sentence"], 400)]
    pairs = read_column_rows(data_dir / "quora-train.csv", ["sentence1", "sentence2"], 50)
    texts = TRICKY + [t.upper() for t in TRICKY] + singles
    texts[5::10] = pairs[:len(texts[5::10])]
    reference = Tokenizer.from_folder(folder, max_length=24)
    ids, types = reference.encode(texts)
    monkeypatch.setattr(tokenizer_module, "WORDS_KEPT", 2000)
    ours = Tokenizer.from_folder(folder, max_length=24)
    known_words = {}
    flat_ids, flat_types, lengths = (np.concatenate(parts) for parts in zip(*(
        ours.encode_flat(texts[start:start + 100], known_words)
        for start in range(0, len(texts), 100))))
    assert ours._word_backend is not None  # the word-by-word path ran
    assert lengths.tolist() == [len(row) for row in ids]
    assert flat_ids.tolist() == list(itertools.chain.from_iterable(ids))
    assert flat_types.tolist() == list(itertools.chain.from_iterable(types))
    assert (flat_ids.dtype, flat_types.dtype) == (np.int32, np.int8)
    assert ours.truncated == reference.truncated > 0


def test_encode_flat_of_another_tokenizer_is_encode(backbone_dir):
    """A pipeline that is not BERT's (here a normalizer that also strips) is encoded whole."""
    tokenizer = Tokenizer.from_folder(backbone_dir, max_length=24)
    tokenizer.backend.normalizer = normalizers.Sequence([normalizers.Lowercase(),
                                                         normalizers.Replace("a", "")])
    ids, types = tokenizer.encode(TRICKY)
    flat_ids, flat_types, lengths = tokenizer.encode_flat(TRICKY)
    assert tokenizer._word_backend is None
    assert flat_ids.tolist() == list(itertools.chain.from_iterable(ids))
    assert lengths.tolist() == [len(row) for row in ids]


def test_short_pairs_truncate_longest_first(backbone_dir):
    ours = Tokenizer.from_folder(backbone_dir, max_length=12)
    theirs = transformers.BertTokenizerFast.from_pretrained(backbone_dir)
    words = ["alpha beta gamma", "one two three four five six seven eight nine ten"]
    for a, b in itertools.permutations(words, 2):
        ids, _ = ours.encode([(a, b)])
        assert ids[0] == theirs(a, b, truncation=True, max_length=12)["input_ids"]


def test_uncased_vocab_lowercases(backbone_dir):
    tokenizer = Tokenizer.from_folder(backbone_dir)
    assert tokenizer.encode(["HELLO World"])[0] == tokenizer.encode(["hello world"])[0]


def test_max_length_validated(backbone_dir):
    with pytest.raises(ValueError, match="at least 8"):
        Tokenizer.from_folder(backbone_dir, max_length=2)
