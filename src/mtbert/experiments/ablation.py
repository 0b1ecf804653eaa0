"""Ablations: train several configs over several seeds under one budget, then tabulate.

Layout of `OUT` (default `runs/ablation`):

    OUT/<config name>/seed-<k>/   one run (Trainer's files: config.yaml, metrics.jsonl, best/)
        result.json               written last, atomically: the run is finished
    OUT/results.csv               one row per config: mean and std of each metric over seeds
    OUT/results-per-seed.csv      one row per run: its seed, code, steps, examples and scores
    OUT/results.md                the same in the layout of the reports' tables
    OUT/results.png               grouped bars: one group per config, a bar per metric

Seed k of a config trains with `train.seed = <config's seed> + k`. A config is named by its
`name:` key, or after its file when it has none.

Every row is scored by one rule: its dev scores at its last step (no checkpoint selection on
the dev sample it is scored on). Single-task rows draw the baseline's batches of their task
(`budgets.match_draws`). `--plan` (`plan_table`) prints each row's steps and examples per task
without training.

Resuming: a run whose `result.json` exists and was made by this code (`provenance`) is
skipped; a run folder without one is a run that was interrupted or failed, and a run made by
other code is stale: either is deleted and trained again from scratch. A finished run whose
saved config differs from what the command asks for now (another budget, another override) is
an error rather than being mixed into the table: delete it or use another `--out`.

A run that fails (an exception) is logged, left without `result.json` and the ablation goes on;
the table is written from the runs that finished and the command reports the failures.
"""

from __future__ import annotations

import copy
import csv
import json
import logging
import math
import shutil
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from scipy import stats

from mtbert.checkpoint import (
    RunFolderError,
    RunLock,
    clear_run,
    holds_run,
    load_json,
    write_json_atomically,
)
from mtbert.config import (
    ConfigError,
    ExperimentConfig,
    config_differences,
    load_config,
    load_yaml,
    to_dict,
    validate,
)
from mtbert.data.readers import stream_examples
from mtbert.data.tasks import reading_options, sample_rows, split_file
from mtbert.experiments.budgets import (
    Budget,
    budget_max_steps,
    get_budget,
    match_draws,
    planned_draws,
)
from mtbert.merging import METHODS as MERGE_METHODS
from mtbert.metrics import METRICS
from mtbert.provenance import code_version
from mtbert.techniques import check_techniques
from mtbert.training import FIRST_LOSSES_STEPS, TrainingError

log = logging.getLogger(__name__)

RESULT_FILE = "result.json"
SINGLE_TASK_TEACHERS = "single-task"  # distill.teachers value: the baseline's single-task runs
TWO_STAGE_TEACHERS = "two-stage"  # distill.teachers value: the baseline's two-stage models
# distill.teachers value -> (the teaching row's suffix after the baseline's name, its option)
TEACHER_ROWS = {SINGLE_TASK_TEACHERS: ("only", "--single-task"),
                TWO_STAGE_TEACHERS: ("two-stage", "--two-stage")}
DEFAULT_BACKBONES = ("all-minilm-l6-v2", "default")

# How the reports name the tasks in their tables; any other task is shown by its own name.
DISPLAY_NAMES = {"sst": "SST", "quora": "Paraphrase", "sts": "STS", "cola": "CoLA",
                 "mrpc": "MRPC", "rte": "RTE", "stsb": "STS-B", "wnli": "WNLI", "sst2": "SST-2"}
QUORA_TASKS = ("quora",)
QUORA_NOTE = ("Quora scores of the all-MiniLM-L6-v2 backbone are not clean: it was pre-trained "
              "on paraphrase data that includes Quora duplicates.")
SELECTION = "last"  # every row's scores: its last step's (a merged model's one evaluation)
STD_NOTE = ("Scores are each run's dev scores at its last step, the one selection rule of "
            "every row (no checkpoint is chosen on the dev examples the rows are scored on), "
            "as mean ± sample standard deviation (n − 1) over seeds; with one seed the "
            "value is shown alone. Correlations are Pearson's r (not normalised); a task with "
            "several metrics scores their mean (GLUE's rule; its `mean` column). Overall Dev "
            "is the mean of the task scores over the tasks the config trains, correlation-like "
            "ones (Pearson, Spearman, MCC) mapped to (r + 1) / 2, or as they are where the "
            "config sets `overall_score: mean` (the GLUE score).")
COMPARISON_NOTE = (
    "Δ overall: the row's overall dev score minus the baseline's (the first configuration) on "
    "the same seeds, mean over seeds with a 95% Student-t interval; `tie` marks an interval "
    "that holds 0 (a difference inside the seed noise); `other tasks`: the row trains other "
    "tasks than the baseline, so its overall score is not comparable (read its tasks' gains "
    "over the single-task rows instead). Δm%: the mean over tasks of the "
    "relative gain over the same task trained alone with the same recipe, budget and seed "
    "(Maninis et al. 2019), in percent, with its interval over seeds; `–` where a single-task "
    "score is 0 on some seed (a relative gain over 0 is undefined: read the per-task gains in "
    "points). Steps / examples seen: "
    "optimizer steps and the training examples drawn from each task, mean over seeds; a "
    "single-task row draws as many batches of its task as the baseline drew, with the same "
    "seed: the same examples (a merged row counts its single-task runs').")
# Keys of the resolved config that may differ between a finished run and a re-run.
IGNORED_KEYS = ("data_dir", "train.threads", "train.eval_batch_size")


class AblationError(TrainingError):
    """Some runs of an ablation failed; the others finished and are tabulated."""


@dataclass
class PlannedRun:
    name: str
    config_file: Path
    seed_index: int
    config: ExperimentConfig
    run_dir: Path
    single_task_of: str | None = None  # the multitask config whose task this run trains alone
    merge_method: str | None = None  # not trained: `sources` merged (`mtbert merge`)
    # Not trained: each task's scores are those of its own model in `sources` (two-stage).
    per_task: bool = False
    sources: list[Path] = field(default_factory=list)
    part_of: str | None = None  # a run of another row's (its per-task models): no row itself
    after: list[Path] = field(default_factory=list)  # other runs it reads: its teachers, ...

    @property
    def result_file(self) -> Path:
        return self.run_dir / RESULT_FILE

    @property
    def finished(self) -> bool:
        """`result.json` is there and was made by this code (else the run is stale)."""
        return finished_run(self.run_dir)

    @property
    def trains(self) -> bool:
        return self.merge_method is None and not self.per_task

    @property
    def needs(self) -> list[Path]:
        """The runs that must finish before this one: those it reads."""
        return [*self.after, *self.sources]


@dataclass
class AblationOutcome:
    runs: list[PlannedRun]
    results: dict[str, list[dict]]  # config name -> results of its finished runs
    trained: list[PlannedRun] = field(default_factory=list)
    skipped: list[PlannedRun] = field(default_factory=list)
    failed: list[tuple[PlannedRun, str]] = field(default_factory=list)
    files: dict[str, Path] = field(default_factory=dict)


# ---------------------------------------------------------------- planning


def config_name(path: Path, overrides: Sequence[str], config: ExperimentConfig) -> str:
    """The config's `name:` (from the file or an override), else the file's stem."""
    raw = load_yaml(Path(path).read_text(encoding="utf-8"), str(path)) or {}
    named = "name" in raw or any(o.split("=", 1)[0].strip() == "name" for o in overrides)
    return config.name if named else Path(path).stem


def plan_runs(config_files: Sequence[str | Path], budget: str = "small", seeds: int = 3,
              out: str | Path = "runs/ablation", data_dir: str | None = None,
              overrides: Sequence[str] = (), single_task: bool = False,
              merges: Sequence[str] = (), two_stage: bool | str | Path = False
              ) -> list[PlannedRun]:
    """Resolve every config x seed under the budget; checks names and finished runs. A run
    comes after the runs it needs (`needs`).

    `single_task`: also train each task of the first config (the baseline) alone, with the
    same recipe, budget and seeds, as `<name>-only-<task>`: the rows Δm% is measured against.
    A config may name them as its teachers, `distill.teachers: {TASK: single-task}` (a BAM!
    student taught by the runs of its own seed). `merges`: methods of `mtbert merge`, each a
    row `<name>-merged-<method>` merging the single-task runs of each seed. `two_stage`: a
    row `<name>-two-stage`, MT-DNN's recipe (Liu et al. 2019): each task fine-tuned alone
    from the baseline's run of the same seed (`mtbert train --from RUN --finetune TASK`),
    drawing what the task's single-task row draws; one model per task, each scored on its
    task. Its models can teach a student: `distill.teachers: {TASK: two-stage}`. A config
    file as `two_stage`: stage two takes that file's training settings instead (MT-DNN's
    short fine-tune, `configs/winning/two-stage.yaml`), under the budget, with the seed of
    the run it starts from.
    """
    if seeds < 1:
        raise ConfigError(f"--seeds: at least 1, got {seeds}")
    if not config_files:
        raise ConfigError("ablate: name at least one config file")
    if merges and not single_task:
        raise ConfigError("--merge merges the single-task runs: add --single-task")
    spec = get_budget(budget)
    out = Path(out)
    runs: list[PlannedRun] = []
    names: dict[str, Path] = {}
    for path in map(Path, config_files):
        base = load_config(path, [*spec.overrides, *overrides], data_dir)
        name = config_name(path, overrides, base)
        if name in names:
            raise ConfigError(f"{path} and {names[name]} are both named {name!r}; give one a "
                              f"different `name:`")
        names[name] = path
        for k in range(seeds):
            config = budgeted_config(path, spec, overrides, data_dir, base, k)
            check_techniques(config)
            config.name = name
            baseline = next(iter(names))
            teachers = {}
            planned = {SINGLE_TASK_TEACHERS: single_task, TWO_STAGE_TEACHERS: two_stage}
            for task, source in config.distill.teachers.items():
                if source not in TEACHER_ROWS:
                    continue
                row, flag = TEACHER_ROWS[source]
                if not planned[source] or len(names) == 1:
                    raise ConfigError(f"{path}: distill.teachers {source!r} needs {flag} and "
                                      "another config first (the baseline whose models teach)")
                teachers[task] = out / f"{baseline}-{row}-{task}" / f"seed-{k}"
            config.distill.teachers.update({task: str(run) for task, run in teachers.items()})
            runs.append(PlannedRun(name, path, k, config, out / name / f"seed-{k}",
                                   after=list(teachers.values())))
            if single_task and len(names) == 1:
                runs += [PlannedRun(f"{name}-only-{task.name}", path, k, alone, out /
                                    f"{name}-only-{task.name}" / f"seed-{k}", name)
                         for task, alone in zip(config.tasks, single_task_configs(config,
                                                                                  True))]
    baselines = [run for run in runs if run.name == next(iter(names))]
    for method in merges:
        if method not in MERGE_METHODS:
            raise ConfigError(f"--merge: unknown {method!r}; known: {sorted(MERGE_METHODS)}")
        for run in baselines:
            merged = f"{run.name}-merged-{method}"
            runs.append(PlannedRun(
                merged, run.config_file, run.seed_index, run.config,
                out / merged / f"seed-{run.seed_index}", merge_method=method,
                sources=[out / f"{run.name}-only-{t.name}" / f"seed-{run.seed_index}"
                         for t in run.config.tasks]))
    if two_stage:
        stage_two = None if two_stage is True else budgeted_config(
            Path(two_stage), spec, overrides, data_dir)
        runs += [part for run in baselines for part in two_stage_runs(run, out, stage_two)]
    stale = [message for run in runs if (message := _stale(run))]
    if stale:
        raise ConfigError("finished runs were trained with another config; delete them or use "
                          "another --out:\n  " + "\n  ".join(stale))
    return in_dependency_order(runs)


def budgeted_config(path: Path, spec: Budget, overrides: Sequence[str], data_dir: str | None,
                    base: ExperimentConfig | None = None, k: int = 0) -> ExperimentConfig:
    """`path` under the budget `spec` (its settings, its step cap) and `overrides`, with seed
    k of the config (`base`: the config read without cap or seed, if already read)."""
    if base is None:
        base = load_config(path, [*spec.overrides, *overrides], data_dir)
    steps = budget_max_steps(spec, base)
    capped = [] if steps is None else [f"train.max_steps={steps}"]
    return load_config(path, [*spec.overrides, *capped, *overrides,
                              f"train.seed={base.train.seed + k}"], data_dir)


def two_stage_runs(baseline: PlannedRun, out: Path,
                   stage_two: ExperimentConfig | None = None) -> list[PlannedRun]:
    """The `<name>-two-stage` row of one seed: a fine-tune of each task from `baseline`'s run,
    then the row that collects them. Each fine-tune draws the batches the task's single-task
    row draws, or, given `stage_two`, trains with its settings and the baseline's seed,
    scored on the baseline's dev sample (the table's one scoring rule)."""
    from mtbert.adapting import finetune_config

    row, k = f"{baseline.name}-two-stage", baseline.seed_index
    tasks = [task.name for task in baseline.config.tasks]
    if stage_two is None:
        settings = single_task_configs(baseline.config, True)
    else:
        settings = [copy.deepcopy(stage_two) for _ in tasks]
        for config in settings:
            config.train.seed = baseline.config.train.seed
            config.train.max_eval_examples = baseline.config.train.max_eval_examples
    parts = []
    for task, alone in zip(tasks, settings):
        alone.name = row  # the fine-tune of TASK is named ROW-TASK
        config = finetune_config(baseline.config, alone, baseline.run_dir, task)
        parts.append(PlannedRun(config.name, baseline.config_file, k, config,
                                out / config.name / f"seed-{k}", part_of=row,
                                after=[baseline.run_dir]))
    collected = PlannedRun(row, baseline.config_file, k, baseline.config,
                           out / row / f"seed-{k}", per_task=True,
                           sources=[part.run_dir for part in parts])
    return [*parts, collected]


def in_dependency_order(runs: list[PlannedRun]) -> list[PlannedRun]:
    """`runs` in their order, except that each comes after the runs it needs."""
    depth: dict[Path, int] = {}
    planned = {run.run_dir: run for run in runs}

    def depth_of(run: PlannedRun) -> int:
        if run.run_dir not in depth:
            depth[run.run_dir] = 1 + max((depth_of(planned[p]) for p in run.needs
                                          if p in planned), default=-1)
        return depth[run.run_dir]

    return sorted(runs, key=depth_of)


def single_task_configs(config: ExperimentConfig, equal_examples: bool = False
                        ) -> list[ExperimentConfig]:
    """Each task of `config` alone: the same recipe, losses summed (a weighting or combiner
    of several tasks has nothing to act on). `equal_examples`: each draws as many batches of
    its task as `config` draws (`match_draws`; reads the training files' sizes)."""
    if equal_examples:
        sizes = train_sizes(config)
        _, batches = planned_draws(config, sizes)
    alone = []
    for task in config.tasks:
        single = copy.deepcopy(config)
        single.name = f"{config.name}-only-{task.name}"
        single.tasks = [copy.deepcopy(task)]
        single.train.weighting, single.train.weighting_options = "sum", {}
        single.train.combiner = "sum"
        single.train.affinity_every = None  # one task: no other task to measure against
        if equal_examples:
            match_draws(single, sizes[task.name], batches[task.name])
        validate(single)
        alone.append(single)
    return alone


_SIZES: dict[str, int] = {}  # training examples of a task as subsampled, read once per process


def train_sizes(config: ExperimentConfig) -> dict[str, int]:
    """Training examples of each task of `config` after its subsampling (what the trainer's
    sampler is given); each task's file is streamed once per process, its rows counted, not
    held (a task may be larger than memory)."""
    train = config.train
    sizes = {}
    for task in config.tasks:
        key = json.dumps([to_dict(task), config.data_dir, train.train_fraction,
                          train.max_train_examples], sort_keys=True, default=str)
        if key not in _SIZES:
            options = reading_options(task, "train", config.strict_data,
                                      config.max_skipped_share)
            rows = sum(1 for _ in stream_examples(split_file(task, "train", config.data_dir),
                                                  **options))
            sample = sample_rows(rows, train.max_train_examples, train.train_fraction)
            _SIZES[key] = rows if sample is None else len(sample)
        sizes[task.name] = _SIZES[key]
    return sizes


def finished_run(run_dir: Path) -> bool:
    """`run_dir` holds a `result.json` made by this code (else the run is stale)."""
    result = run_dir / RESULT_FILE
    return result.is_file() and not made_by_other_code(result)


def made_by_other_code(result_file: Path) -> bool:
    """The run of `result_file` was trained by other code than this process runs (or does
    not say by which): it is stale, to be trained again."""
    code = load_json(result_file).get("code") or {}
    return code.get("source") != code_version()["source"]


def _stale(run: PlannedRun) -> str | None:
    """Why a finished run does not match its planned config, or None."""
    saved = run.run_dir / "config.yaml"
    if not run.finished or not saved.is_file():
        return None
    before = load_yaml(saved.read_text(encoding="utf-8"), str(saved)) or {}
    changed = config_differences(before, to_dict(run.config), IGNORED_KEYS, common_only=True)
    return f"{run.run_dir} ({'; '.join(changed[:3])})" if changed else None


# ---------------------------------------------------------------- running


def run_result(run: PlannedRun, budget: str, **fields) -> dict:
    """`run`'s `result.json`: what every row records (its config, seed, budget, tasks, the
    selection rule and the code that made it) and `fields`."""
    config = run.config
    return {
        "config": run.name, "config_file": str(run.config_file), "seed": config.train.seed,
        "seed_index": run.seed_index, "budget": budget, "backbone": config.model.backbone,
        "tasks": {t.name: {"metric": t.metric, "kind": t.kind, "preset": t.preset}
                  for t in config.tasks},
        "selection": SELECTION, **fields, "code": code_version(),
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def run_one(run: PlannedRun, budget: str) -> dict:
    """Train one run from scratch and write its `result.json`; returns the result."""
    from mtbert.training import Trainer

    with RunLock(run.run_dir):  # a second ablation into the same --out skips this run
        if holds_run(run.run_dir):  # an interrupted or failed run: start again from scratch
            log.info("%s: removing the unfinished run", run.run_dir)
        clear_run(run.run_dir, everything=True)
        start = time.perf_counter()
        trainer = Trainer(run.config, run.run_dir)
        fit_start = time.perf_counter()
        dev = trainer.fit()
        end = time.perf_counter()
        # Resume checkpoints (model + optimizer state) are of no use once the run has
        # finished; at ~4x the model's size each they would fill the disk. best/ stays.
        shutil.rmtree(getattr(trainer, "checkpoints_dir", run.run_dir / "checkpoints"),
                      ignore_errors=True)
    result = run_result(
        run, budget,
        dev=trainer.state.history[-1]["dev"] if trainer.state.history else dev,
        dev_step=trainer.state.history[-1]["step"] if trainer.state.history else -1,
        best_dev=dev, single_task_of=run.single_task_of, from_run=run.config.adapt.from_run,
        best_step=trainer.state.best_step, steps=trainer.state.step,
        examples_seen=trainer.state.examples_seen, first_losses=trainer.state.first_losses,
        total_steps=trainer.total_steps, wall_time_s=round(end - start, 2),
        train_time_s=round(end - fit_start, 2), parameters=trainer.parameter_counts(),
        precision=trainer.precision)
    write_json_atomically(run.result_file, result)
    return result


def run_merged(run: PlannedRun, budget: str) -> dict:
    """Merge the single-task runs `run.sources` into `run_dir/best`, score it on the dev
    sample every run is scored on, and write `result.json`. Its training time is the sum of
    the merged runs' (what the merged model cost)."""
    from mtbert.merging import merge_runs
    from mtbert.training import Trainer

    sources = [json.loads((s / RESULT_FILE).read_text(encoding="utf-8")) for s in run.sources]
    with RunLock(run.run_dir):
        clear_run(run.run_dir, everything=True)
        start = time.perf_counter()
        merged = merge_runs(run.sources, run.merge_method, run.run_dir / "best")
        trainer = Trainer(run.config, run.run_dir)  # the run's dev sample, tokenized
        trainer.model.load_state_dict(merged.state_dict())
        dev = trainer.evaluate("dev")
        own = time.perf_counter() - start
    result = run_result(
        run, budget, dev=dev, single_task_of=None, merged_from=[str(s) for s in run.sources],
        merge_method=run.merge_method, best_step=-1, steps=sum(s["steps"] for s in sources),
        examples_seen={t: n for s in sources for t, n in s["examples_seen"].items()},
        first_losses=[], total_steps=sum(s["total_steps"] for s in sources),
        wall_time_s=round(own + sum(s["wall_time_s"] for s in sources), 2),
        train_time_s=round(sum(s["train_time_s"] for s in sources), 2),
        parameters=trainer.parameter_counts(), precision=trainer.precision)
    write_json_atomically(run.result_file, result)
    return result


def run_per_task(run: PlannedRun, budget: str) -> dict:
    """The two-stage row of one seed: each task's dev score from its own model in
    `run.sources` (a user keeps one model per task). Its compute is the stage-one run's plus
    every stage-two run's; its parameters are all the models' (every one is task-specific)."""
    from mtbert.evaluation import overall_score

    parts = [json.loads((s / RESULT_FILE).read_text(encoding="utf-8")) for s in run.sources]
    stage_one = json.loads((Path(parts[0]["from_run"]) / RESULT_FILE).read_text(encoding="utf-8"))
    # A part's dev scores are its one task's (each of its metrics and their mean) and overall.
    dev = {key: value for part in parts for key, value in part["dev"].items()
           if key != "overall"}
    dev["overall"] = overall_score({t.name: t for t in run.config.tasks}, dev,
                                   run.config.overall_score)
    seen = dict(stage_one["examples_seen"])
    for part in parts:
        for task, n in part["examples_seen"].items():
            seen[task] = seen.get(task, 0) + n
    everyone = [stage_one, *parts]
    total = sum(part["parameters"]["total"] for part in parts)
    result = run_result(
        run, budget, dev=dev, single_task_of=None,
        per_task_models=[str(s) for s in run.sources], from_run=parts[0]["from_run"],
        best_step=-1, steps=sum(r["steps"] for r in everyone), examples_seen=seen,
        first_losses=[], total_steps=sum(r["total_steps"] for r in everyone),
        wall_time_s=round(sum(r["wall_time_s"] for r in everyone), 2),
        train_time_s=round(sum(r["train_time_s"] for r in everyone), 2),
        parameters={"total": total, "task_specific": total}, precision=stage_one["precision"])
    with RunLock(run.run_dir):
        write_json_atomically(run.result_file, result)
    return result


def read_result(run: PlannedRun) -> dict:
    return json.loads(run.result_file.read_text(encoding="utf-8"))


def run_ablation(config_files: Sequence[str | Path], budget: str = "small", seeds: int = 3,
                 out: str | Path = "runs/ablation", data_dir: str | None = None,
                 overrides: Sequence[str] = (), report: bool = True,
                 tensorboard: bool = False, single_task: bool = False,
                 merges: Sequence[str] = (), two_stage: bool | str | Path = False
                 ) -> AblationOutcome:
    """Train every config x seed not finished yet, then write the result tables.

    The first config is the baseline every other row is compared with; `single_task` adds
    its tasks trained alone (see `plan_runs`). `report`: write each run's `report.html` (also
    for a finished run that lacks one); `tensorboard`: each newly trained run's scalars.
    """
    runs = plan_runs(config_files, budget, seeds, out, data_dir, overrides, single_task,
                     merges, two_stage)
    outcome = AblationOutcome(runs, {})
    todo = [r for r in runs if not r.finished]
    log.info("ablation: %d rows x %d seeds = %d runs (%d finished), budget %s, in %s",
             len(runs) // seeds, seeds, len(runs), len(runs) - len(todo), budget, out)
    for run in runs:
        if run.result_file.is_file() and not run.finished:
            log.info("%s was made by other code: training it again", run.run_dir)
        if run.finished:
            outcome.skipped.append(run)
            if report and run.trains and not (run.run_dir / "report.html").is_file():
                _extras(run.run_dir, report=True, tensorboard=False)
            continue
        log.info("[%d/%d] %s seed-%d (seed %d)", len(outcome.trained) + len(outcome.failed) + 1,
                 len(todo), run.name, run.seed_index, run.config.train.seed)
        waiting = [str(path) for path in run.needs if not finished_run(path)]
        if waiting:  # failed, or another process into the same --out is training it
            message = f"waits for {', '.join(waiting)} (not finished): run the command again"
            log.warning("%s %s", run.run_dir, message)
            outcome.failed.append((run, message))
            continue
        try:
            make = run_merged if run.merge_method else run_per_task if run.per_task else run_one
            make(run, budget)
        except Exception as error:  # noqa: BLE001 - one failed run must not stop the rest
            message = f"{type(error).__name__}: {error}"
            log.error("%s failed: %s", run.run_dir, message)
            if not isinstance(error, RunFolderError):  # not into another process's run
                run.run_dir.mkdir(parents=True, exist_ok=True)
                (run.run_dir / "error.txt").write_text(traceback.format_exc(),
                                                       encoding="utf-8")
            outcome.failed.append((run, message))
            continue
        outcome.trained.append(run)
        if run.trains:  # a merged or collected row has no training curves to report
            _extras(run.run_dir, report, tensorboard)
    for run in runs:
        if run.finished and run.part_of is None:
            outcome.results.setdefault(run.name, []).append(read_result(run))
    outcome.files = write_results(Path(out), outcome.results, budget=budget,
                                  failed=[f"{r.name}/seed-{r.seed_index}: {m}"
                                          for r, m in outcome.failed])
    return outcome


def _extras(run_dir: Path, report: bool, tensorboard: bool) -> None:
    from mtbert.experiments.report import TensorBoardUnavailable, write_report, write_tensorboard

    if report:
        log.info("report: %s", write_report(run_dir))
    if tensorboard:
        try:
            log.info("tensorboard: %s", write_tensorboard(run_dir))
        except TensorBoardUnavailable as error:
            log.warning("%s", error)


# ---------------------------------------------------------------- aggregation


@dataclass
class Column:
    task: str  # a task name, or "overall"
    header: str  # as in the reports: "SST Dev Acc"


def columns(results: dict[str, list[dict]]) -> list[Column]:
    """A column per task present in any result (first seen first; a task with several
    metrics has one per metric, then one for their mean, its score), then overall."""
    found: dict[str, dict] = {}
    for runs in results.values():
        for run in runs:
            for name, info in run["tasks"].items():
                found.setdefault(name, info)
    cols = []
    for name, info in found.items():
        metrics = [info["metric"]] if isinstance(info["metric"], str) else info["metric"]
        task = f"{display_name(name, info)} Dev"
        if len(metrics) > 1:
            cols += [Column(f"{name}/{m}", f"{task} {metric_name(m)}") for m in metrics]
            cols.append(Column(name, f"{task} mean"))
        else:
            cols.append(Column(name, f"{task} {metric_name(metrics[0])}"))
    return [*cols, Column("overall", "Overall Dev")]


def metric_name(metric: str) -> str:
    return METRICS[metric].short if metric in METRICS else metric


def display_name(task: str, info: dict) -> str:
    return DISPLAY_NAMES.get(task) or DISPLAY_NAMES.get(info.get("preset") or "") or task


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (ddof=1); std is None with fewer than 2 values."""
    array = np.asarray(values, dtype=np.float64)
    return float(array.mean()), (float(array.std(ddof=1)) if len(array) > 1 else None)


@dataclass
class Row:
    config: str
    seeds: int
    scores: dict[str, tuple[float, float | None]]  # column task -> (mean, std)
    wall_time_s: float
    train_time_s: float
    steps: float
    parameters: dict[str, int]
    backbone: str
    tasks: dict[str, dict]
    by_seed: dict[int, dict[str, float]] = field(default_factory=dict)  # seed index -> dev
    examples_seen: dict[str, float] = field(default_factory=dict)  # task -> mean over seeds
    single_task_of: str | None = None
    # seed index -> the loss back-propagated at each of the first steps (no-op detection)
    first_objectives: dict[int, list[float]] = field(default_factory=dict)
    # Filled by `compare`: differences from the baseline and from the single-task rows.
    vs_baseline: Interval | None = None
    delta_m: Interval | None = None
    task_gains: dict[str, Interval] = field(default_factory=dict)  # points vs single-task
    same_as_baseline: bool = False  # the same back-propagated losses, first steps, every seed
    identical_to_baseline: bool = False  # that, and every shared seed's dev scores too
    other_tasks: bool = False  # trains other tasks than the baseline: overall not comparable


@dataclass
class Interval:
    """A mean over seeds of a paired difference, with its 95% t-interval (NaN with 1 seed)."""

    mean: float
    low: float
    high: float
    seeds: int

    @property
    def tie(self) -> bool:
        """Within the seed noise: the interval holds 0 (or cannot be computed)."""
        return not self.low > 0 and not self.high < 0

    def format(self, scale: float = 1.0, digits: int = 3) -> str:
        text = f"{self.mean * scale:+.{digits}f}"
        if self.seeds < 2:
            return f"{text} (1 seed)"
        text += f" [{self.low * scale:+.{digits}f}, {self.high * scale:+.{digits}f}]"
        return f"{text} tie" if self.tie else text


def paired_interval(differences: Sequence[float]) -> Interval:
    """Mean of per-seed paired differences and its 95% Student-t interval over seeds."""
    values = np.asarray(differences, dtype=np.float64)
    mean = float(values.mean())
    if len(values) < 2:
        return Interval(mean, math.nan, math.nan, len(values))
    half = stats.t.ppf(0.975, len(values) - 1) * values.std(ddof=1) / math.sqrt(len(values))
    return Interval(mean, mean - half, mean + half, len(values))


def delta_m(scores: dict[str, float], single: dict[str, float]) -> float:
    """Δm (Maninis et al. 2019; Vandenhende et al. 2021): the mean over tasks of the relative
    gain over each task's single-task score, as a fraction. mtbert's metrics (accuracy,
    Pearson, Spearman) are all higher-is-better, so no sign is flipped. Undefined where a
    single-task score is 0 (CoLA's MCC when the model predicts one class): `compare` leaves
    such a row's Δm% out ("–") and shows each task's gain in points."""
    gains = [(scores[t] - single[t]) / abs(single[t]) for t in single]
    return float(np.mean(gains))


def aggregate(results: dict[str, list[dict]]) -> list[Row]:
    rules = {run.get("selection", "best overall dev score") for r in results.values() for run in r}
    if len(rules) > 1:
        raise AblationError(f"the runs select their scores by different rules ({sorted(rules)}):"
                            " runs made by older code; train them again")
    rows = []
    for name, runs in results.items():
        if not runs:
            continue
        scores = {}
        for task in {k for run in runs for k in run["dev"]}:
            values = [run["dev"][task] for run in runs if task in run["dev"]]
            scores[task] = mean_std(values)
        seen = [run.get("examples_seen", {}) for run in runs]
        rows.append(Row(
            config=name, seeds=len(runs), scores=scores,
            wall_time_s=float(np.mean([r["wall_time_s"] for r in runs])),
            train_time_s=float(np.mean([r.get("train_time_s", r["wall_time_s"]) for r in runs])),
            steps=float(np.mean([r["steps"] for r in runs])),
            parameters=runs[0]["parameters"], backbone=runs[0]["backbone"],
            tasks=runs[0]["tasks"],
            by_seed={run.get("seed_index", 0): run["dev"] for run in runs},
            examples_seen={t: float(np.mean([s.get(t, 0) for s in seen]))
                           for t in dict.fromkeys(t for s in seen for t in s)},
            single_task_of=runs[0].get("single_task_of"),
            first_objectives={run.get("seed_index", 0): [
                step["backward_loss"] for step in run.get("first_losses", [])
                if "backward_loss" in step] for run in runs}))
    compare(rows)
    return rows


def compare(rows: list[Row]) -> None:
    """Fill each row's differences: overall vs the baseline (the first multitask row) on the
    same seeds; Δm% and each task's gain vs the single-task rows, seed by seed."""
    multitask = [row for row in rows if row.single_task_of is None]
    if not multitask:
        return
    baseline = multitask[0]
    single = {task: row for row in rows if row.single_task_of for task in row.tasks}
    for row in multitask:
        seeds = sorted(row.by_seed.keys() & baseline.by_seed.keys())
        # Overall scores average over the tasks a config trains: comparable only when the
        # row trains the baseline's tasks (a one-task row is read by its task's gain).
        row.other_tasks = row.tasks.keys() != baseline.tasks.keys()
        if row is not baseline and seeds and not row.other_tasks:
            row.vs_baseline = paired_interval(
                [row.by_seed[k]["overall"] - baseline.by_seed[k]["overall"] for k in seeds])
            row.same_as_baseline = same_objectives(row, baseline, seeds)
            row.identical_to_baseline = row.same_as_baseline and all(
                row.by_seed[k] == baseline.by_seed[k] for k in seeds)
        tasks = [t for t in row.tasks if t in single]
        seeds = [k for k in sorted(row.by_seed)
                 if all(k in single[t].by_seed and t in row.by_seed[k] for t in tasks)]
        if not tasks or not seeds:
            continue
        reference = {k: {t: single[t].by_seed[k][t] for t in tasks} for k in seeds}
        if all(reference[k][t] != 0 for k in seeds for t in tasks):  # else Δm% is undefined
            row.delta_m = paired_interval(
                [delta_m({t: row.by_seed[k][t] for t in tasks}, reference[k]) for k in seeds])
        row.task_gains = {t: paired_interval([row.by_seed[k][t] - reference[k][t]
                                              for k in seeds]) for t in tasks}


def same_objectives(row: Row, baseline: Row, seeds: Sequence[int]) -> bool:
    """The row back-propagated the baseline's losses over its first steps on every seed
    (relative tolerance 1e-5, for non-deterministic GPU kernels): its technique changed
    nothing there, whatever else it logs."""
    pairs = [(row.first_objectives.get(k, []), baseline.first_objectives.get(k, []))
             for k in seeds]
    return bool(pairs) and all(ours and len(ours) == len(theirs)
                               and np.allclose(ours, theirs, rtol=1e-5, atol=0)
                               for ours, theirs in pairs)


def format_score(mean: float, std: float | None) -> str:
    if math.isnan(mean):
        return "–"
    return f"{mean:.3f}" if std is None else f"{mean:.3f} ± {std:.3f}"


def format_seconds(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def format_count(n: int) -> str:
    if n >= 1_000_000:
        return f"{n / 1e6:.1f}M"
    if n >= 10_000:
        return f"{n / 1e3:.0f}k"
    return f"{n:,}"


def needs_quora_note(rows: Sequence[Row]) -> bool:
    return any(row.backbone.lower() in DEFAULT_BACKBONES
               and any(name in QUORA_TASKS or info.get("preset") in QUORA_TASKS
                       for name, info in row.tasks.items())
               for row in rows)


def format_compute(steps: float, examples: dict[str, float]) -> str:
    """`steps / examples seen per task`, the compute both sides of a comparison got."""
    seen = " · ".join(f"{task} {format_count(round(n))}" for task, n in examples.items())
    return f"{steps:.0f}" + (f" / {seen}" if seen else "")


def plan_table(runs: Sequence[PlannedRun]) -> str:
    """What `ablate --plan` prints, training nothing: each row's optimizer steps / training
    examples per task (batches x batch size: an epoch's last batch may be short), mean over
    seeds; for single-task rows also what the rule before issue 39 gave them (the recipe's
    own epochs under the budget's step cap)."""
    lines = ["| Row | Steps / examples per task | Before: own epochs under the step cap |",
             "|---|---:|---:|"]
    rows: dict[str, list[PlannedRun]] = {}
    for run in runs:
        if run.trains:
            rows.setdefault(run.name, []).append(run)
    for name, group in rows.items():
        before = "same" if group[0].single_task_of is None else _mean_draws(
            [_unmatched(run, runs) for run in group])
        lines.append(f"| {name} | {_mean_draws([run.config for run in group])} | {before} |")
    merged = sorted({run.name for run in runs if run.merge_method})
    if merged:
        lines += ["", f"Merged rows ({', '.join(merged)}): the single-task runs' sum."]
    collected = sorted({run.name for run in runs if run.per_task})
    if collected:
        lines += ["", f"Two-stage rows ({', '.join(collected)}): the baseline's run plus its "
                      "fine-tunes (the rows named after them)."]
    return "\n".join(lines)


def _mean_draws(configs: Sequence[ExperimentConfig]) -> str:
    planned = []
    for config in configs:
        steps, batches = planned_draws(config, train_sizes(config))
        planned.append((steps, {t.name: batches[t.name] * (t.batch_size or config.train.batch_size)
                                for t in config.tasks}))
    return format_compute(float(np.mean([steps for steps, _ in planned])),
                          {t: float(np.mean([seen[t] for _, seen in planned]))
                           for t in planned[0][1]})


def _unmatched(run: PlannedRun, runs: Sequence[PlannedRun]) -> ExperimentConfig:
    """The single-task `run`'s config under the old rule: the baseline's recipe as it is."""
    baseline = next(r for r in runs if r.name == run.single_task_of
                    and r.seed_index == run.seed_index)
    return next(c for c in single_task_configs(baseline.config) if c.name == run.name)


def markdown_table(rows: Sequence[Row], cols: Sequence[Column]) -> str:
    baseline = next((row.config for row in rows if row.single_task_of is None), "baseline")
    header = ["Model configuration", *(c.header for c in cols),
              f"Δ overall vs {baseline} [95% CI]", "Δm% vs single-task [95% CI]",
              "Steps / examples seen", "Seeds", "Wall time / run",
              "Parameters (total / task-specific)"]
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    for row in rows:
        cells = [format_score(*row.scores[c.task]) if c.task in row.scores else "–"
                 for c in cols]
        params = (f"{format_count(row.parameters['total'])} / "
                  f"{format_count(row.parameters['task_specific'])}")
        name = row.config + (" ⚠ identical to the baseline" if row.identical_to_baseline
                             else " ⚠ same first-step losses as the baseline"
                             if row.same_as_baseline else "")
        versus = (row.vs_baseline.format() if row.vs_baseline
                  else "– (other tasks)" if row.other_tasks else "–")
        gain = row.delta_m.format(scale=100, digits=2) if row.delta_m else "–"
        lines.append("| " + " | ".join([name, *cells, versus, gain,
                                        format_compute(row.steps, row.examples_seen),
                                        str(row.seeds), format_seconds(row.wall_time_s),
                                        params]) + " |")
    return "\n".join(lines)


def gains_table(rows: Sequence[Row]) -> str:
    """Each multitask row's gain over the single-task rows, task by task, in points."""
    compared = [row for row in rows if row.task_gains]
    if not compared:
        return ""
    tasks = list(dict.fromkeys(t for row in compared for t in row.task_gains))
    lines = ["| Model configuration | " + " | ".join(f"{t} vs alone (points)" for t in tasks)
             + " |", "|---|" + "---:|" * len(tasks)]
    for row in compared:
        cells = [row.task_gains[t].format(scale=100, digits=2) if t in row.task_gains else "–"
                 for t in tasks]
        lines.append(f"| {row.config} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_results(out: Path, results: dict[str, list[dict]], budget: str = "",
                  failed: Sequence[str] = ()) -> dict[str, Path]:
    """`results.csv`, `results.md` and `results.png` in `out`; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    rows = aggregate(results)
    cols = columns(results)
    files = {"csv": out / "results.csv", "per_seed": out / "results-per-seed.csv",
             "md": out / "results.md", "png": out / "results.png"}
    _write_csv(files["csv"], rows, cols)
    _write_per_seed_csv(files["per_seed"], results, cols)
    codes = sorted({describe_code(run.get("code")) for named in results.values()
                    for run in named})
    files["md"].write_text(_markdown(rows, cols, budget, failed, codes), encoding="utf-8")
    _write_chart(files["png"], rows, cols)
    return files


def _write_csv(path: Path, rows: Sequence[Row], cols: Sequence[Column]) -> None:
    fields = ["config", "seeds", "single_task_of"]
    for col in cols:
        fields += [f"{col.task}_mean", f"{col.task}_std"]
    fields += ["overall_vs_baseline", "overall_vs_baseline_low", "overall_vs_baseline_high",
               "delta_m_percent", "delta_m_percent_low", "delta_m_percent_high",
               "same_first_losses_as_baseline", "identical_to_baseline",
               "other_tasks_than_baseline", "wall_time_s",
               "train_time_s", "steps"]
    fields += [f"examples_{task}" for task in dict.fromkeys(
        t for row in rows for t in row.examples_seen)]
    fields += [f"params_{key}" for key in dict.fromkeys(k for row in rows for k in row.parameters)]
    fields += ["backbone"]
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            record = {"config": row.config, "seeds": row.seeds,
                      "single_task_of": row.single_task_of or "",
                      "same_first_losses_as_baseline": row.same_as_baseline,
                      "identical_to_baseline": row.identical_to_baseline,
                      "other_tasks_than_baseline": row.other_tasks,
                      "wall_time_s": round(row.wall_time_s, 2),
                      "train_time_s": round(row.train_time_s, 2), "steps": row.steps,
                      "backbone": row.backbone,
                      **{f"examples_{task}": round(n) for task, n in row.examples_seen.items()},
                      **{f"params_{key}": n for key, n in row.parameters.items()}}
            for col in cols:
                mean, std = row.scores.get(col.task, (None, None))
                record[f"{col.task}_mean"] = "" if mean is None else round(mean, 6)
                record[f"{col.task}_std"] = "" if std is None else round(std, 6)
            for key, interval, scale in (("overall_vs_baseline", row.vs_baseline, 1),
                                         ("delta_m_percent", row.delta_m, 100)):
                if interval is not None:
                    record[key] = round(interval.mean * scale, 6)
                    record[f"{key}_low"] = round(interval.low * scale, 6)
                    record[f"{key}_high"] = round(interval.high * scale, 6)
            writer.writerow(record)


def _write_per_seed_csv(path: Path, results: dict[str, list[dict]],
                        cols: Sequence[Column]) -> None:
    """One line per run: what each table cell is the mean of, and the code that made it."""
    runs = [run for named in results.values() for run in named]
    tasks = list(dict.fromkeys(t for run in runs for t in run.get("examples_seen", {})))
    fields = ["config", "seed_index", "seed", "selection", "steps",
              *(f"examples_{t}" for t in tasks), *(f"{c.task}" for c in cols),
              "train_time_s", "precision", "commit", "dirty", "source", "torch"]
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields, restval="")
        writer.writeheader()
        for run in runs:
            seen = run.get("examples_seen", {})
            writer.writerow({
                "config": run["config"], "seed_index": run.get("seed_index", 0),
                "seed": run.get("seed", ""), "selection": run.get("selection", ""),
                "steps": run["steps"], **{f"examples_{t}": n for t, n in seen.items()},
                **{c.task: round(run["dev"][c.task], 6) for c in cols if c.task in run["dev"]},
                "train_time_s": run.get("train_time_s", ""),
                "precision": run.get("precision", ""), **run.get("code", {})})


def describe_code(code: dict | None) -> str:
    """`commit 0123abc (uncommitted changes), torch 2.5.1` from a result's `code`."""
    if not code:
        return "code not recorded"
    commit = f"commit {code['commit'][:7]}" if code.get("commit") else f"source {code['source']}"
    return commit + (" (uncommitted changes)" if code.get("dirty") else "") + (
        f", torch {code['torch']}")


def _markdown(rows: Sequence[Row], cols: Sequence[Column], budget: str,
              failed: Sequence[str], codes: Sequence[str] = ()) -> str:
    seeds = sorted({row.seeds for row in rows})
    lines = ["# Ablation results", ""]
    if budget:
        from mtbert.experiments.budgets import describe
        lines += [f"Budget: {describe(budget)}.", ""]
    lines += [f"Seeds per config: {', '.join(map(str, seeds)) or '–'}. "
              f"Total wall time: {format_seconds(sum(r.wall_time_s * r.seeds for r in rows))}.",
              "", "Selection, the same for every row: each run's dev scores at its last step. "
              f"Trained by {'; '.join(codes) or '–'}.", "", markdown_table(rows, cols), "",
              STD_NOTE, "", COMPARISON_NOTE]
    gains = gains_table(rows)
    if gains:
        lines += ["", "Each task's score minus the same task trained alone (same recipe, "
                      "budget and seeds), in points, with its 95% interval over seeds:", "",
                  gains]
    if any(row.same_as_baseline for row in rows):
        lines += ["", "⚠ same first-step losses: on every seed the loss the row "
                      f"back-propagated at each of its first {FIRST_LOSSES_STEPS} steps equals "
                      "the baseline's (whatever else it logs), so the technique did "
                      "not act in those steps; it may act later (DWA keeps equal weights "
                      "until two epochs have ended), and then its dev scores differ. "
                      "⚠ identical: those losses and every seed's dev scores equal the "
                      "baseline's: the technique did not act at all."]
    if needs_quora_note(rows):
        lines += ["", QUORA_NOTE]
    if failed:
        lines += ["", "Failed runs (not in the table; re-run the command to retry them):", ""]
        lines += [f"- {message}" for message in failed]
    return "\n".join(lines) + "\n"


def _write_chart(path: Path, rows: Sequence[Row], cols: Sequence[Column]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6.0, 0.25 * len(rows) * len(cols) + 2), 4.8))
    width = 0.8 / max(1, len(cols))
    x = np.arange(len(rows))
    low = 0.0
    for i, col in enumerate(cols):
        means = [row.scores.get(col.task, (math.nan, None))[0] for row in rows]
        stds = [row.scores.get(col.task, (math.nan, None))[1] or 0.0 for row in rows]
        ax.bar(x + (i - (len(cols) - 1) / 2) * width, means, width, yerr=stds, capsize=2,
               label=col.header)
        finite = [m for m in means if not math.isnan(m)]
        low = min([low, *finite])
    ax.set_xticks(x, [row.config for row in rows], rotation=30 if len(rows) > 3 else 0,
                  ha="right" if len(rows) > 3 else "center", fontsize=8)
    ax.set_ylim(low - 0.05 if low < 0 else 0.0, 1.15)  # room for the legend
    ax.set_ylabel("dev score")
    ax.set_title("Dev scores per configuration (mean ± std over seeds)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, ncols=min(4, len(cols)), loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
