"""Task samplers: which task(s) the multi-task trainer draws a batch from at each step.

Every draw is a pure function of ``(seed, step)`` (``numpy.random.default_rng([seed, step])``),
so all DDP ranks agree and a resumed run continues the same sequence without saved state.
"""

import inspect
import math
from fractions import Fraction

import numpy as np

from mtbert.registry import Registry


class TaskSampler:
    """Base sampler: validates the task sizes and defines the interface.

    Args:
        task_sizes: Number of training examples per task (> 0); its order is the task order.
        batch_sizes: Batch size per task (> 0), same keys.
        seed: Seed of the draws (>= 0).
        epochs: Length of the run in epochs (needed only by schedules over epochs).

    Declared for the config checks: ``draws_every_task`` (every step holds every task, which
    PCGrad and GradNorm need) and ``acts_from_epoch`` (the first epoch, 1-based, in which the
    sampler differs from its first epoch's behaviour; a config with fewer epochs is an error).

    Schedules over epochs (the annealed sampler's, and the trainer's: DWA, MNRL's threshold)
    count epochs with ``epoch_of``; ``fit_schedule`` fits them into a run that a step cap
    stops early.
    """

    draws_every_task = False
    acts_from_epoch = 1

    def __init__(
        self,
        task_sizes: dict[str, int],
        batch_sizes: dict[str, int],
        seed: int,
        epochs: float | None = None,
    ):
        if not task_sizes:
            raise ValueError("A task sampler needs at least one task.")
        if set(batch_sizes) != set(task_sizes):
            raise ValueError(
                f"Batch sizes must name exactly the tasks {list(task_sizes)}, "
                f"got {list(batch_sizes)}."
            )
        if any(n <= 0 for n in task_sizes.values()) or any(b <= 0 for b in batch_sizes.values()):
            raise ValueError(
                f"Task sizes and batch sizes must be > 0, got {task_sizes} and {batch_sizes}."
            )
        if seed < 0:
            raise ValueError(f"The sampler seed must be >= 0, got {seed}.")
        if epochs is not None and epochs <= 0:
            raise ValueError(f"epochs must be > 0, got {epochs}.")
        self.task_names = tuple(task_sizes)
        self.task_sizes = dict(task_sizes)
        self.batch_sizes = {name: batch_sizes[name] for name in self.task_names}
        self.seed = seed
        self.epochs = epochs
        self.schedule_epoch_steps: float | None = None  # None: an epoch of data

    def fit_schedule(self, run_steps: int) -> None:
        """Fit the epoch schedule into a run of ``run_steps`` steps. A run that trains all its
        ``epochs`` keeps epochs of data (``steps_per_epoch()``); one that a step cap
        (``train.max_steps``, an ablation budget) stops early gets ``epochs`` shorter epochs of
        ``run_steps / epochs`` steps, so schedules over epochs run to their end within it, as
        the learning rate's does, instead of never acting."""
        if self.epochs is not None:
            self.schedule_epoch_steps = min(self.steps_per_epoch(), run_steps / self.epochs)

    def epoch_of(self, step: int) -> int:
        """The 0-based schedule epoch that ``step`` falls in (see ``fit_schedule``)."""
        _check_step(step)
        return int(step // (self.schedule_epoch_steps or max(1, self.steps_per_epoch())))

    def tasks_for_step(self, step: int) -> list[str]:
        """Tasks to draw a batch from at ``step`` (>= 0); a pure function of (seed, step)."""
        raise NotImplementedError

    def steps_per_epoch(self) -> int:
        """Number of steps that make one epoch."""
        raise NotImplementedError


class RoundRobinSampler(TaskSampler):
    """Every step draws a batch from EVERY task, in the fixed task order.

    One epoch is ``max_i ceil(n_i / b_i)`` steps, one pass over the largest task; smaller tasks
    cycle through their data more than once, which over-samples them.

    References:
        - Stickland & Murray 2019, BERT and PALs: Projected Attention Layers for Efficient
          Adaptation in Multi-Task Learning, https://arxiv.org/abs/1902.02671
        - OptimusBERT report (shared/papers/optimusbert.txt): round-robin multi-task fine-tuning.
    """

    draws_every_task = True

    def tasks_for_step(self, step: int) -> list[str]:
        _check_step(step)
        return list(self.task_names)

    def steps_per_epoch(self) -> int:
        return max(math.ceil(n / self.batch_sizes[t]) for t, n in self.task_sizes.items())


class _OneTaskPerStepSampler(TaskSampler):
    """One task per step, drawn with ``probabilities(step)``.

    One epoch is ``ceil(sum_i n_i / b_i)`` steps: as many as batches in one pass over every
    task's data (in expectation one pass over each task when p_i is proportional to n_i).
    """

    def probabilities(self, step: int) -> np.ndarray:
        """Probability of each task (T,) at ``step``, in task order."""
        raise NotImplementedError

    def tasks_for_step(self, step: int) -> list[str]:
        _check_step(step)
        rng = np.random.default_rng([self.seed, step])
        return [self.task_names[rng.choice(len(self.task_names), p=self.probabilities(step))]]

    def steps_per_epoch(self) -> int:
        return math.ceil(sum(Fraction(n, self.batch_sizes[t]) for t, n in self.task_sizes.items()))

    def _size_powers(self, exponent: float) -> np.ndarray:
        """``n_i ** exponent`` normalised to sum 1, (T,)."""
        sizes = np.array([self.task_sizes[t] for t in self.task_names], dtype=np.float64)  # (T,)
        powers = sizes**exponent
        return powers / powers.sum()


class ProportionalSampler(_OneTaskPerStepSampler):
    """One task per step with ``p_i`` proportional to its size ``n_i``.

    References:
        - Stickland & Murray 2019, BERT and PALs, https://arxiv.org/abs/1902.02671 (sampling
          proportional to size)
    """

    def probabilities(self, step: int) -> np.ndarray:
        return self._size_powers(1.0)


class TemperatureSampler(_OneTaskPerStepSampler):
    """One task per step with ``p_i`` proportional to ``n_i ** (1 / temperature)``.

    Temperature 1 is proportional sampling; larger temperatures flatten it towards uniform.

    Args:
        temperature: > 0.

    References:
        - Arivazhagan et al. 2019, Massively Multilingual Neural Machine Translation in the Wild,
          https://arxiv.org/abs/1907.05019
    """

    def __init__(
        self,
        task_sizes: dict[str, int],
        batch_sizes: dict[str, int],
        seed: int,
        epochs: float | None = None,
        temperature: float = 2.0,
    ):
        super().__init__(task_sizes, batch_sizes, seed, epochs)
        if temperature <= 0:
            raise ValueError(f"The sampling temperature must be > 0, got {temperature}.")
        self.temperature = temperature

    def probabilities(self, step: int) -> np.ndarray:
        return self._size_powers(1.0 / self.temperature)


class AnnealedSampler(_OneTaskPerStepSampler):
    """One task per step with ``p_i`` proportional to ``n_i ** alpha``, alpha annealed over epochs.

    ``alpha = 1 - 0.8 * (e - 1) / (E - 1)``, where ``e = epoch_of(step) + 1`` is the current
    epoch (1-based, capped at E) and ``E = ceil(epochs)`` the number of epochs:
    proportional sampling in the first epoch, close to uniform (``n_i ** 0.2``) in the last;
    ``alpha = 1`` throughout when E = 1. Needs ``epochs``.

    References:
        - Stickland & Murray 2019, BERT and PALs, https://arxiv.org/abs/1902.02671 (annealed
          sampling)
    """

    acts_from_epoch = 2

    def __init__(
        self,
        task_sizes: dict[str, int],
        batch_sizes: dict[str, int],
        seed: int,
        epochs: float | None = None,
    ):
        super().__init__(task_sizes, batch_sizes, seed, epochs)
        if epochs is None:
            raise ValueError("AnnealedSampler needs epochs, the length of the run.")
        self.num_epochs = math.ceil(epochs)

    def alpha(self, step: int) -> float:
        """Exponent of the task sizes at ``step``."""
        _check_step(step)
        if self.num_epochs == 1:
            return 1.0
        epoch = min(self.epoch_of(step) + 1, self.num_epochs)  # 1-based
        return 1.0 - 0.8 * (epoch - 1) / (self.num_epochs - 1)

    def probabilities(self, step: int) -> np.ndarray:
        return self._size_powers(self.alpha(step))


def optimizer_steps(sampler: TaskSampler, epochs: float, grad_accumulation: int,
                    max_steps: int | None) -> int:
    """Optimizer steps of a run: ``epochs`` of the sampler's steps in micro-steps of
    ``grad_accumulation``, at most ``max_steps``."""
    steps = math.ceil(math.ceil(epochs * sampler.steps_per_epoch()) / grad_accumulation)
    return steps if max_steps is None else min(steps, max_steps)


def _check_step(step: int) -> None:
    if step < 0:
        raise ValueError(f"The step must be >= 0, got {step}.")


SAMPLERS = Registry("sampler", {
    "round_robin": RoundRobinSampler,
    "proportional": ProportionalSampler,
    "temperature": TemperatureSampler,
    "annealed": AnnealedSampler,
})


def build_sampler(
    name: str,
    task_sizes: dict[str, int],
    batch_sizes: dict[str, int],
    seed: int,
    epochs: float | None = None,
    **options,
) -> TaskSampler:
    """Instantiate the sampler ``name`` (e.g. ``temperature=3.0`` for "temperature")."""
    if name not in SAMPLERS:
        raise ValueError(f"Unknown task sampler {name!r}; known samplers: {', '.join(SAMPLERS)}.")
    cls = SAMPLERS[name]
    try:
        inspect.signature(cls).bind(task_sizes, batch_sizes, seed, epochs, **options)
    except TypeError as error:
        raise ValueError(f"Bad options {options} for task sampler {name!r}: {error}.") from None
    return cls(task_sizes, batch_sizes, seed, epochs, **options)
