"""No silent no-ops (issue 19): a technique that cannot act in a config is an error before
training reads data (`check_techniques`), and every technique config either trains differently
from the baseline or is rejected. Plus the silent bugs found by reading, each with its test."""

import logging
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from mtbert.config import ConfigError, config_differences, load_config, to_dict
from mtbert.evaluation import metric
from mtbert.techniques import check_techniques
from mtbert.training import Trainer

from conftest import tiny_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TECHNIQUES = sorted((CONFIGS / "techniques").glob("*.yaml"))

REJECTED = {  # override -> what the error must say
    "train.combiner=pcgrad train.sampler=proportional":
        "train.combiner: 'pcgrad' acts only when a step holds several tasks",
    "train.weighting=gradnorm train.sampler=temperature":
        "train.weighting: 'gradnorm' needs every task's loss at every step",
    "train.weighting=dwa train.epochs=2": "train.weighting: 'dwa' acts from epoch 3",
    "train.sampler=annealed train.epochs=1": "train.sampler: 'annealed' acts from epoch 2",
    "tasks.sts.mnrl.rule=all": "mnrl.rule: unknown 'all'; registered: cosine, label",
    "tasks.quora.loss=mnrl": "tasks[1] (quora).loss: unknown 'mnrl'; registered: bce",
    "tasks.sst.weight=2": "tasks[0] (sst).weight: train.weighting 'sum' does not read",
    "tasks.sts.loss=bce": "tasks[2] (sts).loss: 'bce' trains binary classification tasks",
    "tasks.sst.loss=bce": "tasks[0] (sst).loss: 'bce' trains binary classification tasks",
    "train.combiner=cagrad": "train.combiner: unknown 'cagrad'; registered: pcgrad, sum",
}


@pytest.mark.parametrize("overrides", REJECTED)
def test_settings_that_cannot_act_are_rejected_when_read(overrides):
    with pytest.raises(ConfigError, match=re.escape(REJECTED[overrides])):
        check_techniques(load_config(CONFIGS / "base.yaml", overrides.split()))


@pytest.mark.parametrize("setting,says", [
    ("train.combiner=pcgrad", "acts only when a step holds several tasks"),
    ("train.weighting=gradnorm", "weighs tasks against each other, and with one task"),
    ("train.weighting=dwa", "weighs tasks against each other, and with one task")])
def test_methods_of_several_tasks_are_rejected_with_one_task(setting, says):
    """GradNorm and DWA renormalise their weights to sum to the number of tasks: with one
    task the weight is 1 at every step, the plain sum (a single-task run or a fine-tune)."""
    with pytest.raises(ConfigError, match=says):
        check_techniques(load_config(CONFIGS / "base.yaml",
                                     ["tasks=[sst]", setting, "train.epochs=3"]))
    check_techniques(load_config(CONFIGS / "base.yaml",
                                 ["tasks=[sst]", "train.weighting=uncertainty"]))


def test_a_run_that_a_step_cap_stops_early_still_reaches_dwa(tiny_backbone, tiny_data, tmp_path):
    """The medium budget stopped before DWA's first weights (epoch 3 of data): the row equalled
    the baseline. A capped run now has `epochs` shorter schedule epochs, so DWA acts in it."""
    config = tiny_config(tiny_backbone, tiny_data, "train.weighting=dwa", epochs=3,
                         max_steps=6)
    trainer = Trainer(config, tmp_path / "run")
    assert trainer.sampler.steps_per_epoch() > 2  # epochs of data: the cap ends in epoch 2
    assert trainer.sampler.schedule_epoch_steps == 2.0  # 6 steps / 3 epochs
    trainer.fit()
    assert trainer.epoch == 3
    weights = list(trainer.weighting.weights().values())
    assert weights != [1.0, 1.0, 1.0]  # set from epochs 1 and 2's mean losses
    assert sum(weights) == pytest.approx(3.0)


@pytest.mark.filterwarnings(r"ignore:Seems like `optimizer.step\(\)` has been overridden")
def test_uncertainty_regulariser_is_not_multiplied_by_gradient_accumulation(
        tiny_backbone, tiny_data, monkeypatch):
    """With k micro-steps the loss was divided by k but `+ s/2` was added k times, so d/ds was
    k/2 - c * mean(L) instead of 1/2 - c * mean(L)."""
    config = tiny_config(tiny_backbone, tiny_data, "train.weighting=uncertainty",
                         tasks="[sst]", grad_accumulation=4, max_steps=1)
    trainer = Trainer(config, "/nonexistent-not-written")
    seen, grads = [], []
    forward = type(trainer.losses["sst"]).forward

    def recording(self, output, labels, epoch):
        loss, auxiliary, parts = forward(self, output, labels, epoch)
        seen.append(loss.item())
        return loss, auxiliary, parts

    monkeypatch.setattr(type(trainer.losses["sst"]), "forward", recording)
    step = trainer.optimizer.step
    monkeypatch.setattr(trainer.optimizer, "step",
                        lambda: (grads.append(trainer.weighting.log_vars.grad.clone()), step()))
    trainer.train_step()
    assert len(seen) == 4
    expected = 0.5 - 1.0 * np.mean(seen)  # classification: c = 1, s = 0 at the start
    assert grads[0].item() == pytest.approx(expected, rel=1e-5)


def test_constant_predictions_are_said_not_silently_scored(caplog):
    task = load_config(CONFIGS / "base.yaml").task("sts")
    with caplog.at_level(logging.WARNING):
        assert metric(task, np.full(5, 2.5), np.arange(5.0)) == 0.0
    assert "sts: every prediction is 2.5, so pearson correlation is undefined" in caplog.text


# ---------------------------------------------------------------- every technique acts


@pytest.fixture(scope="module")
def uneven_data(tiny_data, tmp_path_factory):
    """The tiny tasks cut to different sizes, so that samplers differ (equal sizes made the
    proportional, temperature and annealed rows identical)."""
    folder = tmp_path_factory.mktemp("uneven")
    for path in tiny_data.iterdir():
        shutil.copy(path, folder / path.name)
    for name, rows in (("ids-sst-train.csv", 64), ("quora-train.csv", 40),
                       ("sts-train.csv", 16)):
        lines = (folder / name).read_text().splitlines(keepends=True)
        (folder / name).write_text("".join(lines[:rows + 1]))
    return folder


def loss_trajectory(config, run_dir):
    """Per-step task losses of a whole run."""
    trainer = Trainer(config, run_dir)
    trajectory = []
    step = trainer.train_step

    def recording():
        logged = step()
        trajectory.append({k: round(v, 6) for k, v in logged.items() if k.endswith("loss")})
        return logged

    trainer.train_step = recording
    trainer.fit()
    return trajectory


def tiny(path, backbone, data):
    return load_config(path, [f"model.backbone={backbone}", "model.max_length=32",
                              "train.batch_size=8", "train.eval_batch_size=64",
                              "train.max_eval_examples=16"], data_dir=str(data))


@pytest.mark.parametrize("path", TECHNIQUES, ids=[p.stem for p in TECHNIQUES])
def test_every_technique_config_trains_differently_from_the_baseline(
        path, tiny_backbone, uneven_data, tmp_path):
    """Either validate() rejects the config or its losses leave the baseline's (same epochs,
    so the learning-rate schedule is the same) within the run."""
    try:
        config = tiny(path, tiny_backbone, uneven_data)
    except ConfigError:
        return  # rejected: cannot act as written
    base = tiny(CONFIGS / "base.yaml", tiny_backbone, uneven_data)
    base.train.epochs = config.train.epochs
    ignored = ("name", "train.seed")
    if not config_differences(to_dict(base), to_dict(config), ignored):
        pytest.skip(f"{path.name} is the baseline itself")
    torch.manual_seed(0)
    ours = loss_trajectory(config, tmp_path / "technique")
    theirs = loss_trajectory(base, tmp_path / "base")
    assert ours != theirs, f"{path.name} trains exactly like base.yaml"
