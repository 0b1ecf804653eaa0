"""Our WordPiece pipeline against transformers.BertTokenizerFast."""

import csv
import itertools

import pytest

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
