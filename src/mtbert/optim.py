"""AdamW and the learning-rate schedule."""

from __future__ import annotations

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
        Kingma & Ba 2015, "Adam", Algorithm 1: moments m, v with bias corrections; the step
        is lr * m_hat / (sqrt(v_hat) + eps).

    Each step is one call of PyTorch's fused AdamW kernel per group of parameters that share a
    step count (`torch._fused_adamw_`, on CPU since PyTorch 2.4): it reads and writes each
    parameter, gradient and moment once, where separate `torch._foreach_*` passes (decay,
    two moment updates, sqrt, reciprocal, add, addcdiv) went over the ~23M parameters of
    MiniLM eight times (`benchmarks/bench_adamw.py` times it against those passes). The
    kernel computes the same formula; results agree to fp32 rounding. Parameters without a
    gradient in a step (a task head whose task was not drawn) are left untouched and keep
    their own step count.
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
        beta1, beta2 = group["betas"]
        steps = torch.tensor(float(step), device=params[0].device)  # read, not incremented
        torch._fused_adamw_(
            params, [p.grad for p in params], [self.state[p]["exp_avg"] for p in params],
            [self.state[p]["exp_avg_sq"] for p in params], [], [steps] * len(params),
            lr=group["lr"], beta1=beta1, beta2=beta2, weight_decay=group["weight_decay"],
            eps=group["eps"], amsgrad=False, maximize=False)


def warmup_linear_decay(optimizer: Optimizer, warmup_steps: int, total_steps: int) -> LambdaLR:
    """Learning rate rises linearly over `warmup_steps`, then falls linearly to 0 at the end."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return LambdaLR(optimizer, factor)
