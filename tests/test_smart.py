"""SMART (`regularizers/smart.py`): the adversarial smoothness term and the Bregman proximal
term on linear models whose values can be computed by hand, and both in a training run."""

import math

import pytest
import torch
from torch import nn

from mtbert.config import ConfigError, TaskConfig
from mtbert.model.heads import HeadOutput
from mtbert.regularizers import BregmanProximal, SmoothnessRegularizer
from mtbert.training import Trainer

from conftest import tiny_config

CLASSES = TaskConfig(name="t", kind="classification", num_classes=2)
SCORES = TaskConfig(name="t", kind="regression", label_range=[-10.0, 10.0])


class Linear(nn.Module):
    """f(x) = W x, with x (B, H) standing for the input embeddings the hooks see."""

    def __init__(self, weight):
        super().__init__()
        self.linear = nn.Linear(len(weight[0]), len(weight), bias=False).double()
        with torch.no_grad():
            self.linear.weight.copy_(torch.tensor(weight, dtype=torch.float64))

    def forward(self, task, x, hooks=None):
        x = x if hooks is None else hooks.input_embeddings(x)
        return HeadOutput(self.linear(x).squeeze(-1))


def sigmoid(z):
    return 1 / (1 + math.exp(-z))


def test_smart_term_on_a_linear_classifier_by_hand():
    # Logits (w.x, 0) at x = 0: class probabilities (1/2, 1/2). One long ascent step moves
    # every coordinate of the perturbation to the edge of the epsilon box, on the side that
    # raises |w.delta|, so w.delta = +-epsilon * |w|_1 = +-s whatever the noise drew, and the
    # symmetric KL between (1/2, 1/2) and (sigmoid(s), 1 - sigmoid(s)) is (sigmoid(s) - 1/2) s.
    model = Linear([[2.0, -1.0], [0.0, 0.0]])
    x = torch.zeros(3, 2, dtype=torch.float64)
    smart = SmoothnessRegularizer(model, epsilon=0.5, noise=1e-3, step_size=10.0, steps=1)
    term = smart(model, CLASSES, x, model("t", x))
    s = 0.5 * 3.0
    assert term.item() == pytest.approx((sigmoid(s) - 0.5) * s, rel=1e-6)
    term.backward()
    assert model.linear.weight.grad.abs().sum() > 0  # the term trains the model


def test_smart_term_without_ascent_is_the_divergence_at_the_noise():
    model = Linear([[2.0, -1.0], [0.0, 0.0]])
    x = torch.zeros(3, 2, dtype=torch.float64)
    smart = SmoothnessRegularizer(model, epsilon=0.5, noise=0.3, step_size=10.0, steps=0)
    torch.manual_seed(4)
    term = smart(model, CLASSES, x, model("t", x))
    torch.manual_seed(4)
    z = (torch.randn(3, 2, dtype=torch.float64) * 0.3) @ torch.tensor([2.0, -1.0],
                                                                      dtype=torch.float64)
    expected = sum((sigmoid(v) - 0.5) * v for v in z.tolist()) / 3
    assert term.item() == pytest.approx(expected, rel=1e-6)


def test_smart_term_for_regression_is_the_squared_error():
    model = Linear([[2.0, -1.0]])  # a score w.x; at x = 0 the perturbed score is +-1.5
    x = torch.zeros(4, 2, dtype=torch.float64)
    smart = SmoothnessRegularizer(model, epsilon=0.5, noise=1e-3, step_size=10.0, steps=1)
    assert smart(model, SCORES, x, model("t", x)).item() == pytest.approx(1.5 ** 2, rel=1e-6)


def test_proximal_term_follows_the_debiased_average_of_the_weights():
    model = Linear([[0.0, 0.0], [0.0, 0.0]])
    x = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    proximal = BregmanProximal(model, decay=0.5)  # the mentor starts as the model

    def set_first_weight(value):
        with torch.no_grad():
            model.linear.weight[0, 0] = value

    set_first_weight(1.2)  # logits (1.2, 0) against the mentor's (0, 0)
    assert proximal(model, CLASSES, x, model("t", x)).item() == pytest.approx(
        (sigmoid(1.2) - 0.5) * 1.2, rel=1e-6)
    proximal.after_optimizer_step(model)  # 1st update: the mentor is the weights
    assert proximal(model, CLASSES, x, model("t", x)).item() == pytest.approx(0, abs=1e-7)
    set_first_weight(3.0)
    proximal.after_optimizer_step(model)  # mentor: (0.5 * 1.2 + 3.0) / 1.5 = 2.4
    set_first_weight(0.0)
    assert proximal(model, CLASSES, x, model("t", x)).item() == pytest.approx(
        (sigmoid(2.4) - 0.5) * 2.4, rel=1e-6)


SMART = ("train.regularizers=[{name: smart, weight: 1.0, options: {epsilon: 1e-3, noise: 1e-3}},"
         " {name: smart_proximal, weight: 1.0}]")


def test_smart_terms_are_logged_and_train_apart_from_the_task_losses(tiny_backbone, tiny_data,
                                                                     tmp_path):
    trainer = Trainer(tiny_config(tiny_backbone, tiny_data, SMART, max_steps=2), tmp_path)
    first, second = trainer.train_step(), trainer.train_step()
    for task in ("sst", "quora", "sts"):
        assert first[f"{task}/smart"] > 0 and math.isfinite(first[f"{task}/smart"])
        assert first[f"{task}/smart_proximal"] > 0  # the mentor runs without dropout
        assert second[f"{task}/smart_proximal"] > 0  # one step apart from the model
    plain = Trainer(tiny_config(tiny_backbone, tiny_data, max_steps=2), tmp_path / "plain")
    unregularized = plain.train_step()
    # The same task losses (computed before the terms draw their noise); the loss trained
    # is theirs plus the terms, with other gradients.
    for key, value in unregularized.items():
        if key.endswith("/loss"):
            assert first[key] == value, key
    terms = sum(v for k, v in first.items() if k.endswith(("/smart", "/smart_proximal")))
    assert first["backward_loss"] == pytest.approx(unregularized["backward_loss"] + terms,
                                                   rel=1e-6)
    assert unregularized["grad_norm"] != first["grad_norm"]


@pytest.mark.parametrize("override, key", [
    ("train.regularizers=[{name: smart, weight: 0}]", "train.regularizers[0].weight"),
    ("train.regularizers=[{name: smart, options: {epsilon: 0}}]",
     "train.regularizers[0].options.epsilon"),
    ("train.regularizers=[{name: smart, options: {noise: 0}}]",
     "train.regularizers[0].options.noise"),
    ("train.regularizers=[{name: smart, options: {radius: 1}}]",
     "train.regularizers[0].options.radius"),
    ("train.regularizers=[{name: smart_proximal, options: {decay: 1.0}}]",
     "train.regularizers[0].options.decay"),
    ("train.regularizers=[{name: smrt}]", "train.regularizers[0].name"),
])
def test_a_regularizer_that_cannot_act_is_refused(tiny_backbone, tiny_data, override, key):
    with pytest.raises(ConfigError, match=key.replace("[", r"\[").replace("]", r"\]")):
        tiny_config(tiny_backbone, tiny_data, override)
