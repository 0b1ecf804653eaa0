"""Metrics, the overall score, predictions and prediction files."""

from __future__ import annotations

import csv
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from mtbert.config import TaskConfig
from mtbert.data.batching import Batch, EncodedSplit, collate, sorted_batches
from mtbert.losses import loss_class
from mtbert.metrics import METRICS
from mtbert.model.multitask import MultitaskModel

log = logging.getLogger(__name__)
PAIR_ROWS = 4096  # pairs a siamese head scores at once in `head_outputs`


def to_predictions(task: TaskConfig, outputs: torch.Tensor) -> torch.Tensor:
    """Head outputs -> predictions (N,): class indices, or scores in the label range, as the
    task's loss decodes them."""
    return loss_class(task).decode(task, outputs)


def output_probabilities(task: TaskConfig, outputs: torch.Tensor) -> torch.Tensor:
    """Head outputs -> class probabilities (N, C) of a classification task, or the unclipped
    scores (N,) of a regression task."""
    if task.kind != "classification":
        return outputs
    return loss_class(task).probabilities(task, outputs)


@torch.inference_mode()
def map_batches(model: MultitaskModel, split: EncodedSplit,
                function: Callable[[Batch], torch.Tensor], batch_size: int = 128,
                pad_id: int = 0, progress=None) -> torch.Tensor:
    """`function(batch)` over length-sorted batches of `split` (model in eval mode), gathered
    as float32 rows in the split's order: the one loop every prediction path runs."""
    device = next(model.parameters()).device
    batches = sorted_batches(split.lengths(), batch_size)
    out = torch.empty(0)
    with evaluating(model):
        for rows in (progress(batches) if progress else batches):
            batch = collate(split, rows, pad_id).to(device)
            values = function(batch).float().cpu()
            if out.shape[0] != len(split):
                out = values.new_empty((len(split), *values.shape[1:]))
            out[batch.rows] = values
    return out


@contextmanager
def evaluating(model: MultitaskModel) -> Iterator[None]:
    """The model in eval mode (no dropout) meanwhile, then back in the mode it was in."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def head_outputs(model: MultitaskModel, task: str, split: EncodedSplit, batch_size: int = 128,
                 pad_id: int = 0, progress=None) -> torch.Tensor:
    """Raw head outputs (logits or scores) for every example of `split`, in its order.

    A siamese split's distinct sentences are encoded once, in batches sorted by their own
    length (batches of equal lengths need no padding mask at all), then the head scores the
    pairs; batching pairs would pad each sentence to the longest of 2 x batch_size.
    """
    if split.pair_index is None:
        return map_batches(model, split, lambda batch: model(task, batch).predictions,
                           batch_size, pad_id, progress)
    vectors = map_batches(model, split.sentences(),
                          lambda batch: model.sentence_vectors(task, batch), batch_size, pad_id,
                          progress)
    weight = next(model.parameters())  # the model's device and dtype (bf16 models)
    vectors = vectors.to(weight.device, weight.dtype)
    pairs = torch.from_numpy(split.pair_index).to(weight.device)
    with torch.inference_mode(), evaluating(model):
        return torch.cat([model.heads[task](vectors, rows).predictions.float().cpu()
                          for rows in pairs.split(PAIR_ROWS)])


def predict(model: MultitaskModel, task: str, split: EncodedSplit, batch_size: int = 128,
            pad_id: int = 0, progress=None) -> np.ndarray:
    """Predictions (class indices or scores) for every example of `split`, in its order."""
    outputs = head_outputs(model, task, split, batch_size, pad_id, progress)
    return to_predictions(model.tasks[task], outputs).numpy()


def predict_outputs(model: MultitaskModel, task: str, split: EncodedSplit, batch_size: int = 128,
                    pad_id: int = 0) -> np.ndarray:
    """`output_probabilities` for every example of `split`, in the split's order."""
    outputs = head_outputs(model, task, split, batch_size, pad_id)
    return output_probabilities(model.tasks[task], outputs).numpy()


def metric_values(task: TaskConfig, predictions: np.ndarray,
                  labels: np.ndarray) -> dict[str, float]:
    """Each of the task's metrics; an undefined correlation (constant predictions) is 0."""
    values = {}
    for name in task.metrics:
        value = METRICS[name].function(predictions, labels)
        if math.isnan(value) and np.std(predictions) == 0:
            log.warning("%s: every prediction is %g, so %s correlation is undefined; scored "
                        "0.0 (the model has collapsed or not learned)", task.name,
                        predictions[0], name)
            value = 0.0
        values[name] = value
    return values


def task_scores(task: TaskConfig, predictions: np.ndarray,
                labels: np.ndarray) -> dict[str, float]:
    """`{task: score}`, the score being the mean of the task's metrics (GLUE's rule), and
    `{task/metric: value}` for each metric of a task that has several."""
    values = metric_values(task, predictions, labels)
    scores = {task.name: float(np.mean(list(values.values())))}
    if len(values) > 1:
        scores.update({f"{task.name}/{name}": value for name, value in values.items()})
    return scores


def metric(task: TaskConfig, predictions: np.ndarray, labels: np.ndarray) -> float:
    """The task's score: its metric, or the mean of its metrics."""
    return task_scores(task, predictions, labels)[task.name]


def score_columns(tasks: dict[str, TaskConfig]) -> list[tuple[str, str]]:
    """(key in a scores dict, what it is) for every task score and metric, in task order:
    `("sst", "accuracy")`, or `("mrpc/f1", "f1"), ("mrpc/accuracy", "accuracy"),
    ("mrpc", "mean(f1, accuracy)")` for a task with several metrics."""
    columns = []
    for name, task in tasks.items():
        if len(task.metrics) > 1:
            columns += [(f"{name}/{m}", m) for m in task.metrics]
            columns.append((name, f"mean({', '.join(task.metrics)})"))
        else:
            columns.append((name, task.metrics[0]))
    return columns


def normalised(task: TaskConfig, value: float) -> float:
    """A task score on [0, 1]: correlation-like scores r become (r + 1) / 2 (a task's metrics
    share one range)."""
    return METRICS[task.metrics[0]].normalised(value)


def overall_score(tasks: dict[str, TaskConfig], scores: dict[str, float],
                  how: str = "normalised") -> float:
    """Mean of the task scores, normalised (for sst, quora and sts the standard
    `(sst_acc + para_acc + (sts_pearson + 1) / 2) / 3`) or as they are (`how="mean"`: the GLUE
    score, MRPC and STS-B each the mean of their two metrics)."""
    values = [value if how == "mean" else normalised(tasks[name], value)
              for name, value in scores.items() if name in tasks]
    return float(sum(values) / len(values)) if values else math.nan


def write_predictions(path: Path, task: TaskConfig, example_ids: list[str],
                      predictions: np.ndarray) -> None:
    """`id,Predicted_...` CSV, one row per example, in the input file's order."""
    path.parent.mkdir(parents=True, exist_ok=True)
    integer = task.kind == "classification"
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["id", task.prediction_column])
        for example_id, value in zip(example_ids, predictions):
            writer.writerow([example_id, int(value) if integer else f"{value:.4f}"])


def format_table(rows: dict[str, dict[str, float]], tasks: dict[str, TaskConfig]) -> str:
    """A Markdown table: one row per split, a column per task metric (and task score), then
    overall."""
    columns = score_columns(tasks)
    header = ["split"] + [f"{key.split('/')[0]} {what}" for key, what in columns] + ["overall"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for split, scores in rows.items():
        cells = [f"{scores[key]:.3f}" if key in scores else "-" for key, _ in columns]
        lines.append("| " + " | ".join([split, *cells, f"{scores['overall']:.3f}"]) + " |")
    return "\n".join(lines)


def evaluate_splits(model: MultitaskModel, tokenizer, config, splits: Sequence[str],
                    predictions_dir: Path | None = None, progress=None,
                    limit: int | None = None) -> dict[str, dict[str, float]]:
    """Score every task on each labelled split and write `{task}-{split}-output.csv` files.

    `limit` keeps the first `limit` examples of each split (quick checks). Returns
    {split: {task: score, ..., "overall": score}} for the labelled splits (`task_scores`).
    """
    from mtbert.data.tasks import load_split
    from mtbert.model.heads import is_siamese

    table = {}
    for split in splits:
        scores = {}
        for name, task in model.tasks.items():
            encoded = load_split(task, split, config, tokenizer, is_siamese(task))
            if encoded is None:
                continue
            if limit is not None and limit < len(encoded):
                encoded = encoded.subset(np.arange(limit))
            predictions = predict(model, name, encoded, config.train.eval_batch_size,
                                  tokenizer.pad_id, progress)
            if predictions_dir is not None:
                write_predictions(predictions_dir / f"{name}-{split}-output.csv", task,
                                  encoded.example_ids, predictions)
            if encoded.labels is not None:
                scores.update(task_scores(task, predictions, encoded.labels.numpy()))
        if scores:
            scores["overall"] = overall_score(model.tasks, scores, config.overall_score)
            table[split] = scores
    return table
