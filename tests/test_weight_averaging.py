"""`train.weight_average`: EMA and SWA against their formulas, the average is what best/ holds,
and a resumed run ends with the same average as an uninterrupted one."""

import shutil

import pytest
import torch
from torch import nn

from mtbert.config import ConfigError
from mtbert.model_folder import load_model
from mtbert.training import Trainer
from mtbert.weight_averaging import ExponentialAverage, StochasticAverage

from conftest import tiny_config

SNAPSHOTS = [torch.tensor([[1.0, -2.0]]), torch.tensor([[0.5, 4.0]]),
             torch.tensor([[-3.0, 1.0]]), torch.tensor([[2.0, 2.0]])]


def averaged_over_snapshots(average_class, **options):
    model = nn.Linear(2, 1, bias=False).double()
    average = average_class(model, **options)
    for snapshot in SNAPSHOTS:
        with torch.no_grad():
            model.weight.copy_(snapshot)
        average.update(model)
    return average.averaged["weight"]


def test_ema_after_k_steps_is_its_formula():
    decay, k = 0.9, len(SNAPSHOTS)
    # sum_i decay^(k-i) (1 - decay) theta_i / (1 - decay^k): the starting weights weigh nothing
    expected = sum(decay ** (k - i) * (1 - decay) * theta.double()
                   for i, theta in enumerate(SNAPSHOTS, 1)) / (1 - decay ** k)
    torch.testing.assert_close(averaged_over_snapshots(ExponentialAverage, decay=decay),
                               expected, rtol=1e-14, atol=1e-14)


def test_swa_is_the_mean_of_the_snapshots():
    expected = torch.stack(SNAPSHOTS).double().mean(0)
    torch.testing.assert_close(averaged_over_snapshots(StochasticAverage), expected,
                               rtol=1e-14, atol=1e-14)


AVERAGE = ["train.weight_average={method: ema, decay: 0.5, start: 0.25}",
           "train.regularizers=[{name: smart_proximal}]"]


def test_best_holds_the_average_and_resume_keeps_it(tiny_backbone, tiny_data, tmp_path):
    config = tiny_config(tiny_backbone, tiny_data, *AVERAGE, max_steps=4, checkpoint_every=2,
                         keep_checkpoints=2)
    trainer = Trainer(config, tmp_path / "run")
    trainer.fit()
    average = trainer.averaging.average
    assert average.updates == 3  # after steps 2, 3 and 4: the first quarter is left out
    assert trainer.state.best_step == 4  # one evaluation, at the end
    best, _, _ = load_model(tmp_path / "run" / "best")
    saved, raw = best.state_dict(), trainer.model.state_dict()
    assert all(torch.equal(saved[name], value) for name, value in average.averaged.items())
    assert any(not torch.equal(raw[name], value) for name, value in average.averaged.items())

    shutil.copytree(tmp_path / "run", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "step-00000004")
    resumed = Trainer(config, tmp_path / "resumed")
    assert resumed.resume().name == "step-00000002"
    resumed.fit()
    for name, value in average.averaged.items():
        assert torch.equal(resumed.averaging.average.averaged[name], value), name
    assert resumed.averaging.average.updates == 3
    mentor = trainer.regularizers.state_dict()
    assert all(torch.equal(resumed.regularizers.state_dict()[k], v) for k, v in mentor.items())


@pytest.mark.parametrize("override, key", [
    ("train.weight_average={method: swa, start: 1.0}", "train.weight_average.start"),
    ("train.weight_average={method: swa, decay: 0.99}", "train.weight_average.decay"),
    ("train.weight_average={method: ema, decay: 1.0}", "train.weight_average.decay"),
    ("train.weight_average={method: polyak}", "train.weight_average.method"),
])
def test_an_average_that_cannot_act_is_refused(tiny_backbone, tiny_data, override, key):
    with pytest.raises(ConfigError, match=key):
        tiny_config(tiny_backbone, tiny_data, override)
