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
"""

from __future__ import annotations

from dataclasses import dataclass

from mtbert.config import ConfigError, ExperimentConfig


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


def describe(name: str) -> str:
    budget = get_budget(name)
    return f"{budget.name}: {budget.description}"
