"""Reading a task's splits: where its files are, which columns, how much of them.

The built-in tasks are presets (`mtbert.presets`) of the same `TaskConfig` a user writes.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from mtbert.config import TaskConfig
from mtbert.data.readers import Example, read_examples
from mtbert.errors import ConfigError

SPLITS = ("train", "dev", "test")
EVAL_SAMPLE_SEED = 0  # dev subsamples: the same examples for every config and seed


def split_file(task: TaskConfig, split: str, data_dir: str | Path) -> Path | None:
    name = {"train": task.train_file, "dev": task.dev_file, "test": task.test_file}[split]
    if name is None:
        return None
    path = Path(name)
    return path if path.is_absolute() else Path(data_dir) / path


def file_layout(task: TaskConfig) -> dict:
    """How the task's files are written (`read_examples` / `iter_examples` keywords): their
    quoting, and the names of their fields when they have no header line."""
    return {"quoting": task.quoting, "columns": task.columns}


def read_split(task: TaskConfig, split: str, data_dir: str | Path, strict: bool = False,
               max_skipped_share: float | None = None) -> list[Example] | None:
    """Examples of one split, or None when the task has no file for it.

    Test files are read without labels. Malformed rows are skipped (errors if `strict`);
    more than `max_skipped_share` of a file's rows malformed is an error.
    """
    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r}; known: {SPLITS}")
    path = split_file(task, split, data_dir)
    if path is None:
        return None
    labelled = split != "test"
    report = read_examples(
        path, task.text_columns, task.label_column if labelled else None,
        id_column=task.id_column,
        num_classes=task.num_classes if task.kind == "classification" else None,
        label_range=tuple(task.label_range) if task.kind == "regression" else None,
        label_names=task.label_names or (), strict=strict, max_skipped_share=max_skipped_share,
        **file_layout(task))
    return report.examples


def subsample(examples: list[Example] | None, limit: int | None = None,
              fraction: float | None = None, seed: int = 0) -> list[Example] | None:
    """A seeded sample (in file order) of `fraction` of the examples, at most `limit`."""
    if examples is None:
        return None
    keep = len(examples)
    if fraction is not None:
        keep = max(1, math.ceil(fraction * keep))
    if limit is not None:
        keep = min(keep, limit)
    if keep >= len(examples):
        return examples
    chosen = np.sort(np.random.default_rng(seed).permutation(len(examples))[:keep])
    return [examples[i] for i in chosen]
