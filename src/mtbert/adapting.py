"""Training part of a model: a frozen encoder (adapters and heads train), a new task added
to a trained model (`mtbert train --from RUN`) whose old tasks keep their outputs bit for bit,
or one task of a trained model fine-tuned alone (`--finetune TASK`).

Adding a task loads the trained model's weights into the new one and freezes every one of
them: the encoder, the old tasks' heads and conditioning, and conditioning shared by the tasks
(MTL-LoRA's shared projections). What the new model has beyond them, the new tasks' heads and
adapters, is all that trains; old tasks compute with frozen weights only, so their outputs
do not change (`tests/test_adapting.py`).

Fine-tuning one task is the second stage of MT-DNN (Liu et al. 2019): multitask training, then
a short fine-tune per task. The new model has that task alone; RUN's encoder (and shared
conditioning) and that task's head and conditioning are loaded, the other tasks' weights are
left out, and everything trains.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from mtbert.config import AdaptConfig, ConfigError, ExperimentConfig, load_config, validate
from mtbert.model.multitask import MultitaskModel
from mtbert.techniques import check_techniques


def config_from_run(run: str | Path, new: ExperimentConfig,
                    finetune: str | None = None) -> ExperimentConfig:
    """The experiment of `train --from RUN`: RUN's model (backbone, conditioning) and tasks,
    then `new`'s tasks; `new`'s training settings; encoder frozen. With `finetune`: RUN's
    model and its task `finetune` alone (`new`'s tasks are not read), nothing frozen, the
    name NAME-TASK."""
    from mtbert.model_folder import model_folder

    base = load_config(model_folder(run) / "experiment.yaml")
    if finetune is not None:
        return finetune_config(base, new, run, finetune)
    old = {t.name for t in base.tasks}
    clashes = [t.name for t in new.tasks if t.name in old]
    if clashes:
        raise ConfigError(f"tasks: {clashes} are already in {run}; --from adds new tasks "
                          "(give them other names)")
    config = dataclasses.replace(
        new, model=base.model, tasks=[*base.tasks, *new.tasks],
        adapt=dataclasses.replace(new.adapt, from_run=str(run), freeze_encoder=True))
    validate(config)
    return config


def finetune_config(base: ExperimentConfig, new: ExperimentConfig, run: str | Path,
                    task: str) -> ExperimentConfig:
    """Stage two of MT-DNN: `base`'s model and its `task` alone, trained with `new`'s
    settings from RUN (a run of `base`, which need not be trained yet), named NAME-TASK.
    A setting of `new` that cannot act on one task is refused here, naming the fine-tune."""
    config = dataclasses.replace(
        new, name=f"{new.name}-{task}", model=base.model, tasks=[base.task(task)],
        adapt=dataclasses.replace(new.adapt, from_run=str(run), finetune=task))
    try:
        validate(config)
        check_techniques(config)
    except ConfigError as error:
        raise ConfigError(f"--finetune {task} trains {task} alone: {error}") from None
    return config


def adapt_model(model: MultitaskModel, adapt: AdaptConfig) -> set[str]:
    """Freeze what `adapt` says; returns the tasks that do not train (those of `from_run`,
    unless one of them is fine-tuned)."""
    if adapt.freeze_encoder:
        model.encoder.requires_grad_(False)
    if adapt.from_run is None:
        return set()
    if adapt.finetune is not None:
        load_from(model, adapt.from_run, subset=True)
        return set()
    return start_from(model, adapt.from_run)


def start_from(model: MultitaskModel, run: str | Path) -> set[str]:
    """Copy RUN's trained weights into `model` and freeze them; returns RUN's task names."""
    state, tasks = load_from(model, run, subset=False)
    for name, parameter in model.named_parameters():
        if name in state:
            parameter.requires_grad_(False)
    return tasks


def load_from(model: MultitaskModel, run: str | Path, subset: bool) -> tuple[dict, set[str]]:
    """Copy RUN's weights into `model`: all of them (`model` may have more), or, with
    `subset`, every weight `model` has (RUN may have more: other tasks'). Returns the weights
    copied and RUN's task names."""
    from mtbert.model_folder import load_model

    trained, _, _ = load_model(run)
    state, own = trained.state_dict(), model.state_dict()
    needed, given = (own, state) if subset else (state, own)
    misfits = [k for k, v in needed.items() if k not in given or given[k].shape != v.shape]
    if misfits:
        raise ConfigError(f"adapt.from_run: {run} does not fit this model ({misfits[0]}); "
                          "the model settings must be the run's")
    state = {k: v for k, v in state.items() if k in own}
    model.load_state_dict(state, strict=False)
    return state, set(trained.tasks)
