"""Accuracy: one mtbert model against single-task models, same data, CPU and checkpoint rule.

    python benchmarks/bench_accuracy.py [--config configs/default.yaml] [--out DIR]
        [--only hf|mtbert] [--fresh] [--seed 11711] [--backbone DIR] [--data-dir DIR] [--smoke]

(a) Hugging Face single-task models from the same backbone, one per task, cross-encoding
    sentence pairs ([CLS] s1 [SEP] s2 [SEP]): SST 5 classes, Quora 2, STS regression on
    label / 5 (MSE). Two rows:
    - `cls`: `AutoModelForSequenceClassification`, the [CLS] pooler head, as transformers
      users run it;
    - `mean`: `AutoModel` + mean pooling over real tokens + dropout + linear, the pooling the
      default backbone (all-MiniLM-L6-v2) was trained for, as sentence-transformers users pool.
    Random batches of 32 (reshuffled every epoch, `padding=True`), `torch.optim.AdamW` lr 5e-5,
    weight decay 0.01, 10% warm-up then linear decay, 2 epochs, max length 128, gradient norm
    clipped at 1.0; the whole dev set is scored after every epoch.
(b) mtbert single-task: each task of CONFIG alone, the same recipe (`mtbert ablate
    --single-task` builds the same configs), through the same code path as `mtbert train`.
(c) mtbert: `mtbert train --config CONFIG`, one multitask model; predictions of its best model
    for dev and test-student written under OUT/mtbert/predictions.

Every model is reported under two checkpoint rules, each the same for every row:
- **last**: the model after the last optimizer step, scored on the whole dev sets;
- **dev-selected**: the best of the evaluations made during training, chosen on the dev data
  it is then scored on (optimistic: the choice has seen the answers). HF models choose per
  task among their epoch ends; mtbert among its `evals_per_epoch` evaluations, on the overall
  score of its (possibly sub-sampled, `train.max_eval_examples`) dev evaluation, then the
  chosen model is scored on the whole dev sets.

(a) trains in fp32, as transformers does on CPU unless told otherwise; (b) and (c) in what
`train.precision` resolves to (bf16 under `auto` on CPUs with fast bf16), printed from each
run's run.json: the wall times compare defaults; `bench_train.py` compares speed like for like.

All read the same examples through mtbert's readers and score with the same metrics. Each
finished model's result is kept in OUT/results.json as soon as it is known, so an interrupted
run resumes where it stopped (`--fresh` starts over). `--smoke`: a handful of examples, one
step per model.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from bench_train import markdown_table
from torch import nn
from tqdm.auto import tqdm

from mtbert.checkpoint import RunLock, load_json, write_json_atomically
from mtbert.cli import QUORA_NOTE
from mtbert.config import TaskConfig, load_config
from mtbert.cpu import configure_process
from mtbert.data.tasks import read_split
from mtbert.evaluation import evaluate_splits, metric, overall_score
from mtbert.experiments.ablation import single_task_configs
from mtbert.model.bert import mean_pool
from mtbert.model.loading import resolve_checkpoint
from mtbert.model_folder import load_model
from mtbert.presets import PRESETS
from mtbert.training import Trainer

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data"
TASKS = ("sst", "quora", "sts")
LABELS = {"sst": "SST acc", "quora": "Quora acc*", "sts": "STS Pearson"}
RULES = {"last": "last step", "best": "dev-selected (optimistic)"}
POOLINGS = {"cls": "HF [CLS] pooler head (AutoModelForSequenceClassification)",
            "mean": "HF mean pooling + linear head (AutoModel)"}
# The single-task recipe of (a), beside the command-line settings.
WEIGHT_DECAY, WARMUP_RATIO, CLIP_NORM = 0.01, 0.1, 1.0
VERSION = 2  # results of version 1 (no checkpoint rules) are not comparable


# ---------------------------------------------------------------- (a) single-task HF models


def hf_settings(args) -> dict:
    """Everything that defines the HF runs; a resumed benchmark must match it."""
    return {"backbone": args.backbone, "seed": args.seed, "epochs": args.epochs,
            "batch_size": args.batch_size, "lr": args.lr, "weight_decay": WEIGHT_DECAY,
            "warmup": WARMUP_RATIO, "max_length": args.max_length, "clip": CLIP_NORM,
            "max_steps": args.max_steps, "limit": args.limit}


def hf_task_examples(name: str, data_dir: Path, limit: int | None):
    task = TaskConfig(name=name, **PRESETS[name])
    train = read_split(task, "train", data_dir)[:limit]
    dev = read_split(task, "dev", data_dir)[:limit]
    return task, train, dev


def hf_inputs(tokenizer, examples, max_length: int):
    """Tokenize a batch as a cross-encoder sees it: one text, or a text pair."""
    columns = list(zip(*(e.texts for e in examples)))
    return tokenizer(*columns, padding=True, truncation=True, max_length=max_length,
                     return_tensors="pt")


def hf_labels(task: TaskConfig, examples) -> torch.Tensor:
    labels = torch.tensor([e.label for e in examples])
    if task.kind == "regression":
        return (labels.float() / task.label_range[1]).unsqueeze(-1)  # STS: label / 5
    return labels.long()


class MeanPooledClassifier(nn.Module):
    """A transformers encoder, mean pooling over real tokens, dropout, one linear layer."""

    def __init__(self, folder: Path, outputs: int):
        import transformers

        super().__init__()
        self.encoder = transformers.AutoModel.from_pretrained(folder, add_pooling_layer=False)
        self.dropout = nn.Dropout(self.encoder.config.hidden_dropout_prob)
        self.head = nn.Linear(self.encoder.config.hidden_size, outputs)

    def forward(self, attention_mask: torch.Tensor, **inputs) -> torch.Tensor:
        hidden = self.encoder(attention_mask=attention_mask, **inputs).last_hidden_state
        return self.head(self.dropout(mean_pool(hidden, attention_mask)))


class LogitsOnly(nn.Module):
    """`AutoModelForSequenceClassification` returning its logits tensor."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, **inputs) -> torch.Tensor:
        return self.model(**inputs).logits


def hf_model(pooling: str, folder: Path, task: TaskConfig) -> nn.Module:
    """The model of one row of (a); calling it on tokenizer outputs returns (B, outputs)."""
    import transformers

    outputs = 1 if task.kind == "regression" else task.num_classes
    if pooling == "mean":
        return MeanPooledClassifier(folder, outputs)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(
        folder, num_labels=outputs)
    return LogitsOnly(model)


def hf_loss(task: TaskConfig, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The loss transformers picks for the problem type: MSE (regression) or cross entropy."""
    if task.kind == "regression":
        return nn.functional.mse_loss(logits, labels)
    return nn.functional.cross_entropy(logits, labels)


@torch.inference_mode()
def hf_dev_score(model: nn.Module, tokenizer, task: TaskConfig, dev, max_length: int) -> float:
    """The whole dev set's metric, scored in length order (batches of 128)."""
    model.eval()
    predictions = np.empty(len(dev))
    order = np.argsort([sum(len(t) for t in e.texts) for e in dev], kind="stable")
    for begin in range(0, len(dev), 128):
        rows = order[begin:begin + 128]
        logits = model(**hf_inputs(tokenizer, [dev[i] for i in rows], max_length))
        predictions[rows] = (logits[:, 0] * task.label_range[1] if task.kind == "regression"
                             else logits.argmax(-1)).numpy()
    model.train()
    return metric(task, predictions, np.array([e.label for e in dev], dtype=float))


def train_hf_task(name: str, pooling: str, folder: Path, args) -> dict:
    """Fine-tune one single-task model; score the whole dev set after every epoch."""
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(args.seed)
    task, train, dev = hf_task_examples(name, args.data_dir, args.limit)
    model = hf_model(pooling, folder, task)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=WEIGHT_DECAY)
    steps_per_epoch = math.ceil(len(train) / args.batch_size)
    total = min(args.epochs * steps_per_epoch, args.max_steps or math.inf)
    scheduler = transformers.get_linear_schedule_with_warmup(
        optimizer, int(WARMUP_RATIO * total), total)
    rng = np.random.default_rng(args.seed)

    seconds, step, epoch_scores = 0.0, 0, []
    model.train()
    with tqdm(total=total, desc=f"HF {pooling} {name}", file=sys.stderr) as bar:
        while step < total:
            start = time.perf_counter()
            order = rng.permutation(len(train))
            for begin in range(0, len(order), args.batch_size):
                batch = [train[i] for i in order[begin:begin + args.batch_size]]
                logits = model(**hf_inputs(tokenizer, batch, args.max_length))
                loss = hf_loss(task, logits, hf_labels(task, batch))
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP_NORM)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                bar.update()
                bar.set_postfix(loss=f"{loss.item():.3f}")
                if step == total:
                    break
            seconds += time.perf_counter() - start
            epoch_scores.append(hf_dev_score(model, tokenizer, task, dev, args.max_length))
    return {"last": epoch_scores[-1], "best": max(epoch_scores), "epoch_scores": epoch_scores,
            "train_s": seconds, "parameters": sum(p.numel() for p in model.parameters()),
            "train_examples": len(train), "dev_examples": len(dev), "steps": total}


# ---------------------------------------------------------------- (b), (c) mtbert


def mtbert_overrides(args) -> list[str]:
    overrides = [f"train.seed={args.seed}"]
    if args.backbone != "all-minilm-l6-v2":
        overrides.append(f"model.backbone={args.backbone}")
    if args.smoke:
        overrides += ["train.max_steps=1", f"train.max_train_examples={args.limit}",
                      f"train.max_eval_examples={args.limit}",
                      f"model.max_length={args.max_length}"]
    return overrides


def train_mtbert(config, run_dir: Path, args, predictions: bool) -> dict:
    """Train (or resume) one run as `mtbert train` does; score its last-step model and its
    dev-selected `best/` on the whole dev sets."""
    configure_process(config.train.threads, config.train.device)  # as `mtbert train` does
    with RunLock(run_dir):
        trainer = Trainer(config, run_dir)
        if any(trainer.checkpoints_dir.glob("step-*")):
            trainer.resume()
        start = time.perf_counter()
        trainer.fit()
        seconds = time.perf_counter() - start
        last = evaluate_splits(trainer.model.eval(), trainer.tokenizer, config, ("dev",),
                               limit=args.limit)["dev"]
        best_model, tokenizer, best_config = load_model(run_dir)
        best = evaluate_splits(best_model, tokenizer, best_config,
                               ("dev", "test") if predictions else ("dev",),
                               run_dir / "predictions" if predictions else None,
                               limit=args.limit)["dev"]
    names = [task.name for task in config.tasks]
    return {"last": {n: last[n] for n in names}, "best": {n: best[n] for n in names},
            "train_s": seconds, "parameters": sum(p.numel() for p in best_model.parameters()),
            "run_dir": str(run_dir), "overrides": mtbert_overrides(args)}


def run_precision(run_dir: Path) -> str:
    """The precision `train.precision` resolved to in a run, as its run.json records it."""
    return load_json(run_dir / "run.json")["precision"]


# ---------------------------------------------------------------- table


def table(results: dict, rule: str) -> str:
    """One row per contender, scores under checkpoint `rule`, then the multitask model's
    differences from each single-task row."""
    tasks = {name: TaskConfig(name=name, **PRESETS[name]) for name in TASKS}
    contenders = [(f"(a{i}) {POOLINGS[p]}, 3 single-task models",
                   [results[f"hf-{p}/{n}"] for n in TASKS]) for i, p in enumerate(POOLINGS, 1)]
    contenders.append(("(b) mtbert single-task, same recipe, 3 models",
                       [results[f"mtbert-only/{n}"] for n in TASKS]))
    rows, summaries = [], {}
    for label, parts in contenders:
        scores = {n: r[rule] if isinstance(r[rule], float) else r[rule][n]
                  for n, r in zip(TASKS, parts)}
        summaries[label] = (scores, sum(r["train_s"] for r in parts),
                            sum(r["parameters"] for r in parts))
    ours = results["mtbert"]
    summaries["(c) mtbert, one multitask model"] = (ours[rule], ours["train_s"],
                                                    ours["parameters"])
    for label, (scores, seconds, params) in summaries.items():
        rows.append([label, *(f"{scores[n]:.3f}" for n in TASKS),
                     f"{overall_score(tasks, scores):.3f}", f"{seconds / 60:.1f} min",
                     f"{params / 1e6:.1f}M"])
    mine, my_seconds, my_params = summaries.pop("(c) mtbert, one multitask model")
    for label, (scores, seconds, params) in summaries.items():
        overall = overall_score(tasks, mine) - overall_score(tasks, scores)
        rows.append([f"(c) - {label.split()[0]}", *(f"{mine[n] - scores[n]:+.3f}" for n in TASKS),
                     f"{overall:+.3f}", f"{(my_seconds - seconds) / 60:+.1f} min",
                     f"{my_params / params:.2f}x"])
    header = ["model", *(LABELS[n] for n in TASKS), "overall", "training wall time",
              "parameters stored"]
    return f"checkpoint rule: {RULES[rule]}\n\n" + markdown_table(header, rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "default.yaml")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench-accuracy")
    parser.add_argument("--only", choices=["hf", "mtbert"], default=None)
    parser.add_argument("--fresh", action="store_true", help="discard earlier results in --out")
    parser.add_argument("--seed", type=int, default=11711)
    parser.add_argument("--backbone", default="all-minilm-l6-v2")
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--smoke", action="store_true",
                        help="8 examples per split, one step per model (for tests)")
    args = parser.parse_args()
    args.limit, args.max_steps = (8, 1) if args.smoke else (None, None)
    if args.smoke:
        args.max_length, args.batch_size = 32, 4
    if args.fresh and args.out.exists():
        shutil.rmtree(args.out)
    args.out.mkdir(parents=True, exist_ok=True)
    results_path = args.out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    settings = {"version": VERSION, "hf": hf_settings(args), "config": str(args.config),
                "mtbert_overrides": mtbert_overrides(args)}
    if results.get("settings", settings) != settings:
        sys.exit(f"{results_path} holds results for other settings "
                 f"({results['settings']}); pass --fresh or another --out")
    results["settings"] = settings

    def keep(key: str, value: dict) -> None:
        results[key] = value
        write_json_atomically(results_path, results)

    folder = resolve_checkpoint(args.backbone)
    if args.only != "mtbert":
        for pooling in POOLINGS:
            for name in TASKS:
                if f"hf-{pooling}/{name}" not in results:
                    keep(f"hf-{pooling}/{name}", train_hf_task(name, pooling, folder, args))
    if args.only != "hf":
        config = load_config(args.config, mtbert_overrides(args), data_dir=str(args.data_dir))
        for alone in single_task_configs(config):
            name = alone.tasks[0].name
            if f"mtbert-only/{name}" not in results:
                keep(f"mtbert-only/{name}",
                     train_mtbert(alone, args.out / f"mtbert-only-{name}", args, False))
        if "mtbert" not in results:
            keep("mtbert", train_mtbert(config, args.out / "mtbert", args, True))
    expected = ["mtbert", *(f"{kind}/{n}" for kind in ("hf-cls", "hf-mean", "mtbert-only")
                            for n in TASKS)]
    if not all(key in results for key in expected):
        print(f"partial results in {results_path}; run without --only for the tables")
        return

    dev_sizes = ", ".join(f"{n} {results[f'hf-cls/{n}']['dev_examples']}" for n in TASKS)
    steps = ", ".join(f"{n} {results[f'hf-cls/{n}']['steps']}" for n in TASKS)
    print(f"dev examples scored: {dev_sizes}; backbone {args.backbone}; seed {args.seed}; "
          f"threads {torch.get_num_threads()}")
    print(f"(a): {args.epochs} epochs, batch {args.batch_size}, lr {args.lr}, max length "
          f"{args.max_length}, steps {steps}")
    mtbert_runs = [results["mtbert"], *(results[f"mtbert-only/{n}"] for n in TASKS)]
    precisions = sorted({run_precision(Path(run["run_dir"])) for run in mtbert_runs})
    print(f"(b), (c): {args.config} {' '.join(results['mtbert']['overrides'])}; "
          f"precision {', '.join(precisions)} (run.json)")
    print(f"(a) trains in fp32 (transformers' default on CPU), (b) and (c) in "
          f"{', '.join(precisions)}: training wall times compare the defaults, not like for "
          f"like (that is bench_train.py)\n")
    text = "\n\n".join(table(results, rule) for rule in RULES)
    print(text)
    print(f"\n*{QUORA_NOTE.removeprefix('note: ')}")
    per_task = ", ".join(f"{n} {results[f'hf-{p}/{n}']['train_s'] / 60:.1f} min"
                         for p in POOLINGS for n in TASKS)
    print(f"(a) training time per model (cls, then mean): {per_task}")
    (args.out / "results.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
