"""The GLUE anchor: Hugging Face single-task models, one per task, as `run_glue` trains them.

    python benchmarks/bench_glue_hf.py [--tasks cola mrpc rte stsb] [--seeds 1 2 3]
        [--data-dir ../shared/data/glue] [--backbone all-minilm-l6-v2] [--out DIR]
        [--max-steps N] [--limit N] [--beside ABLATION_OUT]

Per task and seed: `AutoModelForSequenceClassification` on the backbone mtbert fine-tunes
(all-MiniLM-L6-v2 by default), sentence pairs cross-encoded ([CLS] a [SEP] b [SEP]); STS-B a
regression on the raw 0-5 score (one output, MSE), the others cross entropy. As
transformers' `examples/pytorch/text-classification/run_glue.py` runs with its README's
flags (`--max_seq_length 128 --per_device_train_batch_size 32 --learning_rate 2e-5
--num_train_epochs 3`) and the Trainer's defaults: `set_seed(seed)` before the model is
built, random batches of 32 reshuffled every epoch, AdamW (weight decay 0, eps 1e-8), linear
decay from 2e-5 to 0 without warm-up, gradient norm clipped at 1.0, fp32, and the model after
the last step scored on the dev set (no checkpoint selection). Batches are padded to their
longest input rather than to 128 tokens: the same outputs, faster.

The train and dev files are mtbert's (`../shared/data/glue`, read by its presets) and the
scores its metrics (`mtbert.metrics`), so the table sits beside `mtbert ablate`'s. A row "majority
class" scores each classification task's most frequent training label (GLUE's baselines
predict it for WNLI). Each (task, seed) result is kept in OUT/results.json as soon as it is
known, so an interrupted run resumes; `--max-steps` and `--limit` (examples per split) are for
smoke tests.

`--beside ABLATION_OUT` (an `mtbert ablate --single-task` output folder, e.g. of
`configs/glue/small-tasks.yaml`, with technique rows or not) adds the goal table: per task,
each of the ablation's multitask models against its mtbert single-task rows (paired by seed,
as the ablation's own table) and against these models (independent seeds: Welch's 95%
interval), in points, and the GLUE score of each.
"""

from __future__ import annotations

import argparse
import csv
import math
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
from bench_accuracy import hf_inputs
from bench_train import markdown_table
from scipy import stats
from tqdm.auto import tqdm

from mtbert.checkpoint import load_json, write_json_atomically
from mtbert.config import TaskConfig
from mtbert.data.tasks import read_split
from mtbert.evaluation import overall_score, score_columns, task_scores
from mtbert.experiments.ablation import Interval, display_name, metric_name, paired_interval
from mtbert.model.loading import resolve_checkpoint
from mtbert.presets import PRESETS

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "glue"
GLUE_TASKS = ("cola", "mrpc", "rte", "stsb", "wnli", "sst2")
EVAL_BATCH = 128


def examples(name: str, data_dir: Path, limit: int | None):
    task = TaskConfig(name=name, **PRESETS[name])
    return task, read_split(task, "train", data_dir)[:limit], read_split(task, "dev",
                                                                          data_dir)[:limit]


def train_task(name: str, seed: int, folder: Path, args) -> dict:
    """Fine-tune one model as run_glue does; the last step's dev metrics."""
    import transformers

    transformers.logging.set_verbosity_error()
    task, train, dev = examples(name, args.data_dir, args.limit)
    transformers.set_seed(seed)
    regression = task.kind == "regression"
    model = transformers.AutoModelForSequenceClassification.from_pretrained(
        folder, num_labels=1 if regression else task.num_classes)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0, eps=1e-8)
    total = args.epochs * math.ceil(len(train) / args.batch_size)
    total = min(total, args.max_steps or total)
    scheduler = transformers.get_linear_schedule_with_warmup(optimizer, 0, total)
    generator = torch.Generator().manual_seed(seed)
    start, step = time.perf_counter(), 0
    model.train()
    with tqdm(total=total, desc=f"HF {name} seed {seed}", file=sys.stderr) as bar:
        while step < total:
            for rows in torch.randperm(len(train), generator=generator).split(args.batch_size):
                batch = [train[i] for i in rows.tolist()]
                labels = torch.tensor([e.label for e in batch])
                out = model(**hf_inputs(tokenizer, batch, args.max_length),
                            labels=labels.float() if regression else labels.long())
                out.loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                bar.update()
                if step == total:
                    break
    seconds = time.perf_counter() - start
    predictions = predict(model, tokenizer, dev, regression, args.max_length)
    labels = np.array([e.label for e in dev], dtype=float)
    return {"scores": task_scores(task, predictions, labels), "steps": total,
            "train_s": round(seconds, 1), "train_examples": len(train), "dev_examples": len(dev)}


@torch.inference_mode()
def predict(model, tokenizer, dev, regression: bool, max_length: int) -> np.ndarray:
    model.eval()
    predictions = np.empty(len(dev))
    for begin in range(0, len(dev), EVAL_BATCH):
        rows = range(begin, min(begin + EVAL_BATCH, len(dev)))
        logits = model(**hf_inputs(tokenizer, [dev[i] for i in rows], max_length)).logits
        predictions[begin:rows.stop] = (logits[:, 0] if regression else logits.argmax(-1)).numpy()
    return predictions


def majority_class(name: str, args) -> dict[str, float] | None:
    """The scores of predicting the most frequent training label (None: regression)."""
    task, train, dev = examples(name, args.data_dir, args.limit)
    if task.kind == "regression":
        return None
    values, counts = np.unique([e.label for e in train], return_counts=True)
    labels = np.array([e.label for e in dev], dtype=float)
    return task_scores(task, np.full(len(dev), values[counts.argmax()]), labels)


def table(results: dict, args, command: str) -> str:
    """A row per task: each metric and the task's score, mean ± std over seeds; then the GLUE
    score (the mean of the task scores; WNLI left out, as the goal counts it)."""
    tasks = {name: TaskConfig(name=name, **PRESETS[name]) for name in args.tasks}
    rows = []
    for name, task in tasks.items():
        runs = [results[f"{name}/{seed}"] for seed in args.seeds]
        cells = [f"{metric_name(m)} "
                 f"{mean_std([r['scores'].get(f'{name}/{m}', r['scores'][name]) for r in runs])}"
                 for m in task.metrics]
        majority = majority_class(name, args)
        rows.append([display_name(name, {}), "; ".join(cells),
                     mean_std([r["scores"][name] for r in runs]),
                     "–" if majority is None else f"{majority[name] * 100:.1f}",
                     f"{np.mean([r['train_s'] for r in runs]) / 60:.1f} min",
                     f"{runs[0]['train_examples']:,} / {runs[0]['dev_examples']:,}"])
    scored = [name for name in tasks if name != "wnli"]
    glue = [glue_score(scored, {n: results[f"{n}/{seed}"]["scores"][n] for n in scored})
            for seed in args.seeds]
    rows.append([f"GLUE score ({', '.join(display_name(n, {}) for n in scored)})", "",
                 mean_std(glue), "", "", ""])
    header = ["task", "metrics (×100, mean ± std over seeds)", "task score",
              "majority class", "training wall time / seed", "train / dev examples"]
    what = ", ".join(f"{display_name(n, {})} {w}" for n, w in score_columns(tasks)
                     if "/" not in n)
    return (f"`{command}`\n\nHugging Face AutoModelForSequenceClassification per task, as "
            f"run_glue: {args.epochs} epochs, batch {args.batch_size}, lr {args.lr:g}, max "
            f"length {args.max_length}, last step; backbone `{args.backbone}`; seeds "
            f"{', '.join(map(str, args.seeds))}. Task scores: {what}.\n\n"
            + markdown_table(header, rows))


def welch_interval(a: list[float], b: list[float]) -> Interval:
    """mean(a) - mean(b) for independent samples (seeds not shared between the two sides) and
    its 95% Welch t interval (Welch 1947: each side's own variance, Welch-Satterthwaite df)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    mean = float(a.mean() - b.mean())
    if min(len(a), len(b)) < 2:
        return Interval(mean, math.nan, math.nan, min(len(a), len(b)))
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    if va + vb == 0:
        return Interval(mean, mean, mean, min(len(a), len(b)))
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    half = float(stats.t.ppf(0.975, df) * math.sqrt(va + vb))
    return Interval(mean, mean - half, mean + half, min(len(a), len(b)))


def ablation_scores(folder: Path) -> tuple[dict[str, dict[str, dict[int, float]]],
                                            dict[str, dict[int, float]]]:
    """From an `mtbert ablate --single-task` folder: each multitask row's per-seed scores
    ({config: {task or "overall": {seed_index: score}}}, in the table's order) and each task's
    single-task scores ({task: {seed_index: score}}). A single-task row's task is the one task
    it scores (tasks: the per-seed CSV's `examples_TASK` columns)."""
    summary = list(csv.DictReader((folder / "results.csv").open(encoding="utf-8")))
    per_seed = list(csv.DictReader((folder / "results-per-seed.csv").open(encoding="utf-8")))
    single = {row["config"] for row in summary if row["single_task_of"]}
    task_columns = [key.removeprefix("examples_") for key in (per_seed[0] if per_seed else {})
                    if key.startswith("examples_")]
    joint: dict[str, dict[str, dict[int, float]]] = {
        row["config"]: {} for row in summary if not row["single_task_of"]}
    alone: dict[str, dict[int, float]] = {}
    for row in per_seed:
        seed = int(row["seed_index"])
        scored = {key: float(row[key]) for key in [*task_columns, "overall"] if row.get(key)}
        if row["config"] in single:
            (task,) = (key for key in scored if key != "overall")
            alone.setdefault(task, {})[seed] = scored[task]
        elif row["config"] in joint:
            for key, value in scored.items():
                joint[row["config"]].setdefault(key, {})[seed] = value
    return joint, alone


def glue_score(tasks: list[str], scores: dict[str, float]) -> float:
    """The GLUE score of these task scores (their mean), as `mtbert` computes it."""
    return overall_score({name: TaskConfig(name=name, **PRESETS[name]) for name in tasks},
                         scores, how="mean")


def beside_table(results: dict, args, folder: Path) -> str:
    """The goal table: each multitask row of the ablation (its baseline first, then each
    technique) against mtbert's and these single-task models, per task and on the GLUE score,
    in points (x100)."""
    joint, alone = ablation_scores(folder)
    tasks = [name for name in alone if name in args.tasks]
    missing = sorted(set(alone) - set(args.tasks))
    if missing:
        sys.exit(f"{folder} trains {', '.join(missing)}, which --tasks leaves out")
    hf = {t: [results[f"{t}/{s}"]["scores"][t] for s in args.seeds] for t in tasks}
    hf["overall"] = [glue_score(tasks, {t: hf[t][i] for t in tasks})
                     for i in range(len(args.seeds))]
    rows, seed_counts = [], set()
    for config, scores in joint.items():
        seeds = sorted(set.intersection(*(set(alone[t]) for t in tasks),
                                        *(set(scores.get(t, {})) for t in tasks)))
        if not seeds:
            continue
        seed_counts.add(len(seeds))
        mine = {**{t: alone[t] for t in tasks},
                "overall": {s: glue_score(tasks, {t: alone[t][s] for t in tasks})
                            for s in seeds}}
        for key in [*tasks, "overall"]:
            ours = [scores[key][s] for s in seeds]
            versus_alone = paired_interval([scores[key][s] - mine[key][s] for s in seeds])
            versus_hf = welch_interval(ours, hf[key])
            reached = versus_alone.mean >= 0 and versus_hf.mean >= 0
            rows.append([config, f"GLUE score ({', '.join(display_name(t, {}) for t in tasks)})"
                         if key == "overall" else display_name(key, {}),
                         mean_std(ours), mean_std([mine[key][s] for s in seeds]),
                         mean_std(hf[key]), versus_alone.format(scale=100, digits=2),
                         versus_hf.format(scale=100, digits=2), "yes" if reached else "no"])
    header = ["one model (mtbert)", "task (x100, mean ± std over seeds)", "one model",
              "mtbert alone", "Hugging Face alone (run_glue)",
              "one model - mtbert alone [95% CI, paired by seed]",
              "one model - Hugging Face alone [95% Welch CI]", "at or above both (means)"]
    counts = " or ".join(str(n) for n in sorted(seed_counts))
    return (f"One model against each task alone: `{folder}` ({counts} seeds, its own seeds, "
            "those every task alone has) beside the table above; `tie` marks an interval that "
            "holds 0.\n\n" + markdown_table(header, rows))


def mean_std(values: list[float]) -> str:
    values = np.asarray(values) * 100
    return (f"{values.mean():.1f}" if len(values) < 2
            else f"{values.mean():.1f} ± {values.std(ddof=1):.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", nargs="+", choices=GLUE_TASKS,
                        default=["cola", "mrpc", "rte", "stsb"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--backbone", default="all-minilm-l6-v2")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench-glue-hf")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--max-steps", type=int, help="stop each model early (smoke tests)")
    parser.add_argument("--limit", type=int, help="first N examples of each split (smoke tests)")
    parser.add_argument("--threads", type=int, help="torch threads (default: all cores)")
    parser.add_argument("--beside", type=Path, metavar="ABLATION_OUT",
                        help="an `mtbert ablate --single-task` folder of the same tasks: add "
                             "the goal table (its one model against both single-task sides)")
    args = parser.parse_args()
    command = "python benchmarks/bench_glue_hf.py " + shlex.join(sys.argv[1:])
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = {key: str(value) for key, value in vars(args).items()
                if key not in ("tasks", "seeds", "out", "threads", "beside")}
    args.out.mkdir(parents=True, exist_ok=True)
    results_path = args.out / "results.json"
    results = load_json(results_path) if results_path.exists() else {"settings": settings}
    if results["settings"] != settings:
        sys.exit(f"{results_path} holds results for other settings ({results['settings']}); "
                 "use another --out")
    folder = resolve_checkpoint(args.backbone)
    for name in args.tasks:
        for seed in args.seeds:
            if f"{name}/{seed}" not in results:
                results[f"{name}/{seed}"] = train_task(name, seed, folder, args)
                write_json_atomically(results_path, results)
    print(table(results, args, command))
    if args.beside:
        print("\n" + beside_table(results, args, args.beside))


if __name__ == "__main__":
    main()
