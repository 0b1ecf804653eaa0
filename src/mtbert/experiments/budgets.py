"""Compute budgets for ablations: config overrides that cap how long a run trains.

A budget is applied on top of each config (the user's own `KEY=VALUE` overrides still win):

| budget | optimizer steps | training data kept | dev examples per task | evaluations |
|---|---:|---|---|---|
| `small` | 60 | 10% of every task | 500 | 1 per epoch |
| `medium` | 200 | 25% of every task | 1,000 | 1 per epoch |
| `large` | 600 | all | 2,000 | 2 per epoch |
| `full` | the config's | the config's (all) | the config's (all) | the config's |

The cap is on **optimizer steps** (`train.max_steps`); each run records the steps it took and
the examples it drew from each task (`result.json`, and the tables), since a round-robin step
draws a batch of every task where a one-task-per-step sampler draws one. Subsampling keeps
**each task's natural share**: the same fraction of every task (`train.train_fraction`), never
equal sizes, so that proportional, temperature and annealed sampling still differ. The dev
subsample is drawn with a fixed seed, so every config and every seed of a table is scored on
the same dev examples. A capped run fits its schedules over epochs into its steps
(`TaskSampler.fit_schedule`), so DWA and the annealed sampler act under every budget.
`large` is calibrated: `configs/base.yaml` (688 steps as written) scored overall 0.742 under it
against 0.745 in full, on the same 5,000-example dev subsample, one seed (2026-11-30):
`mtbert ablate configs/base.yaml --budget full --seeds 1 --out runs/calibrate-full` and
`mtbert ablate configs/base.yaml train.max_eval_examples=5000 --budget large --seeds 1
--out runs/calibrate-large` (SST 0.470 / 0.462, Quora 0.826 / 0.824, STS 0.880 / 0.879).
`small` and `medium` rank configs cheaply; their scores are not
comparable with full runs (see `docs/results/` for what each table used).

Equal examples for single-task rows: a run draws from each task a number of batches fixed by
its sampler, seed, task sizes and step cap (`planned_draws`). A single-task row (`mtbert
ablate --single-task`) trains as many steps as the baseline drew batches of its task
(`match_draws`), past its own epochs if need be: with the same seed its task stream gives the
same batches in the same order, so both sides of a Δm% saw the same examples of the task.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from mtbert.config import ConfigError, ExperimentConfig
from mtbert.data.sampling import TaskSampler, build_sampler, optimizer_steps


@dataclass(frozen=True)
class Budget:
    name: str
    description: str
    overrides: tuple[str, ...] = ()  # applied before the user's overrides
    steps: int | None = None  # optimizer steps at most


BUDGETS: dict[str, Budget] = {
    "small": Budget(
        "small", "60 optimizer steps on 10% of every task's training data; 500 dev examples "
                 "per task, the same for every run",
        ("train.train_fraction=0.1", "train.max_eval_examples=500", "train.evals_per_epoch=1"),
        steps=60),
    "medium": Budget(
        "medium", "200 optimizer steps on 25% of every task's training data; 1,000 dev "
                  "examples per task, the same for every run",
        ("train.train_fraction=0.25", "train.max_eval_examples=1000",
         "train.evals_per_epoch=1"),
        steps=200),
    "large": Budget(
        "large", "600 optimizer steps on all training data; 2,000 dev examples per task, the "
                 "same for every run",
        ("train.max_eval_examples=2000", "train.evals_per_epoch=2"),
        steps=600),
    "full": Budget("full", "the config as written, no caps of its own (the config's "
                           "`train.max_eval_examples`, if any, still applies)"),
}


def get_budget(name: str) -> Budget:
    if name not in BUDGETS:
        raise ConfigError(f"unknown budget {name!r}; known budgets: {', '.join(BUDGETS)}")
    return BUDGETS[name]


def budget_max_steps(budget: Budget, config: ExperimentConfig) -> int | None:
    """The `train.max_steps` of `config` under `budget`: the smaller of the two caps."""
    caps = [cap for cap in (budget.steps, config.train.max_steps) if cap is not None]
    return min(caps) if caps else None


def planned_draws(config: ExperimentConfig, task_sizes: dict[str, int]
                  ) -> tuple[int, dict[str, int]]:
    """The optimizer steps a one-process run of `config` takes on tasks of `task_sizes`
    training examples, and the batches it draws from each task, as the trainer counts them."""
    train = config.train
    sampler = _sampler(config, task_sizes)
    steps = optimizer_steps(sampler, train.epochs, train.grad_accumulation, train.max_steps)
    sampler.fit_schedule(steps * train.grad_accumulation)
    batches = dict.fromkeys(task_sizes, 0)
    for micro_step in range(steps * train.grad_accumulation):
        for task in sampler.tasks_for_step(micro_step):
            batches[task] += 1
    return steps, batches


def match_draws(alone: ExperimentConfig, size: int, batches: int) -> None:
    """Make the one-task config `alone` (of `size` training examples) draw `batches` batches
    of its task: that many micro-steps, more epochs than its own when they are too few."""
    match_steps(alone, {alone.tasks[0].name: size},
                math.ceil(batches / alone.train.grad_accumulation))


def match_steps(config: ExperimentConfig, task_sizes: dict[str, int], steps: int) -> None:
    """Make `config` (tasks of `task_sizes` training examples) take `steps` optimizer steps,
    more epochs than its own when they are too few. Under round robin each task then draws
    `steps x grad_accumulation` batches: a subset of a round-robin baseline's tasks draws the
    baseline's batches of each (`experiments/affinity.py`)."""
    train = config.train
    per_epoch = _sampler(config, task_sizes).steps_per_epoch()
    train.max_steps = steps
    train.epochs = max(train.epochs, steps * train.grad_accumulation / per_epoch)


def _sampler(config: ExperimentConfig, task_sizes: dict[str, int]) -> TaskSampler:
    train = config.train
    return build_sampler(train.sampler, task_sizes,
                         {t.name: t.batch_size or train.batch_size for t in config.tasks},
                         train.seed, epochs=train.epochs, **train.sampler_options)


def describe(name: str) -> str:
    budget = get_budget(name)
    return f"{budget.name}: {budget.description}"
