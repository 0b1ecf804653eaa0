"""Several processes, one model: torchrun + PyTorch DistributedDataParallel (DDP).

`torchrun --nproc-per-node N -m mtbert train ...` starts N processes (ranks); each joins the
process group here (gloo on CPUs, NCCL on GPUs) and trains on its own slice of every global
batch. What keeps the ranks in step:

- the sampler draws the same tasks on every rank (a pure function of seed and step), and
  every task stream cuts the same global batch into one slice per rank (`TaskStream`);
- `StepForward` runs a step's forward passes as ONE call of a DDP module, so DDP averages
  the gradients of the summed loss while the backward pass runs (unused heads are found);
- methods that need per-task gradients (PCGrad, GradNorm) average them with
  `mean_across_ranks` before projecting or measuring them: one extra all-reduce of a
  (tasks x parameters) matrix per step instead of DDP's one of the parameters;
- MNRL gathers every rank's embeddings with autograd (`gather_rows`), so negatives come
  from the whole global batch and gradients flow back to the rank that made them;
- only rank 0 writes files; the others learn the outcome of its file checks
  (`run_on_main`) and send it what only they hold (their RNG state, their predictions).

Every collective has the timeout of `distributed.timeout_s`: a rank that dies stops the job
(torchrun ends the others) instead of leaving them waiting.

References:
    - Li et al. 2020, PyTorch Distributed: Experiences on Accelerating Data Parallel
      Training, https://arxiv.org/abs/2006.15704
    - sentence-transformers: MNRL with negatives gathered across devices (all_gather with
      autograd).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

if TYPE_CHECKING:
    from mtbert.config import DistributedConfig
    from mtbert.data.batching import Batch

T = TypeVar("T")


@dataclass(frozen=True)
class World:
    """This process's place in the job: rank `rank` of `size` (1 when not distributed)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0  # the rank on this machine (which GPU)

    @property
    def is_main(self) -> bool:
        """Rank 0, the only one that writes files."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.size > 1


def current_world() -> World:
    if not (dist.is_available() and dist.is_initialized()):
        return World()
    return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))


def launched_by_torchrun() -> bool:
    """True in a process that torchrun started (it sets RANK, WORLD_SIZE, MASTER_ADDR...)."""
    return "TORCHELASTIC_RUN_ID" in os.environ or {"RANK", "WORLD_SIZE"} <= os.environ.keys()


def join(config: DistributedConfig) -> World:
    """Join the process group torchrun set up (env:// rendezvous), with a timeout on every
    collective; on CUDA each process takes the GPU of its local rank."""
    backend = config.backend
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend, timeout=timedelta(seconds=config.timeout_s))
    return current_world()


def leave() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# ---------------------------------------------------------------- collectives


def _collective_device() -> torch.device:
    """Where a collective's tensors must live: NCCL talks CUDA, gloo CPU tensors."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def mean_across_ranks(tensor: Tensor) -> Tensor:
    """The element-wise mean of `tensor` over all ranks (itself when not distributed); not
    differentiable, meant for gradients and detached losses."""
    if not current_world().active:
        return tensor
    total = tensor.detach().clone()
    dist.all_reduce(total)
    return total / dist.get_world_size()


def reduce_values(values: dict[str, float], op: str = "mean") -> dict[str, float]:
    """The mean (or sum, `op="sum"`) of each value over all ranks; every rank passes the
    same keys. One all-reduce for all of them."""
    if not current_world().active or not values:
        return dict(values)
    total = torch.tensor(list(values.values()), dtype=torch.float64, device=_collective_device())
    dist.all_reduce(total)
    if op == "mean":
        total /= dist.get_world_size()
    return dict(zip(values, total.tolist(), strict=True))


def average_gradients(params: Sequence[nn.Parameter]) -> None:
    """Replace `.grad` of `params` by its mean over ranks, in one flat all-reduce (for
    gradients that DDP does not see: learned loss weights, and all but the shared encoder
    when a combiner averages the shared gradients itself)."""
    if not current_world().active:
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = mean_across_ranks(torch.cat([g.reshape(-1) for g in grads]))  # (P,)
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def gather_rows(x: Tensor) -> tuple[Tensor, int]:
    """Every rank's rows of `x` (N_r, ...), concatenated in rank order, WITH autograd: the
    gradient that any rank's loss sends to rank r's rows flows back to rank r and is summed
    there. Ranks may hold different numbers of rows. Returns (rows, where this rank's start).

    Every rank must call it, and every rank's loss must depend on the result (a zero
    multiple will do), because its backward pass is a collective too.
    """
    if not current_world().active:
        return x, 0
    from torch.distributed.nn.functional import all_gather

    counts = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(counts) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, counts)
    sizes = [int(s) for s in sizes]
    padded = torch.nn.functional.pad(x, (*[0, 0] * (x.dim() - 1), 0, max(sizes) - x.shape[0]))
    parts = all_gather(padded)  # world_size tensors (max N, ...)
    rows = torch.cat([part[:n] for part, n in zip(parts, sizes, strict=True)])
    return rows, sum(sizes[:dist.get_rank()])


def broadcast_object(obj: T) -> T:
    """Rank 0's `obj` on every rank (picklable objects)."""
    if not current_world().active:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, device=_collective_device())
    return box[0]


def gather_objects(obj: T) -> list[T]:
    """Every rank's `obj`, in rank order, on every rank."""
    if not current_world().active:
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def run_on_main(function: Callable[[], T]) -> T:
    """`function()` on rank 0 only (file checks and writes); every rank gets its result, or
    raises its error, so that no rank waits for a rank that failed."""
    world = current_world()
    if not world.active:
        return function()
    outcome: tuple = (None, None)
    if world.is_main:
        try:
            outcome = (function(), None)
        except Exception as error:  # re-raised on every rank below
            outcome = (None, error)
    result, error = broadcast_object(outcome)
    if error is not None:
        raise error
    return result


# ---------------------------------------------------------------- sharded evaluation


def shard_rows(total: int) -> np.ndarray:
    """The rows of a `total`-row split that this rank evaluates: every size-th from its rank."""
    world = current_world()
    return np.arange(world.rank, total, world.size)


def gather_shards(local: np.ndarray, total: int) -> np.ndarray:
    """Undo `shard_rows`: every rank's results back in the split's order, on every rank."""
    parts = gather_objects(local)
    if len(parts) == 1:
        return local
    out = np.empty((total, *local.shape[1:]), dtype=local.dtype)
    for rank, part in enumerate(parts):
        out[rank::len(parts)] = part
    return out


# ---------------------------------------------------------------- the step's forward pass


class StepForward(nn.Module):
    """A step's forward passes, one per task drawn, as one call: what DDP wraps. DDP needs
    one forward per backward; a step of several tasks would otherwise be several. `model` is
    the `MultitaskModel`, called as `model(task, batch)` (this module, which MNRL imports,
    names no model class: that would be an import circle)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batches: dict[str, Batch]) -> dict:
        return {task: self.model(task, batch) for task, batch in batches.items()}


def step_forward(model: nn.Module, device: torch.device) -> nn.Module:
    """`StepForward(model)`, wrapped in DDP when there are several ranks. DDP gets a process
    group of its own, so that its gradient all-reduces never interleave with MNRL's gathers.
    Heads of tasks a step did not draw get no gradient: DDP looks for unused parameters."""
    forward = StepForward(model)
    if not current_world().active:
        return forward
    return nn.parallel.DistributedDataParallel(
        forward, device_ids=[device.index] if device.type == "cuda" else None,
        process_group=dist.new_group(), find_unused_parameters=True)


@contextlib.contextmanager
def gradient_sync(forward: nn.Module, enabled: bool) -> Iterator[None]:
    """Let DDP average gradients in the backward pass of this forward, or not (accumulation
    micro-steps, combiners that average per-task gradients themselves)."""
    if enabled or not isinstance(forward, nn.parallel.DistributedDataParallel):
        yield
    else:
        with forward.no_sync():
            yield
