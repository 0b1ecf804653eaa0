"""Reading a task's splits: where its files are, which columns, how much of them.

The built-in tasks are presets (`mtbert.presets`) of the same `TaskConfig` a user writes.
Training and evaluation load splits tokenized, through the token cache (`data/cache.py`).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from mtbert.config import ExperimentConfig, TaskConfig
from mtbert.data.batching import EncodedSplit
from mtbert.data.cache import cache_root, cached_split
from mtbert.data.readers import Example, read_examples
from mtbert.errors import ConfigError
from mtbert.tokenizer import Tokenizer

SPLITS = ("train", "dev", "test")
EVAL_SAMPLE_SEED = 0  # dev subsamples: the same examples for every config and seed


def split_file(task: TaskConfig, split: str, data_dir: str | Path) -> Path | None:
    name = {"train": task.train_file, "dev": task.dev_file, "test": task.test_file}[split]
    if name is None:
        return None
    path = Path(name)
    return path if path.is_absolute() else Path(data_dir) / path


def file_layout(task: TaskConfig) -> dict:
    """How the task's files are written (`stream_examples` / `read_examples` keywords): their
    quoting, and the names of their fields when they have no header line."""
    return {"quoting": task.quoting, "columns": task.columns}


def reading_options(task: TaskConfig, split: str, strict: bool = False,
                    max_skipped_share: float | None = None) -> dict:
    """`read_examples`' keyword arguments for a split of `task` (test files without labels):
    what a split's examples depend on besides the file, hence part of its cache key."""
    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r}; known: {SPLITS}")
    labelled = split != "test"
    return dict(
        text_columns=list(task.text_columns),
        label_column=task.label_column if labelled else None, id_column=task.id_column,
        num_classes=task.num_classes if task.kind == "classification" else None,
        label_range=tuple(task.label_range) if task.kind == "regression" else None,
        label_names=tuple(task.label_names or ()), strict=strict,
        max_skipped_share=max_skipped_share, **file_layout(task))


def read_split(task: TaskConfig, split: str, data_dir: str | Path, strict: bool = False,
               max_skipped_share: float | None = None) -> list[Example] | None:
    """Examples of one split, or None when the task has no file for it.

    Test files are read without labels. Malformed rows are skipped (errors if `strict`);
    more than `max_skipped_share` of a file's rows malformed is an error.
    """
    options = reading_options(task, split, strict, max_skipped_share)
    path = split_file(task, split, data_dir)
    return None if path is None else read_examples(path, **options).examples


def load_split(task: TaskConfig, split: str, config: ExperimentConfig, tokenizer: Tokenizer,
               siamese: bool) -> EncodedSplit | None:
    """One split as `read_split` reads it under `config`, tokenized once into the token
    cache and mapped from it; None when the task has no file for it."""
    options = reading_options(task, split, config.strict_data, config.max_skipped_share)
    path = split_file(task, split, config.data_dir)
    if path is None:
        return None
    return cached_split(path, options, tokenizer, siamese, cache_root(config.cache_dir))


def sample_rows(count: int, limit: int | None = None, fraction: float | None = None,
                seed: int = 0) -> np.ndarray | None:
    """The rows, in order, of a seeded sample of `fraction` of `count` rows, at most `limit`;
    None when the sample would keep every row."""
    keep = count
    if fraction is not None:
        keep = max(1, math.ceil(fraction * keep))
    if limit is not None:
        keep = min(keep, limit)
    if keep >= count:
        return None
    return np.sort(np.random.default_rng(seed).permutation(count)[:keep])


def subsample(examples: list[Example] | None, limit: int | None = None,
              fraction: float | None = None, seed: int = 0) -> list[Example] | None:
    """A seeded sample (in file order) of `fraction` of the examples, at most `limit`."""
    rows = None if examples is None else sample_rows(len(examples), limit, fraction, seed)
    return examples if rows is None else [examples[i] for i in rows]


def subsample_split(split: EncodedSplit | None, limit: int | None = None,
                    fraction: float | None = None, seed: int = 0) -> EncodedSplit | None:
    """`subsample` of a tokenized split: the same rows."""
    rows = None if split is None else sample_rows(len(split), limit, fraction, seed)
    return split if rows is None else split.subset(rows)
