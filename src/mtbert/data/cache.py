"""The token cache: each data file is read and tokenized once, into memory-mapped Arrow files.

Reading and tokenizing a large file was most of a run's start-up and, held as Python lists,
most of its memory. As in Hugging Face `datasets` (Lhoest et al., 2021: an Arrow table
memory-mapped from disk, cached by fingerprint), the reader's output is tokenized once into
Arrow IPC files that every later run, seed, resume and process maps instead: the pages of the
rows a process reads are all the memory the tokens cost it. A build streams: it reads a chunk
of rows, appends it to the files and tokenizes it (`Tokenizer.encode_flat`, on a thread while
the next chunk is read), so its memory is that of a few chunks, whatever the file's size.

An entry is a folder `ROOT/<file stem>-<key>/`, written by `checkpoint.write_checkpoint`
(a temporary folder, fsynced, `manifest.json` last, renamed into place):
- `examples.arrow`: `id`, `label` (labelled splits) and, for siamese splits, `a` and `b`: the
  rows of `tokens.arrow` that hold each pair's sentences;
- `tokens.arrow`: `ids` and `types` lists, a row per example (joint) or per distinct
  sentence (siamese);
- `summary.json`: what reading found (rows, skipped rows), reported again by every run.

The key hashes everything an entry depends on: the file's bytes, the reading options, the
reader's and the tokenizer's source, the tokenizer (its whole JSON: vocabulary, normalizer,
template and the truncation at the max length) and the layout. One process builds an entry
while the others wait on a file lock; an entry that does not open whole (killed before its
rename, truncated, altered in size) is removed and built again. Each use stamps the entry's
folder; `mtbert data cache` lists the entries and `--prune` removes the unused ones.
"""

from __future__ import annotations

import contextlib
import fcntl
import gc
import hashlib
import itertools
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import tokenizers
import torch
from tqdm.auto import tqdm

from mtbert import tokenizer as tokenizer_code
from mtbert.checkpoint import MANIFEST, write_checkpoint
from mtbert.data import readers
from mtbert.data.batching import EncodedSplit, TokenRows, joint_text, sentence_table
from mtbert.data.readers import ReadReport, stream_examples
from mtbert.tokenizer import Tokenizer

log = logging.getLogger(__name__)

FORMAT = 1  # the entries' layout; a change gives every entry a new key
CHUNK_ROWS = 16384  # rows per tokenizer call and per Arrow record batch
KEY_LENGTH = 20  # hex digits of an entry's key
SKIPS_KEPT = 20  # skipped rows a summary lists (and a warm start logs) one by one
_FILES = ("examples.arrow", "tokens.arrow", "summary.json")
TOKENS = pa.schema([("ids", pa.list_(pa.int32())), ("types", pa.list_(pa.int8()))])


def cache_root(configured: str | None = None) -> Path:
    """Where entries live: `configured` (the config's `cache_dir`), else $MTBERT_CACHE,
    else $XDG_CACHE_HOME/mtbert/tokens (by default ~/.cache/mtbert/tokens)."""
    chosen = configured or os.environ.get("MTBERT_CACHE")
    if chosen:
        return Path(chosen).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mtbert" / "tokens"


def cached_split(path: Path, options: dict, tokenizer: Tokenizer, siamese: bool,
                 root: Path) -> EncodedSplit:
    """What `stream_examples(path, **options)` reads, tokenized (siamese: a table of distinct
    sentences), mapped from its cache entry under `root`, which is built first if missing or
    damaged. A cold build runs the reader (its checks, logs and errors); a warm start logs
    the summary the reader gave."""
    entry = root / f"{path.stem}-{entry_key(path, options, tokenizer, siamese)}"
    split = open_entry(entry, path)
    if split is None:
        with _locked(root, entry.name):  # another process may have built it meanwhile
            split = open_entry(entry, path) or _build(entry, path, options, tokenizer, siamese)
    with contextlib.suppress(OSError):  # a read-only cache still serves
        os.utime(entry)  # last use: what `prune` goes by
    return split


@dataclass
class CacheEntry:
    """One entry of the cache: its folder, bytes on disk and last use (seconds since epoch)."""

    folder: Path
    bytes: int
    last_used: float


def entries(root: Path) -> list[CacheEntry]:
    """The cache's entries under `root`, least recently used first: folders named
    `<stem>-<key>` holding a manifest. Anything else there is not the cache's and is left out."""
    found = []
    for folder in sorted(root.iterdir()) if root.is_dir() else []:
        stem, _, key = folder.name.rpartition("-")
        if (folder.is_dir() and stem and len(key) == KEY_LENGTH
                and all(c in "0123456789abcdef" for c in key) and (folder / MANIFEST).is_file()):
            size = sum(f.stat().st_size for f in folder.iterdir() if f.is_file())
            found.append(CacheEntry(folder, size, folder.stat().st_mtime))
    return sorted(found, key=lambda e: e.last_used)


def prune(root: Path, unused_for_days: float = 0.0) -> list[CacheEntry]:
    """Remove the entries not used for `unused_for_days` (0: every entry), each under its
    build lock, so no process is building it meanwhile; returns them. Only the cache's own
    entries are touched (`entries`); a run that has an entry mapped keeps reading it (the
    files stay until it closes them), a later run builds it again."""
    cutoff = time.time() - unused_for_days * 86400
    removed = []
    for entry in entries(root):
        if entry.last_used > cutoff:
            continue
        with _locked(root, entry.folder.name):
            shutil.rmtree(entry.folder)
        removed.append(entry)
    return removed


def entry_key(path: Path, options: dict, tokenizer: Tokenizer, siamese: bool) -> str:
    inputs = {"format": FORMAT, "file": _file_digest(path), "options": options,
              "reader": hashlib.sha256(Path(readers.__file__).read_bytes()).hexdigest(),
              "encoder": hashlib.sha256(Path(tokenizer_code.__file__).read_bytes()).hexdigest(),
              "tokenizer": hashlib.sha256(tokenizer.backend.to_str().encode()).hexdigest(),
              "tokenizers": tokenizers.__version__, "max_length": tokenizer.max_length,
              "siamese": siamese}
    text = json.dumps(inputs, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:KEY_LENGTH]


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
    for stale in entry.parent.glob(f".{entry.name}.*"):  # builds killed before their rename
        shutil.rmtree(stale, ignore_errors=True)
    write_checkpoint(entry, lambda folder: _write_entry(folder, path, options, tokenizer,
                                                        siamese))
    split = open_entry(entry, path, report=False)
    if split is None:
        raise OSError(f"{entry}: the token cache entry just written does not open")
    return split


def _write_entry(folder: Path, path: Path, options: dict, tokenizer: Tokenizer,
                 siamese: bool) -> None:
    """Stream the reader's examples (every check of the reader runs here; its errors end the
    build) in chunks of CHUNK_ROWS into the entry's files, each chunk tokenized on a thread
    while the next is read: memory holds a few chunks, never the file. A siamese build
    numbers sentences across chunks by `sentence_key`."""
    report = ReadReport(path, [], [], listed=SKIPS_KEPT)
    examples = stream_examples(path, report=report, **options)
    fields = [("id", pa.string())]
    fields += [("label", pa.float32())] if options.get("label_column") is not None else []
    fields += [("a", pa.int64()), ("b", pa.int64())] if siamese else []
    schema = pa.schema(fields)
    table: dict[bytes, int] = {}
    known_words: dict[str, bytes] = {}  # `encode_flat`'s, for this build
    rows = token_rows = 0
    with contextlib.ExitStack() as stack:
        stack.enter_context(_without_cycle_collection())
        example_file = stack.enter_context(_arrow_file(folder / "examples.arrow", schema))
        token_file = stack.enter_context(_arrow_file(folder / "tokens.arrow", TOKENS))
        tokenizing = stack.enter_context(ThreadPoolExecutor(1))
        bar = stack.enter_context(tqdm(unit="rows", desc=f"tokenize {path.name}"))
        pending = None
        for chunk in iter(lambda: list(itertools.islice(examples, CHUNK_ROWS)), []):
            columns = [pa.array([e.id for e in chunk], pa.string())]
            if "label" in schema.names:
                columns.append(pa.array(np.array([e.label for e in chunk], np.float32)))
            if siamese:
                pairs, texts = sentence_table(chunk, table, sentence_key)
                columns += [pa.array(pairs[:, 0]), pa.array(pairs[:, 1])]
            else:
                texts = [joint_text(e) for e in chunk]
            example_file.write_batch(pa.record_batch(columns, schema=schema))
            token_rows += _write_tokens(token_file, pending)
            pending = tokenizing.submit(tokenizer.encode_flat, texts, known_words)
            rows += len(chunk)
            bar.update(len(chunk))
        token_rows += _write_tokens(token_file, pending)
    summary = {"path": str(path), "rows": rows, "token_rows": token_rows,
               "skipped": report.skipped_count, "skipped_rows": report.skipped}
    (folder / "summary.json").write_text(json.dumps(summary), encoding="utf-8")


@contextlib.contextmanager
def _without_cycle_collection() -> Iterator[None]:
    """A build allocates millions of objects without reference cycles (rows, words, their
    ids); the cyclic garbage collector would traverse the live ones again and again: half
    of a build's time, and it holds the interpreter lock the tokenizing thread needs."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def sentence_key(text: str) -> bytes:
    """What a siamese build's table of distinct sentences keys a sentence by: its 16-byte
    BLAKE2b digest (the table costs ~130 B a distinct sentence, whatever its length; two
    sentences sharing a digest is a 2^-128 event)."""
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()


@contextlib.contextmanager
def _arrow_file(file: Path, schema: pa.Schema) -> Iterator[pa.ipc.RecordBatchFileWriter]:
    with pa.OSFile(str(file), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
        yield writer


def _write_tokens(writer: pa.ipc.RecordBatchFileWriter, encoding: Future | None) -> int:
    """Append a chunk's `Tokenizer.encode_flat` output, when there is one; its rows."""
    if encoding is None:
        return 0
    ids, types, lengths = encoding.result()
    offsets = pa.array(np.append(0, np.cumsum(lengths)).astype(np.int32))
    writer.write_batch(pa.record_batch([pa.ListArray.from_arrays(offsets, ids),
                                        pa.ListArray.from_arrays(offsets, types)],
                                       schema=TOKENS))
    return len(lengths)
