"""The token cache: each data file is read and tokenized once, into memory-mapped Arrow files.

Reading and tokenizing a large file was most of a run's start-up and, held as Python lists,
most of its memory. As in Hugging Face `datasets` (Lhoest et al., 2021: an Arrow table
memory-mapped from disk, cached by fingerprint), the reader's output is tokenized once, in
chunks (`encode_batch` runs on every core), into Arrow IPC files that every later run, seed,
resume and process maps instead: the pages of the rows a process reads are all the memory
the tokens cost it.

An entry is a folder `ROOT/<file stem>-<key>/`, written by `checkpoint.write_checkpoint`
(a temporary folder, fsynced, `manifest.json` last, renamed into place):
- `examples.arrow`: `id`, `label` (labelled splits) and, for siamese splits, `a` and `b`: the
  rows of `tokens.arrow` that hold each pair's sentences;
- `tokens.arrow`: `ids` and `types` lists, a row per example (joint) or per distinct
  sentence (siamese);
- `summary.json`: what reading found (rows, skipped rows), reported again by every run.

The key hashes everything an entry depends on: the file's bytes, the reading options, the
reader's source, the tokenizer (its whole JSON: vocabulary, normalizer, template and the
truncation at the max length) and the layout. One process builds an entry while the others
wait on a file lock; an entry that does not open whole (killed before its rename, truncated,
altered in size) is removed and built again.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import tokenizers
import torch
from tqdm.auto import tqdm

from mtbert.checkpoint import MANIFEST, write_checkpoint
from mtbert.data import readers
from mtbert.data.batching import EncodedSplit, TokenRows, joint_text, sentence_table
from mtbert.data.readers import Example, ReadReport, read_examples
from mtbert.tokenizer import Tokenizer

log = logging.getLogger(__name__)

FORMAT = 1  # the entries' layout; a change gives every entry a new key
CHUNK_ROWS = 16384  # rows per tokenizer call and per Arrow record batch
SKIPS_KEPT = 20  # skipped rows a summary lists (and a warm start logs) one by one
_FILES = ("examples.arrow", "tokens.arrow", "summary.json")


def cache_root(configured: str | None = None) -> Path:
    """Where entries live: `configured` (the config's `cache_dir`), else $MTBERT_CACHE,
    else $XDG_CACHE_HOME/mtbert/tokens (by default ~/.cache/mtbert/tokens)."""
    chosen = configured or os.environ.get("MTBERT_CACHE")
    if chosen:
        return Path(chosen).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mtbert" / "tokens"


def cached_split(path: Path, options: dict, tokenizer: Tokenizer, siamese: bool,
                 root: Path) -> EncodedSplit:
    """What `read_examples(path, **options)` reads, tokenized (siamese: a table of distinct
    sentences), mapped from its cache entry under `root`, which is built first if missing or
    damaged. A cold build runs the reader (its checks, logs and errors); a warm start logs
    the summary the reader gave."""
    entry = root / f"{path.stem}-{entry_key(path, options, tokenizer, siamese)}"
    split = open_entry(entry, path)
    if split is None:
        with _locked(root, entry.name):  # another process may have built it meanwhile
            split = open_entry(entry, path) or _build(entry, path, options, tokenizer, siamese)
    return split


def entry_key(path: Path, options: dict, tokenizer: Tokenizer, siamese: bool) -> str:
    inputs = {"format": FORMAT, "file": _file_digest(path), "options": options,
              "reader": hashlib.sha256(Path(readers.__file__).read_bytes()).hexdigest(),
              "tokenizer": hashlib.sha256(tokenizer.backend.to_str().encode()).hexdigest(),
              "tokenizers": tokenizers.__version__, "max_length": tokenizer.max_length,
              "siamese": siamese}
    text = json.dumps(inputs, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                digest.update(block)
    except OSError:  # the reader reports it, with the file's name
        return "unreadable"
    return digest.hexdigest()


@contextlib.contextmanager
def _locked(root: Path, name: str) -> Iterator[None]:
    try:
        root.mkdir(parents=True, exist_ok=True)
        handle = open(root / f"{name}.lock", "a+b")
    except OSError as error:
        raise OSError(f"cannot use {root} as the token cache ({error.strerror or error}); "
                      "set MTBERT_CACHE or the config's cache_dir to a writable folder") from None
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # released by the OS if the holder dies
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def open_entry(entry: Path, path: Path, report: bool = True) -> EncodedSplit | None:
    """The split an entry holds, or None if it is missing or does not open whole (then it
    is removed). `report` logs what reading `path` found when the entry was built."""
    if not (entry / MANIFEST).is_file():
        return None
    try:
        manifest = json.loads((entry / MANIFEST).read_text(encoding="utf-8"))
        for name in _FILES:
            if (entry / name).stat().st_size != manifest[name]["bytes"]:
                raise ValueError(f"{name} is not the size its manifest says")
        summary = json.loads((entry / "summary.json").read_text(encoding="utf-8"))
        examples, tokens = (pa.ipc.open_file(pa.memory_map(str(entry / name))).read_all()
                            for name in ("examples.arrow", "tokens.arrow"))
        if (examples.num_rows, tokens.num_rows) != (summary["rows"], summary["token_rows"]):
            raise ValueError("its tables do not hold the rows its summary counts")
        split = _as_split(examples, tokens)
    except (OSError, ValueError, KeyError, TypeError, pa.ArrowException) as error:
        log.warning("%s: token cache entry %s is damaged (%s); building it again", path, entry,
                    error)
        shutil.rmtree(entry, ignore_errors=True)
        return None
    if report:
        _report(path, summary, entry)
    return split


def _report(path: Path, summary: dict, entry: Path) -> None:
    for line, reason in summary["skipped_rows"]:
        log.warning("%s:%d: skipped row: %s", path, line, reason)
    unlisted = summary["skipped"] - len(summary["skipped_rows"])
    if unlisted > 0:
        log.warning("%s: %d more malformed rows skipped, not logged individually", path,
                    unlisted)
    log.log(logging.WARNING if summary["skipped"] else logging.INFO,
            "%s: read %d examples, skipped %d malformed rows (tokens from the cache, %s)", path,
            summary["rows"], summary["skipped"], entry)


def _as_split(examples: pa.Table, tokens: pa.Table) -> EncodedSplit:
    labels = None
    if "label" in examples.column_names:
        labels = torch.from_numpy(np.array(examples.column("label").to_numpy(), np.float32))
    pair_index = None
    if "a" in examples.column_names:
        pair_index = np.stack([examples.column(c).to_numpy() for c in "ab"], axis=1)
    ids, types, base = [], [], 0
    starts, lengths = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    for batch in tokens.to_batches():
        offsets = batch.column("ids").offsets.to_numpy().astype(np.int64)
        ids.append(batch.column("ids").values.to_numpy())
        types.append(batch.column("types").values.to_numpy())
        starts.append(offsets[:-1] + base - offsets[0])
        lengths.append(np.diff(offsets))
        base += len(ids[-1])
    rows = TokenRows(ids, types, np.concatenate(starts), np.concatenate(lengths))
    return EncodedSplit(ArrowStrings(examples.column("id")), labels, rows, pair_index)


class ArrowStrings(Sequence[str]):
    """A string column of a mapped table as a sequence of str."""

    def __init__(self, column: pa.ChunkedArray):
        self.column = column

    def __len__(self) -> int:
        return len(self.column)

    def __getitem__(self, i: int) -> str:
        return self.column[i].as_py()

    def __iter__(self) -> Iterator[str]:
        for chunk in self.column.chunks:
            yield from chunk.to_pylist()


def _build(entry: Path, path: Path, options: dict, tokenizer: Tokenizer,
           siamese: bool) -> EncodedSplit:
    report = read_examples(path, **options)  # every check of the reader runs here
    for stale in entry.parent.glob(f".{entry.name}.*"):  # builds killed before their rename
        shutil.rmtree(stale, ignore_errors=True)
    write_checkpoint(entry, lambda folder: _write_entry(folder, report, tokenizer, siamese))
    split = open_entry(entry, path, report=False)
    if split is None:
        raise OSError(f"{entry}: the token cache entry just written does not open")
    return split


def _write_entry(folder: Path, report: ReadReport, tokenizer: Tokenizer,
                 siamese: bool) -> None:
    texts = _write_examples(folder / "examples.arrow", report.examples, siamese)
    with tqdm(total=len(texts), unit="rows", desc=f"tokenize {report.path.name}") as bar:
        schema = pa.schema([("ids", pa.list_(pa.int32())), ("types", pa.list_(pa.int8()))])
        with pa.OSFile(str(folder / "tokens.arrow"), "wb") as sink, \
                pa.ipc.new_file(sink, schema) as writer:
            for start in range(0, len(texts), CHUNK_ROWS):
                rows = TokenRows.from_lists(*tokenizer.encode(texts[start:start + CHUNK_ROWS]))
                offsets = pa.array(np.append(rows.starts, rows.lengths.sum()).astype(np.int32))
                writer.write_batch(pa.record_batch(
                    [pa.ListArray.from_arrays(offsets, rows.ids[0]),
                     pa.ListArray.from_arrays(offsets, rows.types[0])], schema=schema))
                bar.update(len(rows))
    summary = {"path": str(report.path), "rows": len(report.examples),
               "token_rows": len(texts), "skipped": len(report.skipped),
               "skipped_rows": report.skipped[:SKIPS_KEPT]}
    (folder / "summary.json").write_text(json.dumps(summary), encoding="utf-8")


def _write_examples(file: Path, examples: list[Example], siamese: bool) -> list:
    """Write ids, labels and (siamese) sentence numbers; returns the texts to tokenize: one
    per example, or the distinct sentences in order of first use."""
    fields = [("id", pa.string())]
    labelled = bool(examples) and examples[0].label is not None
    fields += [("label", pa.float32())] if labelled else []
    fields += [("a", pa.int64()), ("b", pa.int64())] if siamese else []
    schema = pa.schema(fields)
    table: dict[str, int] = {}
    with pa.OSFile(str(file), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
        for start in range(0, len(examples), CHUNK_ROWS):
            chunk = examples[start:start + CHUNK_ROWS]
            columns = [pa.array([e.id for e in chunk], pa.string())]
            if labelled:
                columns.append(pa.array(np.array([e.label for e in chunk], np.float32)))
            if siamese:
                pairs = sentence_table(chunk, table)
                columns += [pa.array(pairs[:, 0]), pa.array(pairs[:, 1])]
            writer.write_batch(pa.record_batch(columns, schema=schema))
    return list(table) if siamese else [joint_text(e) for e in examples]
