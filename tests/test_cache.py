"""The token cache (issue 37): a file is read and tokenized once, the entry is keyed by every
input, a half-written or damaged entry is never used, the reader's reports survive, and
processes share one entry and read disjoint rows of it."""

import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mtbert.data import cache
from mtbert.data.batching import TaskStream, collate, encode_split
from mtbert.data.cache import cached_split, entry_key
from mtbert.data.readers import DataError, read_examples, stream_examples
from mtbert.tokenizer import Tokenizer

from conftest import WORDS

OPTIONS = dict(text_columns=["sentence1", "sentence2"], label_column="similarity",
               id_column="id", num_classes=None, label_range=(0.0, 5.0), strict=False,
               max_skipped_share=0.5)
MALFORMED_LINE = 4  # header is line 1


def write_pairs(path: Path, rows: int = 40, seed: int = 0) -> Path:
    """A pair file whose sentences repeat (siamese tables hold each once), with one row
    lacking its second sentence at line MALFORMED_LINE."""
    rng = np.random.default_rng(seed)
    sentences = [" ".join(rng.choice(WORDS, 4)) for _ in range(rows // 2)]
    lines = ["id,sentence1,sentence2,similarity"]
    for i in range(rows):
        second = "" if len(lines) == MALFORMED_LINE - 1 else rng.choice(sentences)
        lines.append(f"r{i},{rng.choice(sentences)},{second},{rng.integers(0, 6)}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def tokenizer(tiny_backbone) -> Tokenizer:
    return Tokenizer.from_folder(tiny_backbone, 32)


@pytest.fixture
def builds(monkeypatch) -> list[Path]:
    """The files the cache reads (each is a cold build)."""
    read = []

    def reading(path, **options):
        read.append(Path(path))
        return stream_examples(path, **options)

    monkeypatch.setattr(cache, "stream_examples", reading)
    return read


def assert_same_split(cached, expected, pad_id: int) -> None:
    assert list(cached.example_ids) == list(expected.example_ids)
    np.testing.assert_array_equal(cached.labels.numpy(), expected.labels.numpy())
    np.testing.assert_array_equal(cached.pair_index, expected.pair_index)
    rows = np.arange(len(expected))
    ours, theirs = collate(cached, rows, pad_id), collate(expected, rows, pad_id)
    for name in ("input_ids", "attention_mask", "token_type_ids", "pair_index", "labels"):
        mine, reference = getattr(ours, name), getattr(theirs, name)
        assert (mine is None) == (reference is None)
        if mine is not None:
            np.testing.assert_array_equal(mine.numpy(), reference.numpy())


@pytest.mark.parametrize("siamese", [True, False])
@pytest.mark.parametrize("chunk_rows", [7, cache.CHUNK_ROWS])
def test_a_file_is_tokenized_once_and_mapped_after(tmp_path, tokenizer, builds, siamese,
                                                   chunk_rows, monkeypatch):
    """Also when the build streams the file in several chunks: siamese sentences are numbered
    across chunks as `encode_split` numbers them."""
    monkeypatch.setattr(cache, "CHUNK_ROWS", chunk_rows)
    data = write_pairs(tmp_path / "pairs.csv")
    expected = encode_split(read_examples(data, **OPTIONS).examples, tokenizer, siamese)
    first = cached_split(data, OPTIONS, tokenizer, siamese, tmp_path / "cache")
    again = cached_split(data, OPTIONS, tokenizer, siamese, tmp_path / "cache")
    assert builds == [data]  # the second call read nothing
    for split in (first, again):
        assert_same_split(split, expected, tokenizer.pad_id)
    assert split.tokens.ids[0].base is not None  # a view into the mapped file, not a copy


def test_any_changed_input_builds_a_new_entry(tmp_path, tiny_backbone, tokenizer, builds):
    data = write_pairs(tmp_path / "pairs.csv")
    root = tmp_path / "cache"
    cached_split(data, OPTIONS, tokenizer, True, root)
    other_vocab = tmp_path / "vocab"
    other_vocab.mkdir()
    words = (tiny_backbone / "vocab.txt").read_text(encoding="utf-8").split()
    (other_vocab / "vocab.txt").write_text("\n".join(words[:-1]) + "\n", encoding="utf-8")
    changes = [(dict(OPTIONS), Tokenizer.from_folder(tiny_backbone, 16)),  # max length
               (dict(OPTIONS), Tokenizer.from_folder(other_vocab, 32)),  # tokenizer
               (dict(OPTIONS, text_columns=["sentence2", "sentence1"]), tokenizer),  # options
               (dict(OPTIONS, max_skipped_share=0.4), tokenizer)]
    for options, changed in changes:
        split = cached_split(data, options, changed, True, root)
        expected = encode_split(read_examples(data, **options).examples, changed, True)
        assert_same_split(split, expected, changed.pad_id)
    assert len(builds) == 1 + len(changes)
    write_pairs(data, seed=1)  # same path, new content
    split = cached_split(data, OPTIONS, tokenizer, True, root)
    assert len(builds) == 2 + len(changes)
    expected = encode_split(read_examples(data, **OPTIONS).examples, tokenizer, True)
    assert_same_split(split, expected, tokenizer.pad_id)


def test_an_interrupted_build_leaves_nothing_that_is_used(tmp_path, tokenizer, builds,
                                                          monkeypatch):
    data = write_pairs(tmp_path / "pairs.csv")
    root = tmp_path / "cache"
    monkeypatch.setattr(cache, "CHUNK_ROWS", 4)
    encode, calls = tokenizer.encode_flat, []

    def killed_midway(texts, known_words):
        calls.append(len(texts))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return encode(texts, known_words)

    monkeypatch.setattr(tokenizer, "encode_flat", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        cached_split(data, OPTIONS, tokenizer, True, root)
    assert not [p for p in root.iterdir() if p.is_dir()]
    # A process killed outright (SIGKILL) leaves its temporary folder: it is ignored, removed.
    key = f"pairs-{entry_key(data, OPTIONS, tokenizer, True)}"
    (root / f".{key}.x1y2").mkdir()
    (root / f".{key}.x1y2" / "tokens.arrow").write_bytes(b"ARROW1")
    monkeypatch.setattr(tokenizer, "encode_flat", encode)
    split = cached_split(data, OPTIONS, tokenizer, True, root)
    assert [p.name for p in root.iterdir() if p.is_dir()] == [key]
    expected = encode_split(read_examples(data, **OPTIONS).examples, tokenizer, True)
    assert_same_split(split, expected, tokenizer.pad_id)


@pytest.mark.parametrize("damage", ["truncated", "footer", "no manifest"])
def test_a_damaged_entry_is_built_again(tmp_path, tokenizer, builds, caplog, damage):
    data = write_pairs(tmp_path / "pairs.csv")
    root = tmp_path / "cache"
    cached_split(data, OPTIONS, tokenizer, True, root)
    entry = root / f"pairs-{entry_key(data, OPTIONS, tokenizer, True)}"
    tokens = entry / "tokens.arrow"
    if damage == "truncated":
        tokens.write_bytes(tokens.read_bytes()[:-100])
    elif damage == "footer":  # same size, the Arrow footer overwritten
        tokens.write_bytes(tokens.read_bytes()[:-16] + b"\0" * 16)
    else:  # killed after the files, before the manifest that completes an entry
        (entry / "manifest.json").unlink()
    with caplog.at_level(logging.WARNING):
        split = cached_split(data, OPTIONS, tokenizer, True, root)
    assert len(builds) == 2
    assert damage == "no manifest" or "is damaged" in caplog.text
    expected = encode_split(read_examples(data, **OPTIONS).examples, tokenizer, True)
    assert_same_split(split, expected, tokenizer.pad_id)


@pytest.mark.parametrize("chunk_rows", [4, cache.CHUNK_ROWS])
def test_malformed_rows_are_reported_cold_and_warm(tmp_path, tokenizer, caplog, chunk_rows,
                                                   monkeypatch):
    """The reader's checks hold in a streamed build: the share limit, checked once the last
    chunk is read, still fails the build and writes nothing."""
    monkeypatch.setattr(cache, "CHUNK_ROWS", chunk_rows)
    data = write_pairs(tmp_path / "pairs.csv")
    for start in ("cold", "warm"):
        caplog.clear()
        with caplog.at_level(logging.INFO):
            split = cached_split(data, OPTIONS, tokenizer, True, tmp_path / "cache")
        assert f"{data}:{MALFORMED_LINE}: skipped row: empty 'sentence2'" in caplog.text, start
        assert f"{data}: read 39 examples, skipped 1 malformed rows" in caplog.text, start
        assert len(split) == 39
    strict = dict(OPTIONS, strict=True)
    with pytest.raises(DataError, match=f"pairs.csv:{MALFORMED_LINE}: malformed row"):
        cached_split(data, strict, tokenizer, True, tmp_path / "cache")
    too_many = dict(OPTIONS, max_skipped_share=0.01)
    with pytest.raises(DataError, match="1 of 40 rows are malformed"):
        cached_split(data, too_many, tokenizer, True, tmp_path / "cache")
    entries = [p.name for p in (tmp_path / "cache").iterdir() if p.is_dir()]
    assert len(entries) == 1  # failed reads write nothing


def test_a_build_lists_its_first_skipped_rows_and_counts_the_rest(tmp_path, tokenizer, caplog):
    data = tmp_path / "sentences.csv"
    rows = ["id,sentence,label"] + [f"r{i},{WORDS[i % 20]} film,{i % 2}" if i % 3 else f"r{i},,1"
                                    for i in range(90)]
    data.write_text("\n".join(rows) + "\n", encoding="utf-8")
    options = dict(text_columns=["sentence"], label_column="label", num_classes=2)
    cached_split(data, options, tokenizer, False, tmp_path / "cache")
    entry = next(p for p in (tmp_path / "cache").iterdir() if p.is_dir())
    summary = json.loads((entry / "summary.json").read_text(encoding="utf-8"))
    assert (summary["skipped"], len(summary["skipped_rows"])) == (30, cache.SKIPS_KEPT)
    assert summary["skipped_rows"][0] == [2, "empty 'sentence'"]
    with caplog.at_level(logging.INFO):
        split = cached_split(data, options, tokenizer, False, tmp_path / "cache")
    assert f"{data}:59: skipped row: empty 'sentence'" in caplog.text  # the 20th
    assert "10 more malformed rows skipped, not logged individually" in caplog.text
    assert len(split) == 60


def test_a_cold_build_holds_a_few_chunks_not_the_file(tmp_path, tokenizer, monkeypatch):
    """The build tokenizes and writes each chunk as it is read: the reader is never more than
    two chunks ahead of the tokenizer (reading the whole file first held all its rows)."""
    monkeypatch.setattr(cache, "CHUNK_ROWS", 50)
    data = write_pairs(tmp_path / "pairs.csv", rows=500)
    read, ahead = [0], []

    def reading(path, **options):
        for example in stream_examples(path, **options):
            read[0] += 1
            yield example

    def encoding(texts, known_words):
        ahead.append(read[0] - 50 * len(ahead))
        return encode(texts, known_words)

    encode = tokenizer.encode_flat
    monkeypatch.setattr(cache, "stream_examples", reading)
    monkeypatch.setattr(tokenizer, "encode_flat", encoding)
    assert len(cached_split(data, OPTIONS, tokenizer, False, tmp_path / "cache")) == 499
    assert len(ahead) == 10 and max(ahead) <= 2 * 50, ahead


READ_ROWS = """
import json, sys
from pathlib import Path
from mtbert.data.batching import TaskStream
from mtbert.data.cache import cached_split
from mtbert.tokenizer import Tokenizer
data, root, backbone, rank, options = sys.argv[1:6]
options = json.loads(options)
split = cached_split(Path(data), options, Tokenizer.from_folder(backbone, 32), True, Path(root))
stream = TaskStream("pairs", split, 3, seed=5, pad_id=0, rank=int(rank), world_size=2)
print(json.dumps([int(r) for _ in range(len(stream)) for r in stream.next().rows]))
"""


def test_two_processes_share_one_build_and_read_disjoint_rows(tmp_path, tiny_backbone):
    data = write_pairs(tmp_path / "pairs.csv", rows=60)
    root = tmp_path / "cache"
    processes = [subprocess.Popen(
        [sys.executable, "-c", READ_ROWS, str(data), str(root), str(tiny_backbone), str(rank),
         json.dumps(OPTIONS)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for rank in range(2)]  # both start cold: one builds, the other waits and maps
    outputs = [p.communicate(timeout=120) for p in processes]
    assert all(p.returncode == 0 for p in processes), [err for _, err in outputs]
    rows = [set(json.loads(out)) for out, _ in outputs]
    assert not rows[0] & rows[1]
    assert rows[0] | rows[1] == set(range(59))  # every example, read by one of them
    cold = [err for _, err in outputs if "tokens from the cache" not in err]
    assert len(cold) == 1  # one process built the entry
    assert len([p for p in root.iterdir() if p.is_dir()]) == 1


def test_a_rank_streams_indices_and_lengths_only(tmp_path, tokenizer):
    """A subset and a stream's plan hold row numbers; the tokens stay in the mapped file."""
    data = write_pairs(tmp_path / "pairs.csv")
    split = cached_split(data, OPTIONS, tokenizer, False, tmp_path / "cache")
    half = split.subset(np.arange(0, len(split), 2))
    assert half.tokens.ids is split.tokens.ids
    stream = TaskStream("pairs", half, 4, seed=0, pad_id=0, rank=1, world_size=2)
    assert all(rows.dtype == np.int64 for rows in stream._batches)
    assert list(half.example_ids) == list(split.example_ids)[::2]


def test_a_subset_is_the_split_of_its_examples(tmp_path, tokenizer):
    """A sample of a cached siamese split numbers its sentences as encoding the sampled
    examples alone would (runs with a train fraction or an eval limit train as before)."""
    data = write_pairs(tmp_path / "pairs.csv")
    examples = read_examples(data, **OPTIONS).examples
    split = cached_split(data, OPTIONS, tokenizer, True, tmp_path / "cache")
    rows = np.array([30, 2, 17, 5, 9, 22])
    expected = encode_split([examples[r] for r in rows], tokenizer, True)
    assert_same_split(split.subset(rows), expected, tokenizer.pad_id)


def test_an_unusable_cache_folder_is_one_sentence(tmp_path, tokenizer):
    data = write_pairs(tmp_path / "pairs.csv")
    (tmp_path / "file").write_text("not a folder", encoding="utf-8")
    with pytest.raises(OSError, match="as the token cache .* set MTBERT_CACHE or the config's"):
        cached_split(data, OPTIONS, tokenizer, True, tmp_path / "file" / "cache")


def test_data_cache_lists_and_prunes_only_the_cache_s_unused_entries(tmp_path, tokenizer,
                                                                    builds, capsys):
    import os

    from mtbert.cli import main

    root = tmp_path / "cache"
    old, new = write_pairs(tmp_path / "old.csv"), write_pairs(tmp_path / "new.csv", seed=1)
    for path in (old, new):
        cached_split(path, dict(OPTIONS), tokenizer, False, root)
    (root / "notes-of-mine").mkdir()  # a user's folder in the cache folder: never touched
    (root / "notes-of-mine" / "manifest.json").write_text("{}")
    (old_entry,) = [p for p in root.glob("old-*") if p.is_dir()]  # not its .lock
    os.utime(old_entry, (0, 1_000_000))  # last used in 1970
    main(["data", "cache", "--dir", str(root)])
    listing = capsys.readouterr().out.splitlines()
    assert listing[0].startswith(old_entry.name)  # least recently used first
    assert listing[-1].startswith("2 entries, ") and str(root) in listing[-1]

    main(["data", "cache", "--dir", str(root), "--prune", "30"])
    pruned = capsys.readouterr().out.splitlines()
    assert pruned[0].startswith(old_entry.name) and len(pruned) == 2
    assert pruned[-1].startswith("removed 1 entries (") and "unused for 30 days" in pruned[-1]
    assert pruned[-1].endswith("; 1 left")
    assert not old_entry.exists() and (root / "notes-of-mine").is_dir()
    # A use stamps the entry: the new file's entry was used just now, and stays.
    builds.clear()
    cached_split(new, dict(OPTIONS), tokenizer, False, root)
    assert builds == []
    cached_split(old, dict(OPTIONS), tokenizer, False, root)  # pruned: built again
    assert builds == [old]
    main(["data", "cache", "--dir", str(root), "--prune"])
    assert capsys.readouterr().out.splitlines()[-1].endswith("; 0 left")
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["notes-of-mine"]
