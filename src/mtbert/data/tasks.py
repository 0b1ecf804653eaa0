"""The built-in tasks are presets of the same `TaskConfig` a user writes in YAML.

A preset is plain data; `config.resolve_presets` merges the user's keys over it. Nothing
outside this table names SST, Quora or STS.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from mtbert.config import ConfigError, TaskConfig
from mtbert.data.readers import Example, read_examples

PRESETS: dict[str, dict] = {
    "sst": dict(
        text_columns=["sentence"], label_column="sentiment", kind="classification",
        num_classes=5, metric="accuracy", prediction_column="Predicted_Sentiment",
        label_names=["very negative", "negative", "neutral", "positive", "very positive"],
        train_file="ids-sst-train.csv", dev_file="ids-sst-dev.csv",
        test_file="ids-sst-test-student.csv"),
    "cfimdb": dict(
        text_columns=["sentence"], label_column="sentiment", kind="classification",
        num_classes=2, metric="accuracy", prediction_column="Predicted_Sentiment",
        label_names=["negative", "positive"], train_file="ids-cfimdb-train.csv",
        dev_file="ids-cfimdb-dev.csv", test_file="ids-cfimdb-test-student.csv"),
    "quora": dict(
        text_columns=["sentence1", "sentence2"], label_column="is_duplicate",
        kind="classification", num_classes=2, loss="bce", metric="accuracy",
        label_names=["not duplicate", "duplicate"], prediction_column="Predicted_Is_Paraphrase",
        train_file="quora-train.csv", dev_file="quora-dev.csv", test_file=None),
    "sts": dict(
        text_columns=["sentence1", "sentence2"], label_column="similarity", kind="regression",
        label_range=[0.0, 5.0], metric="pearson", prediction_column="Predicted_Similarity",
        train_file="sts-train.csv", dev_file="sts-dev.csv", test_file="sts-test-student.csv"),
}

SPLITS = ("train", "dev", "test")
EVAL_SAMPLE_SEED = 0  # dev subsamples: the same examples for every config and seed


def default_loss(task: TaskConfig) -> str:
    if task.loss is not None:
        return task.loss
    return "cross_entropy" if task.kind == "classification" else "mse"


def output_size(task: TaskConfig) -> int:
    """Logits per example: one per class for cross entropy, else a single number."""
    if task.kind == "classification" and default_loss(task) == "cross_entropy":
        return task.num_classes
    return 1


def split_file(task: TaskConfig, split: str, data_dir: str | Path) -> Path | None:
    name = {"train": task.train_file, "dev": task.dev_file, "test": task.test_file}[split]
    if name is None:
        return None
    path = Path(name)
    return path if path.is_absolute() else Path(data_dir) / path


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
        strict=strict, max_skipped_share=max_skipped_share)
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
