"""Which tasks help which: the measured transfer matrix, TAG's one-run estimate of it, and task
groups chosen from either (`mtbert affinity CONFIG`).

**Measured.** For the tasks of CONFIG, `run_affinity` writes one config per pair of tasks
(`OUT/configs/A.B.yaml`: CONFIG's recipe with those two tasks) and runs them through the
ablation harness (`ablation.run_ablation`, `--single-task`) beside CONFIG itself, whose tasks
also train alone. So every pair, every task alone and all tasks together train under the same
budget rule (`budgets.py`), seeds and selection as any ablation table, and the gain of target
t from source s is the pair row's gain on t over t alone: the harness's per-task gain, a mean
over seeds with its 95% Student-t interval (`ablation.paired_interval`). A pair trained
together serves both directions: (s -> t) reads its t column, (t -> s) its s column. Each
pair takes the optimizer steps CONFIG takes under the budget, past its own epochs if need be
(`budgets.match_steps`; a pair's epoch is its larger task's): under round robin each of its
tasks draws CONFIG's batches of it, as the single-task rows do (`budgets.match_draws`), so
with the same seed pair, all tasks and alone see the same examples of t. A cell is marked †
should the pair still have drawn another number of t's examples than t alone.

**Estimated.** CONFIG's all-tasks row trains with `train.affinity_every` (default 10): TAG's
look-ahead affinity Z_{s->t} (Fifty et al. 2021; `mtbert/lookahead.py`), averaged over the
run and read from the last record of its `metrics.jsonl`, mean over seeds. Beside the two
matrices: Spearman's rank correlation between them over the ordered pairs, and the cost ratio
(wall time of all the pair and single-task runs the matrix took, over all seeds, against one
estimating run, mean over seeds).

**Groups.** `best_partition`: TAG's selection for few tasks, exhaustively: the partition of
the tasks into k groups that maximises the total affinity onto each task from the other
members of its group (the mean over them; a task alone gets 0, which is also its measured
gain over itself). Groups are chosen from each matrix; every chosen group of two or more
tasks that is not already a row trains too (3 seeds, same budget), and the report says for
each target whether its group beats all tasks together and the task alone.

Files in OUT: the harness's `results.md/.csv/.png` (every row), `affinity.md` (command,
budget, wall time, both matrices, correlation, cost, groups), `affinity-measured.png` and
`affinity-estimate.png` (heat maps, source rows x target columns), `affinity.json`.
"""

from __future__ import annotations

import copy
import itertools
import json
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import stats

from mtbert.config import ConfigError, ExperimentConfig, dump_config, load_config, validate
from mtbert.experiments.ablation import (
    Interval,
    Row,
    aggregate,
    config_name,
    format_seconds,
    paired_interval,
    run_ablation,
    train_sizes,
)
from mtbert.experiments.budgets import (
    budget_max_steps,
    describe,
    get_budget,
    match_steps,
    planned_draws,
)
from mtbert.experiments.report import read_metrics

MAX_PARTITION_TASKS = 12  # Bell(12) = 4.2M partitions; more tasks need TAG's heuristics
CONFIGS = "configs"
Matrix = dict[str, dict[str, float]]  # source -> target -> value


def subset_name(tasks: Sequence[str]) -> str:
    return ".".join(tasks)


def subset_config(config: ExperimentConfig, tasks: Sequence[str]) -> ExperimentConfig:
    """`config`'s recipe on `tasks` only (in `config`'s task order), without the look-ahead."""
    subset = copy.deepcopy(config)
    subset.name = subset_name([t.name for t in config.tasks if t.name in tasks])
    subset.tasks = [t for t in subset.tasks if t.name in tasks]
    subset.distill.teachers = {t: v for t, v in subset.distill.teachers.items() if t in tasks}
    subset.train.affinity_every = None
    validate(subset)
    return subset


def write_config(config: ExperimentConfig, folder: Path, origin: Path) -> Path:
    """A resolved config as a file the harness (and a user) can train from."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{config.name}.yaml"
    dump_config(config, path)
    path.write_text(f"# mtbert affinity: the recipe of {origin}, tasks "
                    f"{', '.join(t.name for t in config.tasks)}\n"
                    + path.read_text(encoding="utf-8"), encoding="utf-8")
    return path


def plan_configs(config_file: str | Path, out: Path, data_dir: str | None = None,
                 overrides: Sequence[str] = (), affinity_every: int = 10,
                 groups: Sequence[Sequence[str]] = (), budget: str = "small") -> list[Path]:
    """Config files of the rows: CONFIG with the look-ahead (the baseline, first), each pair,
    then each of `groups` that is not already a row. Each pair or group takes the optimizer
    steps the baseline takes under `budget` (round robin: each of its tasks draws the
    baseline's batches of it, as the single-task rows do; `budgets.match_steps`)."""
    config_file = Path(config_file)
    look_ahead = [*overrides, f"train.affinity_every={affinity_every}"]
    base = load_config(config_file, look_ahead, data_dir)
    base.name = config_name(config_file, overrides, base)
    tasks = [t.name for t in base.tasks]
    if len(tasks) < 2:
        raise ConfigError(f"{config_file}: affinity needs two or more tasks, got {tasks}")
    spec = get_budget(budget)
    budgeted = load_config(config_file, [*spec.overrides, *look_ahead], data_dir)
    cap = budget_max_steps(spec, budgeted)
    budgeted.train.max_steps = cap
    sizes = train_sizes(budgeted)
    steps, _ = planned_draws(budgeted, sizes)
    folder = out / CONFIGS
    files = [write_config(base, folder, config_file)]
    # Two tasks: the pair is CONFIG itself.
    subsets = [set(pair) for pair in itertools.combinations(tasks, 2) if len(tasks) > 2]
    for group in groups:
        if 1 < len(group) < len(tasks) and set(group) not in subsets:
            subsets.append(set(group))
    for subset in subsets:
        matched = subset_config(budgeted, subset)
        match_steps(matched, {t: sizes[t] for t in subset}, steps)
        config = subset_config(base, subset)
        config.train.max_steps, config.train.epochs = steps, matched.train.epochs
        files.append(write_config(config, folder, config_file))
    return files


# ---------------------------------------------------------------- grouping


def partitions(items: Sequence[str], k: int) -> Iterator[list[list[str]]]:
    """Every partition of `items` into exactly `k` non-empty groups (order kept in each)."""
    if k < 1 or k > len(items):
        return
    if k == len(items):
        yield [[item] for item in items]
        return
    if k == 1:
        yield [list(items)]
        return
    first, rest = items[0], items[1:]
    for partition in partitions(rest, k - 1):
        yield [[first], *partition]
    for partition in partitions(rest, k):
        for i in range(len(partition)):
            yield [group if j != i else [first, *group] for j, group in enumerate(partition)]


def group_score(groups: Sequence[Sequence[str]], affinity: Matrix) -> float:
    """Sum over tasks of the mean affinity onto each task from the others of its group."""
    total = 0.0
    for group in groups:
        for target in group:
            sources = [s for s in group if s != target]
            if sources:
                total += float(np.mean([affinity[s][target] for s in sources]))
    return total


def best_partition(tasks: Sequence[str], affinity: Matrix, k: int) -> list[list[str]]:
    """The partition of `tasks` into `k` groups of highest `group_score` (the first found
    on ties), searched exhaustively."""
    if not 1 <= k <= len(tasks):
        raise ConfigError(f"--groups: between 1 and the {len(tasks)} tasks, got {k}")
    if len(tasks) > MAX_PARTITION_TASKS:
        raise ConfigError(f"grouping searches every partition, which is feasible up to "
                          f"{MAX_PARTITION_TASKS} tasks; got {len(tasks)}")
    return max(partitions(list(tasks), k), key=lambda groups: group_score(groups, affinity))


# ---------------------------------------------------------------- reading the runs


@dataclass
class AffinityResult:
    tasks: list[str]
    measured: dict[str, dict[str, Interval]]  # source -> target -> gain over alone
    unequal: set[tuple[str, str]]  # (source, target): other examples of target than alone
    estimate: Matrix  # source -> target -> mean Z (TAG)
    rank_correlation: float
    correlation_p: float
    estimate_seconds: float  # one estimating run, mean over seeds
    matrix_seconds: float  # every pair and single-task run, all seeds
    groups: dict[str, list[list[str]]] = field(default_factory=dict)  # by -> partition

    def measured_means(self) -> Matrix:
        return {s: {t: v.mean for t, v in row.items()} for s, row in self.measured.items()}


def rows_by_tasks(rows: Sequence[Row]) -> dict[frozenset, Row]:
    """Multitask rows by their task set; single-task rows by their one task."""
    return {frozenset(row.tasks): row for row in rows
            if row.single_task_of or len(row.tasks) > 1}


def estimated_affinity(run_dirs: Sequence[Path]) -> Matrix:
    """TAG's mean Z of each run (its last metrics record), averaged over the runs."""
    found = [record["affinity"] for run in run_dirs
             if (records := read_metrics(run)) and "affinity" in (record := records[-1])]
    if not found:
        return {}
    return {s: {t: float(np.mean([f[s][t] for f in found])) for t in found[0][s]}
            for s in found[0]}


def read_affinity(rows: Sequence[Row], baseline: str, run_dirs: Sequence[Path],
                  results: dict[str, list[dict]]) -> AffinityResult:
    by_tasks = rows_by_tasks(rows)
    tasks = list(next(row for row in rows if row.config == baseline).tasks)
    measured: dict[str, dict[str, Interval]] = {}
    unequal = set()
    for source, target in itertools.permutations(tasks, 2):
        pair, alone = by_tasks.get(frozenset((source, target))), by_tasks.get(frozenset([target]))
        if pair is None or alone is None or target not in pair.task_gains:
            continue
        measured.setdefault(source, {})[target] = pair.task_gains[target]
        if pair.examples_seen.get(target) != alone.examples_seen.get(target):
            unequal.add((source, target))
    estimate = estimated_affinity(run_dirs)
    ordered = [(s, t) for s, t in itertools.permutations(tasks, 2)
               if t in measured.get(s, {}) and t in estimate.get(s, {})]
    rho = p = math.nan
    if len(ordered) >= 3:
        rho, p = stats.spearmanr([estimate[s][t] for s, t in ordered],
                                 [measured[s][t].mean for s, t in ordered])
    matrix_rows = [row for key, row in by_tasks.items() if len(key) <= 2]
    matrix_seconds = sum(run["wall_time_s"] for row in matrix_rows
                         for run in results.get(row.config, []))
    estimate_seconds = float(np.mean([r["wall_time_s"] for r in results.get(baseline, [])]
                                     or [math.nan]))
    return AffinityResult(tasks, measured, unequal, estimate, float(rho), float(p),
                          estimate_seconds, matrix_seconds)


# ---------------------------------------------------------------- the command


@dataclass
class AffinityOutcome:
    result: AffinityResult
    rows: list[Row]
    files: dict[str, Path]
    failed: list[str]


def run_affinity(config_file: str | Path, budget: str = "small", seeds: int = 3,
                 out: str | Path = "runs/affinity", data_dir: str | None = None,
                 overrides: Sequence[str] = (), affinity_every: int = 10, groups: int = 2,
                 report: bool = True, command: str = "") -> AffinityOutcome:
    """Train (or resume) every row, choose groups from both matrices, train the groups, and
    write the files of the module docstring."""
    out = Path(out)
    start = time.perf_counter()

    def ablate(chosen: Sequence[Sequence[str]] = ()):
        files = plan_configs(config_file, out, data_dir, overrides, affinity_every, chosen,
                             budget)
        outcome = run_ablation(files, budget, seeds, out, data_dir, report=report,
                               single_task=True)
        return files[0].stem, outcome

    baseline, outcome = ablate()
    rows = aggregate(outcome.results)
    base_dirs = [run.run_dir for run in outcome.runs if run.name == baseline and run.finished]
    result = read_affinity(rows, baseline, base_dirs, outcome.results)
    for by, matrix in (("measured", result.measured_means()), ("estimate", result.estimate)):
        if all(t in matrix.get(s, {}) for s, t in itertools.permutations(result.tasks, 2)):
            result.groups[by] = best_partition(result.tasks, matrix, min(groups,
                                                                         len(result.tasks)))
    chosen = [group for partition in result.groups.values() for group in partition]
    if chosen:
        baseline, outcome = ablate(chosen)
        rows = aggregate(outcome.results)
    failed = [f"{run.name}/seed-{run.seed_index}: {message}" for run, message in outcome.failed]
    files = write_affinity(out, result, rows, baseline, budget, seeds,
                           time.perf_counter() - start, command, failed)
    return AffinityOutcome(result, rows, files, failed)


# ---------------------------------------------------------------- writing


def group_verdicts(result: AffinityResult, rows: Sequence[Row], baseline: str,
                   partition: Sequence[Sequence[str]]) -> list[list[str]]:
    """Per target: its group, the group's gain over alone and over all tasks, and all tasks'
    gain over alone (points, 95% intervals over seeds)."""
    by_tasks = rows_by_tasks(rows)
    everything = next(row for row in rows if row.config == baseline)
    lines = []
    for group in partition:
        for target in group:
            row = by_tasks.get(frozenset(group))
            alone = by_tasks.get(frozenset([target]))
            if row is None or alone is None:
                lines.append([target, "+".join(group), "not trained", "–", "–"])
                continue
            seeds = sorted(row.by_seed.keys() & everything.by_seed.keys())
            vs_all = paired_interval([row.by_seed[k][target] - everything.by_seed[k][target]
                                      for k in seeds]) if seeds else None
            vs_alone = row.task_gains.get(target) if len(group) > 1 else None
            lines.append([target, "+".join(group),
                          vs_alone.format(100, 2) if vs_alone else "0 (the group is alone)",
                          vs_all.format(100, 2) if vs_all else "–",
                          everything.task_gains[target].format(100, 2)
                          if target in everything.task_gains else "–"])
    return lines


def markdown_matrix(tasks: Sequence[str], cell) -> str:
    lines = ["| source \\ target | " + " | ".join(tasks) + " |",
             "|---|" + "---:|" * len(tasks)]
    for source in tasks:
        lines.append(f"| {source} | " + " | ".join(
            "—" if source == target else cell(source, target) for target in tasks) + " |")
    return "\n".join(lines)


def write_affinity(out: Path, result: AffinityResult, rows: Sequence[Row], baseline: str,
                   budget: str, seeds: int, seconds: float, command: str,
                   failed: Sequence[str] = ()) -> dict[str, Path]:
    files = {"md": out / "affinity.md", "json": out / "affinity.json",
             "measured": out / "affinity-measured.png", "estimate": out / "affinity-estimate.png"}
    tasks = result.tasks
    measured = result.measured_means()

    def measured_cell(s, t):
        if t not in result.measured.get(s, {}):
            return "–"
        return result.measured[s][t].format(100, 2) + (" †" if (s, t) in result.unequal else "")

    def estimate_cell(s, t):
        return f"{result.estimate[s][t]:+.2e}" if t in result.estimate.get(s, {}) else "–"

    lines = [f"<!-- {command} -->" if command else "", "# Which tasks help which", "",
             f"Budget: {describe(budget)}. Seeds: {seeds}. Wall time of the command: "
             f"{format_seconds(seconds)} (finished runs are reused, not retrained).", "",
             "## Measured transfer", "",
             "Gain of the target (column) when trained with the source (row), over the target "
             "alone: points of its dev metric, mean over seeds with the 95% interval "
             "(`tie`: the interval holds 0).", "", markdown_matrix(tasks, measured_cell), ""]
    if result.unequal:
        lines += ["† the pair drew another number of the target's training examples than the "
                  "target alone (see `results.md`, column steps / examples seen): the cell "
                  "mixes transfer with a difference in compute.", ""]
    lines += ["## One-run estimate (TAG look-ahead)", "",
              f"Z(source → target) = 1 − L_target(encoder after a step on the source) / "
              f"L_target(before), averaged over the all-tasks run `{baseline}` (every "
              "`train.affinity_every` steps), mean over seeds.", "",
              markdown_matrix(tasks, estimate_cell), "",
              f"Spearman rank correlation of the estimate with the measured gains over the "
              f"{len(tasks) * (len(tasks) - 1)} ordered pairs: ρ = {result.rank_correlation:.2f}"
              f" (p = {result.correlation_p:.3f}). Cost: the measured matrix's runs (pairs and "
              f"single-task, all seeds) took {format_seconds(result.matrix_seconds)}; one "
              f"estimating run {format_seconds(result.estimate_seconds)} (ratio "
              f"{result.matrix_seconds / result.estimate_seconds:.1f}x).", ""]
    for by, partition in result.groups.items():
        lines += [f"## Groups chosen from the {by} matrix", "",
                  "Groups: " + "; ".join("{" + ", ".join(g) + "}" for g in partition) + ". "
                  "Gains in points, 95% intervals over seeds.", "",
                  "| target | group | group vs alone | group vs all tasks | all tasks vs alone |",
                  "|---|---|---:|---:|---:|"]
        lines += ["| " + " | ".join(line) + " |"
                  for line in group_verdicts(result, rows, baseline, partition)]
        lines.append("")
    if failed:
        lines += ["Failed runs (re-run the command to retry them):", ""]
        lines += [f"- {message}" for message in failed]
    files["md"].write_text("\n".join(lines).lstrip("\n") + "\n", encoding="utf-8")
    files["json"].write_text(json.dumps({
        "tasks": tasks, "measured": measured, "estimate": result.estimate,
        "spearman": result.rank_correlation, "groups": result.groups,
        "matrix_seconds": result.matrix_seconds, "estimate_seconds": result.estimate_seconds,
    }, indent=1), encoding="utf-8")
    heat_map(files["measured"], tasks, measured, "measured gain over alone (points)", 100)
    heat_map(files["estimate"], tasks, result.estimate, "TAG look-ahead affinity Z")
    return files


def heat_map(path: Path, tasks: Sequence[str], matrix: Matrix, title: str,
             scale: float = 1.0) -> None:
    """Source rows x target columns, diverging colours centred on 0, values written in."""
    from mtbert.experiments.report import _pyplot, _save

    values = np.array([[matrix.get(s, {}).get(t, math.nan) * scale if s != t else math.nan
                        for t in tasks] for s in tasks])
    limit = np.nanmax(np.abs(values)) if np.isfinite(values).any() else 1.0
    plt = _pyplot()
    size = 2.5 + 0.8 * len(tasks)
    fig, ax = plt.subplots(figsize=(size + 1.2, size))
    image = ax.imshow(values, cmap="RdBu", vmin=-limit, vmax=limit)
    for i, j in itertools.product(range(len(tasks)), repeat=2):
        if np.isfinite(values[i, j]):
            ax.text(j, i, f"{values[i, j]:.2g}", ha="center", va="center", fontsize=8,
                    color="white" if abs(values[i, j]) > 0.6 * limit else "black")
    ax.set_xticks(range(len(tasks)), tasks, rotation=45, ha="right")
    ax.set_yticks(range(len(tasks)), tasks)
    ax.set_xlabel("target")
    ax.set_ylabel("source")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, fraction=0.046)
    _save(fig, path)
