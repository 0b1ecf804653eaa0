"""Training part of a model: a frozen encoder (adapters and heads train), or a new task added
to a trained model (`mtbert train --from RUN`) whose old tasks keep their outputs bit for bit.

Adding a task loads the trained model's weights into the new one and freezes every one of
them: the encoder, the old tasks' heads and conditioning, and conditioning shared by the tasks
(MTL-LoRA's shared projections). What the new model has beyond them, the new tasks' heads and
adapters, is all that trains; old tasks compute with frozen weights only, so their outputs
do not change (`tests/test_adapting.py`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from mtbert.config import AdaptConfig, ConfigError, ExperimentConfig, load_config, validate
from mtbert.model.multitask import MultitaskModel


def config_from_run(run: str | Path, new: ExperimentConfig) -> ExperimentConfig:
    """The experiment of `train --from RUN`: RUN's model (backbone, conditioning) and tasks,
    then `new`'s tasks; `new`'s training settings; encoder frozen."""
    from mtbert.model_folder import model_folder

    base = load_config(model_folder(run) / "experiment.yaml")
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


def adapt_model(model: MultitaskModel, adapt: AdaptConfig) -> set[str]:
    """Freeze what `adapt` says; returns the tasks that do not train (those of `from_run`)."""
    if adapt.freeze_encoder:
        model.encoder.requires_grad_(False)
    return set() if adapt.from_run is None else start_from(model, adapt.from_run)


def start_from(model: MultitaskModel, run: str | Path) -> set[str]:
    """Copy RUN's trained weights into `model` and freeze them; returns RUN's task names."""
    from mtbert.model_folder import load_model

    trained, _, _ = load_model(run)
    state, own = trained.state_dict(), model.state_dict()
    misfits = [k for k, v in state.items() if k not in own or own[k].shape != v.shape]
    if misfits:
        raise ConfigError(f"adapt.from_run: {run} does not fit this model ({misfits[0]}); "
                          "the model settings must be the run's")
    model.load_state_dict(state, strict=False)
    for name, parameter in model.named_parameters():
        if name in state:
            parameter.requires_grad_(False)
    return set(trained.tasks)
