"""Teacher-annealed distillation (BAM!: Clark et al. 2019, "BAM! Born-Again Multi-Task Networks
for Natural Language Understanding", ACL).

Single-task teachers teach one multitask student. Each step a task with a teacher trains on
lambda * L_gold + (1 - lambda) * L_teacher, lambda rising linearly from 0 at the first step to
1 at the end (teacher annealing): early on the student imitates its teachers, by the end it
learns from the gold labels alone and may surpass them. For cross entropy and squared error
the mixed losses have the gradient of BAM!'s mixed target lambda y + (1 - lambda) teacher.

L_teacher, classification: T^2 * cross entropy between the teacher's probabilities softened
by the temperature T (p^(1/T), renormalised) and the student's at T (Hinton et al. 2015);
regression: the task's own loss with the teacher's scores as labels.

A teacher is an mtbert run (or model folder) that has the task, fine-tuned from the student's
backbone (it reads the student's token ids, so its vocabulary must be the student's), or a
prediction file written by `mtbert predict --task T --input TRAIN_FILE --probabilities
--output FILE` with FILE ending in .jsonl (a record per training example with its `id` and
`probabilities` or `score`), .csv or .tsv (columns `id` and `p_<class>`... or `score`).
Teachers are run once, over the training split, before training starts.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mtbert.config import ConfigError, DistillConfig, TaskConfig
from mtbert.data.batching import EncodedSplit
from mtbert.losses import build_loss, loss_class, loss_name
from mtbert.tokenizer import Tokenizer

log = logging.getLogger(__name__)


def soften(probabilities: Tensor, temperature: float) -> Tensor:
    """p^(1/T), renormalised: the softmax of the logits divided by T."""
    return (probabilities.clamp_min(torch.finfo(probabilities.dtype).tiny).log()
            / temperature).softmax(-1)


def teacher_loss(task: TaskConfig, loss, outputs: Tensor, targets: Tensor,
                 temperature: float) -> Tensor:
    """The student's loss against its teacher: `targets` are the teacher's probabilities
    (N, C) of a classification task or its scores (N,) of a regression task."""
    if task.kind != "classification":
        return loss(outputs, targets)
    student = loss_class(task).probabilities(task, outputs / temperature)  # (N, C)
    log_q = student.clamp_min(torch.finfo(student.dtype).tiny).log()
    cross_entropy = -(soften(targets, temperature) * log_q).sum(-1).mean()
    return temperature ** 2 * cross_entropy


class TeacherAnnealing:
    """`(task, outputs, gold_loss, rows, progress) -> (loss, logged)`; tasks without a teacher
    keep their gold loss, so with no teachers this changes nothing. `gold_loss` is the task's
    own loss: auxiliary terms (MNRL, mixture-of-experts losses) are added by the trainer
    after this mix, at their full weight whatever lambda is (`mtbert.auxiliary`)."""

    def __init__(self, tasks: dict[str, TaskConfig], targets: dict[str, Tensor],
                 temperature: float = 1.0, anneal: bool = True):
        self.tasks, self.targets = tasks, targets
        self.temperature, self.anneal = temperature, anneal
        self.losses = {name: build_loss(loss_name(tasks[name]), **tasks[name].loss_options)
                       for name in targets}

    def gold_weight(self, progress: float) -> float:
        """lambda at `progress` (the share of training done, 0 .. 1)."""
        return min(max(progress, 0.0), 1.0) if self.anneal else 0.0

    def __call__(self, task: str, outputs: Tensor, gold_loss: Tensor, rows: Tensor,
                 progress: float) -> tuple[Tensor, dict[str, float]]:
        if task not in self.targets:
            return gold_loss, {}
        targets = self.targets[task][rows].to(outputs.device)
        teacher = teacher_loss(self.tasks[task], self.losses[task], outputs.float(), targets,
                               self.temperature)
        weight = self.gold_weight(progress)
        return (weight * gold_loss + (1.0 - weight) * teacher,
                {"teacher_loss": teacher.item(), "lambda": weight})


def teacher_targets(task: TaskConfig, source: str, split: EncodedSplit, tokenizer: Tokenizer,
                    batch_size: int) -> Tensor:
    """The teacher's probabilities (N, C) or scores (N,) for every example of `split`, which
    `tokenizer` (the student's) encoded."""
    path = Path(source)
    if path.is_file():
        return _targets_from_file(task, path, split)
    from mtbert.evaluation import predict_outputs
    from mtbert.model.heads import is_siamese
    from mtbert.model_folder import load_model

    model, teacher_tokenizer, _ = load_model(path)
    if task.name not in model.tasks:
        raise ConfigError(f"distill.teachers.{task.name}: {source} has no task {task.name!r} "
                          f"(it has {sorted(model.tasks)})")
    taught = model.tasks[task.name]
    if (taught.kind, taught.num_classes) != (task.kind, task.num_classes):
        raise ConfigError(f"distill.teachers.{task.name}: {source} has another kind of "
                          f"{task.name!r} ({taught.kind}, {taught.num_classes} classes)")
    if is_siamese(taught) != (split.pair_index is not None):
        raise ConfigError(f"distill.teachers.{task.name}: the teacher encodes pairs "
                          f"{'apart' if is_siamese(taught) else 'jointly'}, the student not; "
                          "give its predictions as a file instead")
    theirs, ours = ({i: token for token, i in t.backend.get_vocab().items()}
                    for t in (teacher_tokenizer, tokenizer))
    if theirs != ours:
        first = min(i for i in theirs.keys() | ours.keys() if theirs.get(i) != ours.get(i))
        raise ConfigError(f"distill.teachers.{task.name}: {source} has another vocabulary than "
                          f"the student's backbone (id {first} is {theirs.get(first)!r} there, "
                          f"{ours.get(first)!r} here); teachers read the student's token ids: "
                          "give its predictions as a file instead")
    log.info("%s: running teacher %s over %d training examples", task.name, source, len(split))
    return torch.from_numpy(predict_outputs(model, task.name, split, batch_size,
                                            tokenizer.pad_id))


def _targets_from_file(task: TaskConfig, path: Path, split: EncodedSplit) -> Tensor:
    """Targets from a prediction file (JSONL, CSV or TSV as `mtbert predict` writes them),
    matched to the split's examples by id."""
    classify = task.kind == "classification"
    names = task.label_names or [str(i) for i in range(task.num_classes or 0)]
    columns = [f"p_{name}" for name in names] if classify else ["score"]
    found: dict[str, list[float] | float] = {}
    for number, record in _prediction_records(path):
        try:
            if isinstance(record, str):  # a JSON line: its probabilities as CSV's columns
                record = json.loads(record)
                record = {**record, **{f"p_{name}": p for name, p
                                       in (record.get("probabilities") or {}).items()}}
            values = [float(record[column]) for column in columns]
            found[str(record["id"])] = values if classify else values[0]
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            wanted = "'probabilities'" if classify and path.suffix == ".jsonl" else columns
            raise ConfigError(f"{path}:{number}: expected 'id' and {wanted} ({error!r})"
                              ) from None
    missing = [i for i in split.example_ids if i not in found]
    if missing:
        raise ConfigError(f"distill.teachers.{task.name}: {path} has no prediction for "
                          f"{len(missing)} training examples (first: id {missing[0]!r})")
    return torch.tensor([found[i] for i in split.example_ids], dtype=torch.float32)


def _prediction_records(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, record) of a prediction file: a JSON line's text (.jsonl), or a CSV or
    TSV row as a dict by column."""
    with open(path, encoding="utf-8", newline="") as stream:
        if path.suffix == ".jsonl":
            yield from ((n, line) for n, line in enumerate(stream, 1) if line.strip())
        else:
            rows = csv.DictReader(stream, delimiter="\t" if path.suffix == ".tsv" else ",")
            yield from enumerate(rows, 2)


def build_distillation(config: DistillConfig, tasks: dict[str, TaskConfig],
                       splits: dict[str, EncodedSplit], tokenizer: Tokenizer,
                       batch_size: int) -> TeacherAnnealing:
    """The teachers of `config` run over their tasks' training splits, which `tokenizer`
    (the student's) encoded."""
    targets = {name: teacher_targets(tasks[name], source, splits[name], tokenizer, batch_size)
               for name, source in config.teachers.items() if name in splits}
    return TeacherAnnealing(tasks, targets, config.temperature, config.anneal)


def teachers_from_runs(runs: list[str | Path], task_names: list[str]) -> dict[str, str]:
    """{task: run} for each of `task_names` that one of `runs` has (`mtbert distill`)."""
    from mtbert.config import load_config
    from mtbert.model_folder import model_folder

    teachers: dict[str, str] = {}
    for run in runs:
        for task in load_config(model_folder(run) / "experiment.yaml").tasks:
            if task.name not in task_names:
                continue
            if task.name in teachers:
                raise ConfigError(f"--teachers: {teachers[task.name]} and {run} both have task "
                                  f"{task.name!r}; give one teacher per task")
            teachers[task.name] = str(run)
    if not teachers:
        raise ConfigError(f"--teachers: none of the runs has a task of the config "
                          f"({task_names})")
    untaught = [name for name in task_names if name not in teachers]
    if untaught:
        log.info("tasks without a teacher learn from their gold labels only: %s", untaught)
    return teachers
