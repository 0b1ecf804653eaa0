"""The techniques a config names, checked against their registries: each name registered,
and each technique able to act in this run by what it declares (`draws_every_task`,
`needs_encoder_gradients`, a head's `siamese`, a loss's `task_kind`, ...).

Apart from `config.py` so that reading and validating a config imports neither torch nor any
technique; the trainer (and `mtbert ablate`, before its first run) calls `check_techniques`
before it reads data or builds the model.
"""

from __future__ import annotations

import inspect
import typing
from typing import Any

from mtbert.balancing import COMBINERS, WEIGHTINGS
from mtbert.config import ExperimentConfig, TaskConfig, convert_value, short_repr
from mtbert.data.sampling import SAMPLERS
from mtbert.errors import ConfigError
from mtbert.losses import LOSSES, POSITIVE_RULES
from mtbert.metrics import METRICS
from mtbert.model.conditioning import CONDITIONINGS
from mtbert.model.heads import HEADS
from mtbert.model.moe import ROUTINGS
from mtbert.regularizers import REGULARIZERS
from mtbert.weight_averaging import AVERAGES


def _registered(key: str, name: str, registry: dict) -> Any:
    if name not in registry:
        raise ConfigError(f"{key}: unknown {name!r}; registered: {', '.join(sorted(registry))}")
    return registry[name]


def _check_metrics(where: str, task: TaskConfig) -> None:
    if not task.metrics or len(set(task.metrics)) != len(task.metrics):
        raise ConfigError(f"{where}.metric: one metric, or a list of different ones; got "
                          f"{short_repr(task.metric)}")
    metrics = [_registered(f"{where}.metric", name, METRICS) for name in task.metrics]
    for name, metric in zip(task.metrics, metrics):
        if metric.task_kind != task.kind or (metric.binary and task.num_classes != 2):
            binary = "binary " if metric.binary else ""
            raise ConfigError(f"{where}.metric: {name!r} scores {binary}{metric.task_kind} "
                              f"tasks, not this {task.kind} task")
    if len({metric.low for metric in metrics}) > 1:
        raise ConfigError(f"{where}.metric: the task's score is the mean of its metrics, so "
                          f"they must share a range; {task.metrics} do not (correlations "
                          "span [-1, 1])")


def _check_options(key: str, technique: Any, options: dict[str, Any]) -> None:
    """`options` must be keyword arguments of the technique's constructor (after the model),
    of the types its `check` declares (converted in place: YAML reads 1e-5 as a string), and
    with the constructor's defaults pass `check` (which says what cannot act)."""
    parameters = list(inspect.signature(technique).parameters.values())[1:]
    known = {p.name: p.default for p in parameters}
    hints = typing.get_type_hints(technique.check)
    for name, value in options.items():
        if name not in known:
            raise ConfigError(f"{key}.{name}: {technique.__name__} has no such option; its "
                              f"options: {sorted(known)}")
        if name in hints:
            options[name] = convert_value(hints[name], value, f"{key}.{name}")
    try:
        technique.check(**{**known, **options})
    except ValueError as error:
        raise ConfigError(f"{key}.{error}") from None


def check_techniques(config: ExperimentConfig) -> None:
    """Names must be registered, and a technique must be able to act in this run: the
    requirements are what each one declares in its own file (no method is named here)."""
    train = config.train
    for i, regularizer in enumerate(train.regularizers):
        key = f"train.regularizers[{i}]"
        _check_options(f"{key}.options", _registered(f"{key}.name", regularizer.name,
                                                     REGULARIZERS), regularizer.options)
    average = train.weight_average
    if average is not None:
        _check_options("train.weight_average", _registered(
            "train.weight_average.method", average.method, AVERAGES),
            {} if average.decay is None else {"decay": average.decay})
    sampler = _registered("train.sampler", train.sampler, SAMPLERS)
    weighting = _registered("train.weighting", train.weighting, WEIGHTINGS)
    combiner = _registered("train.combiner", train.combiner, COMBINERS)
    several = sampler.draws_every_task and len(config.tasks) > 1
    if combiner.needs_several_tasks and not several:
        raise ConfigError(f"train.combiner: {train.combiner!r} acts only when a step holds "
                          "several tasks; use train.sampler: round_robin with two or more tasks")
    if weighting.needs_several_tasks and len(config.tasks) < 2:
        raise ConfigError(f"train.weighting: {train.weighting!r} weighs tasks against each "
                          "other, and with one task its weight stays 1 (the plain sum); use "
                          "train.weighting: sum")
    if weighting.needs_every_task and not sampler.draws_every_task:
        raise ConfigError(f"train.weighting: {train.weighting!r} needs every task's loss at "
                          f"every step; train.sampler {train.sampler!r} draws one task per "
                          "step (use round_robin)")
    if train.affinity_every is not None and (not several or config.adapt.freeze_encoder):
        raise ConfigError("train.affinity_every: the look-ahead affinity steps the shared "
                          "encoder on each task's batch of a step; it needs two or more tasks, "
                          "train.sampler: round_robin, and an encoder that trains (train --from "
                          "and adapt.freeze_encoder freeze it)")
    for key, name, technique in (("train.weighting", train.weighting, weighting),
                                 ("train.combiner", train.combiner, combiner)):
        if config.adapt.freeze_encoder and technique.needs_encoder_gradients:
            raise ConfigError(f"{key}: {name!r} acts on the encoder's gradients; with "
                              "adapt.freeze_encoder (or train --from) the encoder has none")
    for key, name, technique in (("train.weighting", train.weighting, weighting),
                                 ("train.sampler", train.sampler, sampler)):
        if train.epochs <= technique.acts_from_epoch - 1:
            raise ConfigError(f"{key}: {name!r} acts from epoch {technique.acts_from_epoch}; "
                              f"train.epochs is {train.epochs:g}, make it more than "
                              f"{technique.acts_from_epoch - 1}")
    if config.model.conditioning is not None:
        _registered("model.conditioning", config.model.conditioning, CONDITIONINGS)
    moe = config.model.moe
    if moe is not None and not ROUTINGS[moe.routing].token_gate:
        # Batches are single-task: every token of a batch takes the task's experts.
        if moe.capacity_factor is not None:
            raise ConfigError(f"model.moe.capacity_factor: {moe.routing!r} routing sends all "
                              "of a batch to its task's experts, so a capacity would drop most "
                              "of it; set it to null")
        if moe.noisy_gating:
            raise ConfigError(f"model.moe.noisy_gating: {moe.routing!r} routing has no token "
                              "gate for the noise to act on; set it to false")
        if moe.balance_weight:
            raise ConfigError(f"model.moe.balance_weight: under {moe.routing!r} routing a "
                              "batch loads only its task's experts, and balancing it would "
                              "only push the task off them; set it to 0")
    # Parameters of a task inside the encoder: conditioning, or task routing's logits.
    task_aware_encoder = config.model.conditioning is not None or (
        moe is not None and ROUTINGS[moe.routing].task_router is not None)
    for i, task in enumerate(config.tasks):
        where = f"tasks[{i}] ({task.name})"
        _check_metrics(where, task)
        head = _registered(f"{where}.head.type", task.head.type, HEADS)
        if head.siamese and not task.is_pair:
            raise ConfigError(f"{where}.head.type: {task.head.type!r} encodes the two sentences "
                              "of a pair apart; this task has one text column")
        if task.kind == "classification" and task.num_classes > head.max_classes:
            raise ConfigError(f"{where}.head.type: {task.head.type!r} classifies at most "
                              f"{head.max_classes} classes")
        if task.mnrl is not None and not head.siamese:
            raise ConfigError(f"{where}.mnrl: needs a siamese head (one that encodes the two "
                              "sentences apart)")
        if task.mnrl is not None and config.adapt.freeze_encoder and not task_aware_encoder:
            raise ConfigError(f"{where}.mnrl: trains the sentence embeddings, and with "
                              "adapt.freeze_encoder (or train --from) no parameter of theirs "
                              "trains; add model.conditioning (e.g. lora) or drop mnrl")
        if task.weight != 1.0 and not weighting.uses_task_weights:
            raise ConfigError(f"{where}.weight: train.weighting {train.weighting!r} does not "
                              "read task weights (use static)")
        if task.loss is not None:
            loss = _registered(f"{where}.loss", task.loss, LOSSES)
            if loss.task_kind != task.kind or (getattr(loss, "binary", False)
                                               and task.num_classes != 2):
                raise ConfigError(f"{where}.loss: {task.loss!r} trains "
                                  f"{'binary ' if getattr(loss, 'binary', False) else ''}"
                                  f"{loss.task_kind} tasks, not this {task.kind} task")
        if task.mnrl is not None:
            _registered(f"{where}.mnrl.rule", task.mnrl.rule, POSITIVE_RULES)
