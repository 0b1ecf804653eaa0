"""AdamW and the learning-rate schedule."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


class AdamW(Optimizer):
    """Adam with decoupled weight decay.

    References:
        Loshchilov & Hutter 2019, "Decoupled Weight Decay Regularization": the decay
        shrinks the weights directly (p <- p - lr * wd * p) instead of entering the gradient.
        Kingma & Ba 2015, "Adam", end of section 2: the bias corrections are folded into the
        step size, alpha_t = lr * sqrt(1 - beta2^t) / (1 - beta1^t), with
        eps_hat = eps * sqrt(1 - beta2^t) so that the update equals the textbook form.

    The moment updates are vectorised over all parameters with `torch._foreach_*` kernels. The
    denominator sqrt(v) + eps is written parameter by parameter into one reused scratch buffer:
    a fresh parameter-sized tensor per step (what `_foreach_sqrt` returns) costs page faults on
    every step for large tensors such as the word embeddings, which made the step ~2x slower on
    CPU. Parameters without a gradient in a step (a task head whose task was not drawn) are
    left untouched and keep their own step count.
    """

    def __init__(self, params: Iterable, lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0):
        if lr < 0 or eps < 0 or weight_decay < 0:
            raise ValueError(f"lr, eps and weight_decay must be >= 0, got {lr}, {eps}, "
                             f"{weight_decay}")
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self._scratch: dict[tuple[torch.dtype, torch.device], Tensor] = {}

    def _denominator_buffer(self, like: Tensor) -> Tensor:
        """A reused tensor shaped like `like` (grown to the largest parameter seen)."""
        key = (like.dtype, like.device)
        buffer = self._scratch.get(key)
        if buffer is None or buffer.numel() < like.numel():
            buffer = self._scratch[key] = torch.empty(like.numel(), dtype=like.dtype,
                                                      device=like.device)
        return buffer[:like.numel()].view(like.shape)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            # Parameters are stepped together when they share a step count.
            by_step: dict[int, list[Tensor]] = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise ValueError("AdamW does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                by_step.setdefault(state["step"], []).append(p)
            for step, params in by_step.items():
                self._update(group, params, step)
        return loss

    def _update(self, group: dict, params: list[Tensor], step: int) -> None:
        lr, (beta1, beta2), eps, decay = (group["lr"], group["betas"], group["eps"],
                                          group["weight_decay"])
        grads = [p.grad for p in params]
        exp_avgs = [self.state[p]["exp_avg"] for p in params]
        exp_avg_sqs = [self.state[p]["exp_avg_sq"] for p in params]
        if decay:
            torch._foreach_mul_(params, 1.0 - lr * decay)
        torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta1)  # m <- b1 m + (1 - b1) g
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1.0 - beta2)  # v <- b2 v + (1-b2) g^2
        bias2 = 1.0 - beta2**step
        step_size = lr * math.sqrt(bias2) / (1.0 - beta1**step)
        eps_hat = eps * math.sqrt(bias2)
        for p, exp_avg, exp_avg_sq in zip(params, exp_avgs, exp_avg_sqs):
            # sqrt(v) as 1 / rsqrt(v) (within 2e-7 relative): torch's CPU sqrt is ~5x slower
            # on zeros, and most rows of the word embeddings' v stay zero (tokens not yet seen).
            denom = torch.rsqrt(exp_avg_sq, out=self._denominator_buffer(exp_avg_sq))
            p.addcdiv_(exp_avg, denom.reciprocal_().add_(eps_hat), value=-step_size)


def warmup_linear_decay(optimizer: Optimizer, warmup_steps: int, total_steps: int) -> LambdaLR:
    """Learning rate rises linearly over `warmup_steps`, then falls linearly to 0 at the end."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return LambdaLR(optimizer, factor)
