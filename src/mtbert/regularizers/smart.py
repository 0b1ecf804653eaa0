"""SMART (Jiang et al. 2020, "SMART: Robust and Efficient Fine-Tuning for Pre-trained Natural
Language Models through Principled Regularized Optimization"), as two regularisers.

- `smart`: smoothness-inducing adversarial regularisation (eq. 2, Algorithm 1). The input
  embeddings get noise from N(0, noise^2), then `steps` projected ascent steps of size
  `step_size` along the gradient (divided by its infinity norm) of the divergence between
  clean and perturbed outputs, kept in the infinity ball of radius `epsilon`; the term is the
  divergence at the final perturbation, trained through both outputs.
- `smart_proximal`: the momentum Bregman proximal point term (section 3.2): the divergence
  between the model's outputs and those of a "mentor", an exponential moving average of the
  weights with `decay` (beta), so no update strays far from the recent weights' outputs.

The divergence is symmetric KL between the class distributions (classification) or the
squared error (regression). Paper defaults: epsilon = noise = 1e-5, step_size = 1e-3, one
step, beta = 0.99; weights lambda_s in {1, 3, 5} and mu = 1.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn
from torch.func import functional_call

from mtbert.losses import loss_class
from mtbert.model.bert import EncoderHooks
from mtbert.regularizers.base import Regularizer
from mtbert.weight_averaging import ExponentialAverage

if TYPE_CHECKING:
    from mtbert.config import TaskConfig
    from mtbert.data.batching import Batch
    from mtbert.model.heads import HeadOutput


def divergence(task: TaskConfig, a: Tensor, b: Tensor) -> Tensor:
    """The paper's l_s between two outputs of a head, mean over examples: symmetric KL,
    KL(p||q) + KL(q||p) = sum_c (p_c - q_c)(log p_c - log q_c), between the class
    probabilities the task's loss reads from them; for regression (a - b)^2."""
    a, b = a.float(), b.float()
    if task.kind == "regression":
        return (a - b).square().mean()
    outputs = loss_class(task)
    p, q = outputs.probabilities(task, a), outputs.probabilities(task, b)
    tiny = torch.finfo(p.dtype).tiny
    return ((p - q) * (p.clamp_min(tiny).log() - q.clamp_min(tiny).log())).sum(-1).mean()


class InputPerturbation(EncoderHooks):
    """Adds `delta` to the (N, H) input embeddings; the first pass draws it from
    N(0, noise^2), since at zero the divergence's gradient is zero too."""

    def __init__(self, noise: float):
        super().__init__()
        self.noise = noise
        self.delta: Tensor | None = None

    def input_embeddings(self, embeddings: Tensor) -> Tensor:
        if self.delta is None:
            self.delta = (torch.randn_like(embeddings) * self.noise).requires_grad_()
        return embeddings + self.delta

    def ascend(self, gradient: Tensor, step_size: float, epsilon: float) -> None:
        """One projected ascent step. The infinity norm is taken per token, as in MT-DNN's
        implementation: tokens are packed, and each is one input vector of the encoder."""
        scale = gradient.abs().amax(-1, keepdim=True).clamp_min(torch.finfo(gradient.dtype).tiny)
        moved = self.delta.detach() + step_size * gradient / scale
        self.delta = moved.clamp(-epsilon, epsilon).requires_grad_()


class SmoothnessRegularizer(Regularizer):
    """SMART's R_s: the divergence between outputs on clean and adversarially perturbed input
    embeddings."""

    def __init__(self, model: nn.Module, epsilon: float = 1e-5, noise: float = 1e-5,
                 step_size: float = 1e-3, steps: int = 1):
        self.epsilon, self.noise, self.step_size, self.steps = epsilon, noise, step_size, steps

    @staticmethod
    def check(epsilon: float, noise: float, step_size: float, steps: int) -> None:
        if not epsilon > 0:
            raise ValueError(f"epsilon: the perturbation's radius must be > 0, got {epsilon}")
        if not noise > 0:
            raise ValueError(f"noise: must be > 0 (the ascent starts from it; at zero the "
                             f"gradient is zero), got {noise}")
        if not (isinstance(steps, int) and steps >= 0):
            raise ValueError(f"steps: must be an integer >= 0, got {steps}")
        if steps and not step_size > 0:
            raise ValueError(f"step_size: must be > 0, got {step_size}")

    def __call__(self, model: nn.Module, task: TaskConfig, batch: Batch,
                 output: HeadOutput) -> Tensor:
        perturbation = InputPerturbation(self.noise)
        clean = output.predictions
        for _ in range(self.steps):
            perturbed = model(task.name, batch, perturbation).predictions
            gradient, = torch.autograd.grad(divergence(task, perturbed, clean.detach()),
                                            perturbation.delta)
            perturbation.ascend(gradient, self.step_size, self.epsilon)
        if perturbation.delta is not None:
            perturbation.delta = perturbation.delta.detach()
        return divergence(task, model(task.name, batch, perturbation).predictions, clean)


class BregmanProximal(Regularizer):
    """SMART's momentum Bregman proximal point term: the divergence between the model's
    outputs and those of its mentor (the weights' EMA, debiased: `weight_averaging.py`). The
    mentor runs without dropout and without gradient."""

    def __init__(self, model: nn.Module, decay: float = 0.99):
        self.mentor = ExponentialAverage(model, decay)

    @staticmethod
    def check(decay: float) -> None:
        ExponentialAverage.check(decay)

    def __call__(self, model: nn.Module, task: TaskConfig, batch: Batch,
                 output: HeadOutput) -> Tensor:
        training = model.training
        with torch.no_grad():
            model.eval()
            try:
                mentor = functional_call(model, self.mentor.averaged, (task.name, batch))
            finally:
                model.train(training)
        return divergence(task, output.predictions, mentor.predictions)

    def after_optimizer_step(self, model: nn.Module) -> None:
        self.mentor.update(model)

    def state_dict(self) -> dict[str, Tensor]:
        return self.mentor.state_dict()

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.mentor.load_state_dict(state)
