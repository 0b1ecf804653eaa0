"""The public Python API: load a trained model and ask it about sentences of your own.

    import mtbert
    model = mtbert.load("runs/default")           # a run, its best/, or an export folder
    model.tasks["sst"].labels                       # ('very negative', ..., 'very positive')
    model.predict("sst", ["a gripping film"])       # [Prediction(label='positive', ...)]
    model.predict("quora", [("How do I learn Python?", "How can I learn Python?")])
    model.encode(["a gripping film"], normalize=True)  # (1, H) sentence embeddings

Predictions go through `evaluation.head_outputs` / `to_predictions`, the code that scores
dev sets, on length-sorted batches with autograd off.
"""

from __future__ import annotations

import csv
import itertools
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from mtbert.checkpoint import claim_output
from mtbert.config import ConfigError, ExperimentConfig, TaskConfig
from mtbert.data.batching import encode_split
from mtbert.data.readers import (
    DataError,
    Example,
    ReadReport,
    check_skipped_share,
    iter_examples,
)
from mtbert.data.tasks import file_layout
from mtbert.evaluation import head_outputs, map_batches, output_probabilities, to_predictions
from mtbert.model.heads import is_siamese
from mtbert.model.multitask import MultitaskModel
from mtbert.model_folder import load_model
from mtbert.tokenizer import Tokenizer

log = logging.getLogger(__name__)

Input = str | tuple[str, str]
CHUNK_ROWS = 8192  # rows `predict_file` holds at a time
OUTPUT_FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv", ".tsv": "tsv"}


class InputError(DataError):
    """One input cannot be used: `index` is its position, `reason` says why."""

    def __init__(self, index: int, reason: str):
        super().__init__(f"input {index}: {reason}")
        self.index, self.reason = index, reason


@dataclass(frozen=True)
class TaskInfo:
    """What a task takes and gives."""

    name: str
    kind: str  # "classification" or "regression"
    pair: bool  # inputs are (text, text) pairs
    text_columns: tuple[str, ...]
    labels: tuple[str, ...] | None  # class names in index order (classification)
    label_range: tuple[float, float] | None  # score range (regression)


@dataclass(frozen=True)
class Prediction:
    """A class name with its index and every class's probability, or a regression score."""

    label: str | float
    label_id: int | None = None
    probabilities: dict[str, float] | None = None


def task_info(task: TaskConfig) -> TaskInfo:
    labels = None
    if task.kind == "classification":
        labels = tuple(task.label_names or (str(i) for i in range(task.num_classes)))
    return TaskInfo(task.name, task.kind, task.is_pair, tuple(task.text_columns), labels,
                    tuple(task.label_range) if task.kind == "regression" else None)


def load(path: str | Path, quantize: str | None = None, device: str = "cpu",
         batch_size: int | None = None, dtype: str = "fp32") -> Model:
    """A trained model from a run folder, its `best/`, or an `mtbert export` folder.

    `dtype="bf16"`: every weight and matrix product in bf16 (fast on CPUs with AVX512-BF16 or
    AMX, and on GPUs; outputs differ from fp32's by bf16 rounding). `quantize="int8"`: the
    encoder's matrix products in int8 (CPU only; faster, slightly different outputs).
    `batch_size` defaults to the run's `train.eval_batch_size`.
    """
    if quantize not in (None, "int8"):
        raise ConfigError(f"quantize: expected None or 'int8', got {quantize!r}")
    if dtype not in ("fp32", "bf16"):
        raise ConfigError(f"dtype: expected 'fp32' or 'bf16', got {dtype!r}")
    if quantize and dtype != "fp32":
        raise ConfigError("quantize='int8' keeps the rest of the model fp32; use dtype='fp32'")
    if quantize and torch.device(device).type != "cpu":
        raise ConfigError("quantize='int8' runs on the CPU only")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(
            batch_size, int) or batch_size < 1):
        raise ConfigError(f"batch_size: expected a whole number >= 1, got {batch_size!r}")
    model, tokenizer, config = load_model(path)
    if quantize:
        from mtbert.inference import quantize_dynamic

        model = quantize_dynamic(model)
    if dtype == "bf16":
        from mtbert.inference import to_bf16

        model = to_bf16(model)
    return Model(model.to(device), tokenizer, config, batch_size)


class Model:
    """A trained multitask model: `tasks`, `predict`, `predict_file`, `encode`."""

    def __init__(self, model: MultitaskModel, tokenizer: Tokenizer, config: ExperimentConfig,
                 batch_size: int | None = None):
        self.model, self.tokenizer, self.config = model.eval(), tokenizer, config
        self.batch_size = batch_size or config.train.eval_batch_size
        self.tasks = {name: task_info(task) for name, task in model.tasks.items()}
        self._truncation_warned = False

    def __repr__(self) -> str:
        return f"mtbert.Model(tasks={list(self.tasks)})"

    @property
    def embedding_task(self) -> str | None:
        """The task whose sentence embeddings `encode` gives: the first siamese task (its
        pooling and conditioning); None: the plain encoder, mean-pooled."""
        return next((n for n, t in self.model.tasks.items() if is_siamese(t)), None)

    def predict(self, task: str, inputs: Sequence[Input],
                batch_size: int | None = None) -> list[Prediction]:
        """One `Prediction` per input: texts for single-sentence tasks, (text, text) pairs
        for pair tasks. Texts longer than `max_length` tokens are truncated (warned once)."""
        return self.predict_examples(self._task(task), self.examples(task, inputs), batch_size)

    def examples(self, task: str | None, inputs: Sequence[Input]) -> list[Example]:
        """`inputs` checked and stripped as `predict(task, ...)` takes them (`task=None`: single
        texts, as `encode` takes them); `InputError` names the first bad one."""
        if isinstance(inputs, str):
            fix = (f"predict({task!r}, [text])" if task else "encode([text])")
            raise TypeError(f"inputs: expected a list of inputs, got the str {inputs!r:.40}, "
                            f"whose characters would each be an input; for one text call "
                            f"model.{fix}")
        config = None if task is None else self._task(task)
        return [Example(str(i), _texts(config, i, value), None)
                for i, value in enumerate(inputs)]

    def predict_examples(self, task: TaskConfig, examples: list[Example],
                         batch_size: int | None = None) -> list[Prediction]:
        """`predict` on checked `Example`s (texts stripped, one or two per the task)."""
        if not examples:
            return []
        split = encode_split(examples, self.tokenizer, is_siamese(task))
        self._warn_truncation()
        outputs = head_outputs(self.model, task.name, split, batch_size or self.batch_size,
                               self.tokenizer.pad_id)
        values = to_predictions(task, outputs)
        if task.kind == "regression":
            return [Prediction(float(v)) for v in values]
        probabilities = output_probabilities(task, outputs)
        names = self.tasks[task.name].labels
        return [Prediction(names[int(k)], int(k), dict(zip(names, row)))
                for k, row in zip(values.tolist(), probabilities.tolist())]

    @torch.inference_mode()
    def encode(self, texts: Sequence[str], normalize: bool = False,
               batch_size: int | None = None) -> np.ndarray:
        """(N, H) float32 sentence embeddings as `embedding_task` was trained to use them
        (its pooling and conditioning); `normalize`: unit length (cosine = dot product)."""
        task = self.embedding_task
        pooling = self.model.tasks[task].head.pooling if task else "mean"
        examples = self.examples(None, texts)
        split = encode_split(examples, self.tokenizer, siamese=False)
        self._warn_truncation()
        vectors = map_batches(self.model, split,
                              lambda batch: self.model.sentence_vectors(task, batch, pooling),
                              batch_size or self.batch_size, self.tokenizer.pad_id)
        if not examples:
            vectors = torch.empty(0, self.model.encoder.config.hidden_size)
        return (F.normalize(vectors, dim=-1) if normalize else vectors).numpy()

    def predict_file(self, task: str, source: str | Path, output: str | Path, *,
                     text_columns: Sequence[str] | None = None, id_column: str | None = None,
                     input_format: str | None = None, output_format: str | None = None,
                     probabilities: bool = False, chunk_rows: int = CHUNK_ROWS,
                     batch_size: int | None = None, progress: bool = False) -> FileReport:
        """Predict every row of a CSV/TSV/JSONL file ("-": standard input) into `output`
        ("-": standard output), `chunk_rows` rows at a time, so memory stays constant.

        The file is read as the task's own files are (their quoting; field names for files
        without a header line, as GLUE's CoLA). Columns are found by name (default: the
        task's `text_columns` and `id_column`; rows without the task's id column get their
        0-based row index; an `id_column` given must exist). Malformed rows are skipped and
        logged with file:line; more than the run's `max_skipped_share` of them is an error. A
        file `output` (never `source`) is written under a temporary name and renamed when
        complete, so an error leaves any earlier file in place.
        """
        config = self._task(task)
        columns = list(text_columns or config.text_columns)
        if len(columns) != len(config.text_columns):
            kind = "a pair of texts: two" if config.is_pair else "a single text: one"
            raise ConfigError(f"task {task!r} takes {kind} text column, got {columns}")
        fmt = _output_format(output, output_format)
        if str(output) != "-":
            claim_output(output, [] if str(source) == "-" else [source], overwrite=True,
                         folder=False)
        report = ReadReport(Path(str(source)), [], [])
        examples = iter_examples(source, columns, None, id_column=id_column or config.id_column,
                                 file_format=input_format, report=report,
                                 id_required=id_column is not None,
                                 **file_layout(config))
        start = time.perf_counter()
        rows = 0
        with _output(output) as stream, tqdm(desc=f"predict {task}", unit=" rows",
                                             file=sys.stderr, disable=not progress) as bar:
            write = _writer(fmt, stream, self.tasks[task], probabilities)
            for chunk in _chunks(examples, chunk_rows):
                write(chunk, self.predict_examples(config, chunk, batch_size))
                rows += len(chunk)
                bar.update(len(chunk))
            check_skipped_share(report, rows, self.config.max_skipped_share)  # before renaming
        return FileReport(rows, report.skipped, time.perf_counter() - start)

    def _task(self, task: str) -> TaskConfig:
        if task not in self.model.tasks:
            raise ConfigError(f"unknown task {task!r}; this model's tasks: "
                              f"{', '.join(self.model.tasks)}")
        return self.model.tasks[task]

    def _warn_truncation(self) -> None:
        if self.tokenizer.truncated and not self._truncation_warned:
            self._truncation_warned = True
            log.warning("%d text(s) were longer than max_length=%d tokens and were truncated "
                        "(warned once)", self.tokenizer.truncated, self.tokenizer.max_length)


@dataclass
class FileReport:
    """What `predict_file` did: rows predicted, (line, reason) of rows skipped, seconds."""

    rows: int
    skipped: list[tuple[int, str]]
    seconds: float


def _single(index: int, value: object) -> str:
    if not isinstance(value, str):
        raise InputError(index, f"expected a text, got {type(value).__name__} {value!r:.80}")
    if not value.strip():
        raise InputError(index, "empty text")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as error:  # a lone surrogate, e.g. from JSON's "\ud800"
        raise InputError(index, f"not valid Unicode at character {error.start}") from None
    return value.strip()


def _texts(task: TaskConfig | None, index: int, value: object) -> tuple[str, ...]:
    """The stripped text(s) of one input, checked against the task's input kind (None:
    a single text)."""
    if task is None or not task.is_pair:
        if task is not None and not isinstance(value, str):
            raise InputError(index, f"task {task.name!r} takes single texts, got "
                                    f"{type(value).__name__} {value!r:.80}")
        return (_single(index, value),)
    if isinstance(value, str) or not isinstance(value, (tuple, list)) or len(value) != 2:
        raise InputError(index, f"task {task.name!r} takes (text, text) pairs, got "
                                f"{type(value).__name__} {value!r:.80}")
    return tuple(_single(index, text) for text in value)


def _chunks(items: Iterable[Example], size: int) -> Iterator[list[Example]]:
    iterator = iter(items)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


def _output_format(output: str | Path, output_format: str | None) -> str:
    if output_format is not None:
        if output_format not in OUTPUT_FORMATS.values():
            raise ConfigError(f"output format: expected jsonl, csv or tsv, got "
                              f"{output_format!r}")
        return output_format
    if str(output) == "-":
        return "jsonl"
    suffix = Path(output).suffix.lower()
    if suffix not in OUTPUT_FORMATS:
        raise ConfigError(f"{output}: cannot tell the output format from the suffix "
                          f"{suffix!r}; name it .jsonl, .csv or .tsv, or give --format")
    return OUTPUT_FORMATS[suffix]


@contextmanager
def _output(output: str | Path) -> Iterator[TextIO]:
    """Standard output, or a file written under a temporary name and renamed when done."""
    if str(output) == "-":
        yield sys.stdout
        sys.stdout.flush()
        return
    path = Path(output)
    tmp = path.with_name(f".{path.name}.partial")
    try:
        stream = open(tmp, "w", encoding="utf-8", newline="")
    except OSError as error:
        raise OSError(f"cannot write {path}: {error.strerror or error}") from None
    try:
        with stream:
            yield stream
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _writer(fmt: str, stream: TextIO, task: TaskInfo, probabilities: bool
            ) -> Callable[[list[Example], list[Prediction]], None]:
    """A function writing (examples, predictions) rows as JSON lines or CSV/TSV."""
    key = "label" if task.kind == "classification" else "score"
    with_probabilities = probabilities and task.kind == "classification"
    if fmt == "jsonl":
        def write(examples: list[Example], predictions: list[Prediction]) -> None:
            for example, prediction in zip(examples, predictions):
                record = {"id": example.id, key: prediction.label}
                if with_probabilities:
                    record["probabilities"] = prediction.probabilities
                stream.write(json.dumps(record, ensure_ascii=False) + "\n")
        return write
    table = csv.writer(stream, delimiter="\t" if fmt == "tsv" else ",", lineterminator="\n")
    header = ["id", key, *(f"p_{name}" for name in task.labels or () if with_probabilities)]

    def write_rows(examples: list[Example], predictions: list[Prediction]) -> None:
        if header:  # written with the first rows: a file that fails to read leaves nothing
            table.writerow(header)
            header.clear()
        for example, prediction in zip(examples, predictions):
            extra = prediction.probabilities.values() if with_probabilities else ()
            label = prediction.label
            table.writerow([example.id, f"{label:.6g}" if isinstance(label, float) else label,
                            *(f"{p:.6g}" for p in extra)])
    return write_rows
