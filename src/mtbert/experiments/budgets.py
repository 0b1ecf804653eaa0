"""Compute budgets for ablations: config overrides that cap how long a run takes.

A budget is applied on top of each config (the user's own `KEY=VALUE` overrides still win):

| budget | training cap (examples drawn) | train / dev examples per task | evaluations |
|---|---|---|---|
| `small` | 2,048 (64 single-task steps of 32) | 1,000 / 500 | 1 per epoch |
| `medium` | 5,760 (60 round-robin steps of 3 x 32) | 2,000 / 1,000 | 1 per epoch |
| `large` | 38,400 (400 round-robin steps of 3 x 32) | 20,000 / 2,000 | 2 per epoch |
| `full` | none: the config as written | all / all | the config's |

The training cap counts *examples drawn*, not steps, so it is fair across samplers and batch
sizes: a round-robin step draws a batch from every task (3 x 32 examples for three tasks at batch
size 32), a proportional step one batch (32). The cap becomes `train.max_steps` for each config
as `round(examples / examples_per_optimizer_step)`, where examples per step are the sampler's
average over its first steps times `grad_accumulation` (task sizes estimated from the train
files' line counts, capped by `max_train_examples`). A config's own `max_steps` is kept if it is
smaller. On a CPU training costs roughly the examples it sees, so every config of a budget gets
about the same compute.

Calibration (2-core CPU, all-MiniLM-L6-v2): a training step of 32 single sentences takes
~0.55 s, of 32 sentence pairs about twice that (~40 examples/s for a three-task mix);
evaluation runs at ~200 examples/s; loading the model and tokenizing the capped data takes a
few seconds, writing the report ~9 s. `small` is ~1 min per run: the 30 configs of
`configs/papers/` x 1 seed took 27.1 min of training plus 4.6 min of reports. `medium` is
~2 min per run (the technique and conditioning tables in docs/results/ used it), `large`
~10 min (a night for 20 configs x 2 seeds; a minute or two on a GPU). The scores of `small`
and `medium` are for ranking configs quickly, not for comparison with the reports: dev
scores are on 500- or 1,000-example subsamples of each dev set (the same subsample for every
config and seed). `full` trains for the config's epochs on all the data and scores the whole
dev sets.
"""

from __future__ import annotations

from dataclasses import dataclass

from mtbert.config import ConfigError, ExperimentConfig


@dataclass(frozen=True)
class Budget:
    name: str
    description: str
    overrides: tuple[str, ...] = ()  # applied before the user's overrides
    train_examples: int | None = None  # examples drawn for training, all tasks together


BUDGETS: dict[str, Budget] = {
    "small": Budget(
        "small", "~1 min per run on a 2-core CPU: 2,048 training examples, "
                 "1,000 train / 500 dev examples per task",
        ("train.max_train_examples=1000", "train.max_eval_examples=500",
         "train.evals_per_epoch=1"),
        train_examples=2_048),
    "medium": Budget(
        "medium", "~2 min per run on a 2-core CPU: 5,760 training examples, "
                  "2,000 train / 1,000 dev examples per task",
        ("train.max_train_examples=2000", "train.max_eval_examples=1000",
         "train.evals_per_epoch=1"),
        train_examples=5_760),
    "large": Budget(
        "large", "~10 min per run on a 2-core CPU: 38,400 training examples, "
                  "20,000 train / 2,000 dev examples per task",
        ("train.max_train_examples=20000", "train.max_eval_examples=2000",
         "train.evals_per_epoch=2"),
        train_examples=38_400),
    "full": Budget("full", "the config as written: no caps"),
}

# Steps over which a sampler's draws are averaged to get its examples per step.
SAMPLER_PROBE_STEPS = 256


def get_budget(name: str) -> Budget:
    if name not in BUDGETS:
        raise ConfigError(f"unknown budget {name!r}; known budgets: {', '.join(BUDGETS)}")
    return BUDGETS[name]


def examples_per_step(config: ExperimentConfig) -> float:
    """Training examples one optimizer step draws, averaged over the sampler's first steps."""
    from mtbert.data.sampling import build_sampler

    train = config.train
    sizes = estimated_train_sizes(config)
    batch_sizes = {t.name: t.batch_size or train.batch_size for t in config.tasks}
    try:
        sampler = build_sampler(train.sampler, sizes, batch_sizes, train.seed,
                                epochs=train.epochs, **train.sampler_options)
    except ValueError as error:
        raise ConfigError(f"train.sampler: {error}") from None
    drawn = sum(batch_sizes[task] for step in range(SAMPLER_PROBE_STEPS)
                for task in sampler.tasks_for_step(step))
    return drawn / SAMPLER_PROBE_STEPS * train.grad_accumulation


def estimated_train_sizes(config: ExperimentConfig) -> dict[str, int]:
    """Training examples per task: the train file's lines minus the header, capped by
    `train.max_train_examples`; the cap alone when the file cannot be read."""
    from mtbert.data.tasks import split_file

    cap = config.train.max_train_examples
    sizes = {}
    for task in config.tasks:
        path = split_file(task, "train", config.data_dir)
        try:
            with open(path, "rb") as f:
                lines = sum(1 for line in f if line.strip())
            size = max(1, lines - 1)
        except OSError:
            size = cap or 1
        sizes[task.name] = min(size, cap) if cap else size
    return sizes


def budget_max_steps(budget: Budget, config: ExperimentConfig) -> int | None:
    """The `train.max_steps` that caps `config` at the budget's training examples (None: no
    cap). `config` must already hold the budget's overrides."""
    if budget.train_examples is None:
        return config.train.max_steps
    steps = max(1, round(budget.train_examples / examples_per_step(config)))
    if config.train.max_steps is not None:
        steps = min(steps, config.train.max_steps)
    return steps


def budget_overrides(name: str, config: ExperimentConfig | None = None) -> list[str]:
    """The overrides of budget `name`; with `config` (loaded with those overrides), also the
    `train.max_steps` that caps its training."""
    budget = get_budget(name)
    overrides = list(budget.overrides)
    if config is not None and budget.train_examples is not None:
        overrides.append(f"train.max_steps={budget_max_steps(budget, config)}")
    return overrides


def describe(name: str) -> str:
    budget = get_budget(name)
    return f"{budget.name}: {budget.description}"

