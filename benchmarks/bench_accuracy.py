"""Accuracy: one mtbert model against three single-task Hugging Face models, same data and CPU.

    python benchmarks/bench_accuracy.py [--config configs/default.yaml] [--out DIR]
        [--only hf|mtbert] [--fresh] [--seed 11711] [--backbone DIR] [--data-dir DIR] [--smoke]

(a) The alternative a user would pick: per task, `AutoModelForSequenceClassification` from the
    same backbone, cross-encoding sentence pairs ([CLS] s1 [SEP] s2 [SEP]): SST 5 classes, Quora
    2 classes, STS regression on label / 5 (MSE). Random batches of 32 (reshuffled every epoch,
    `padding=True`), `torch.optim.AdamW` lr 5e-5, weight decay 0.01, 10% warm-up then linear
    decay, 2 epochs, max length 128, gradient norm clipped at 1.0.
(b) mtbert: `mtbert train --config CONFIG` (the same code path), its best model scored on the
    whole dev sets, predictions for dev and test-student written under OUT/mtbert/predictions.

Both read the same examples through mtbert's readers, score the whole dev sets with the same
metrics and print one table: dev SST accuracy, Quora accuracy, STS Pearson, overall, training
wall time, parameters stored, and mtbert minus the alternative. Each finished model's result is
kept in OUT/results.json as soon as it is known, so an interrupted run resumes where it
stopped (`--fresh` starts over). `--smoke`: a handful of examples, one step per model.
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
from tqdm.auto import tqdm

from mtbert.checkpoint import write_json_atomically
from mtbert.cli import QUORA_NOTE
from mtbert.config import TaskConfig, load_config
from mtbert.cpu import configure_process
from mtbert.data.tasks import read_split
from mtbert.evaluation import metric, overall_score
from mtbert.model.loading import resolve_checkpoint
from mtbert.presets import PRESETS
from mtbert.training import train_and_evaluate

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data"
TASKS = ("sst", "quora", "sts")
LABELS = {"sst": "SST acc", "quora": "Quora acc*", "sts": "STS Pearson"}
# The single-task recipe of (a), beside the command-line settings.
WEIGHT_DECAY, WARMUP_RATIO, CLIP_NORM = 0.01, 0.1, 1.0


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


def train_hf_task(name: str, folder: Path, args) -> dict:
    """Fine-tune one single-task cross-encoder, then score the whole dev set."""
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(args.seed)
    task, train, dev = hf_task_examples(name, args.data_dir, args.limit)
    regression = task.kind == "regression"
    model = transformers.AutoModelForSequenceClassification.from_pretrained(
        folder, num_labels=1 if regression else task.num_classes,
        problem_type="regression" if regression else "single_label_classification")
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=WEIGHT_DECAY)
    steps_per_epoch = math.ceil(len(train) / args.batch_size)
    total = min(args.epochs * steps_per_epoch, args.max_steps or math.inf)
    scheduler = transformers.get_linear_schedule_with_warmup(
        optimizer, int(WARMUP_RATIO * total), total)
    rng = np.random.default_rng(args.seed)

    start = time.perf_counter()
    model.train()
    with tqdm(total=total, desc=f"HF {name}", file=sys.stderr) as bar:
        step = 0
        while step < total:
            order = rng.permutation(len(train))
            for begin in range(0, len(order), args.batch_size):
                batch = [train[i] for i in order[begin:begin + args.batch_size]]
                loss = model(**hf_inputs(tokenizer, batch, args.max_length),
                             labels=hf_labels(task, batch)).loss
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
    seconds = time.perf_counter() - start

    model.eval()
    predictions = np.empty(len(dev))
    order = np.argsort([sum(len(t) for t in e.texts) for e in dev], kind="stable")
    with torch.inference_mode():
        for begin in tqdm(range(0, len(dev), 128), desc=f"HF {name} dev", file=sys.stderr):
            rows = order[begin:begin + 128]
            logits = model(**hf_inputs(tokenizer, [dev[i] for i in rows], args.max_length)).logits
            predictions[rows] = (logits[:, 0] * task.label_range[1] if regression
                                 else logits.argmax(-1)).numpy()
    labels = np.array([e.label for e in dev], dtype=float)
    return {"score": metric(task, predictions, labels), "train_s": seconds,
            "parameters": sum(p.numel() for p in model.parameters()),
            "train_examples": len(train), "dev_examples": len(dev), "steps": total}


# ---------------------------------------------------------------- (b) mtbert


def mtbert_overrides(args) -> list[str]:
    overrides = [f"train.seed={args.seed}"]
    if args.backbone != "all-minilm-l6-v2":
        overrides.append(f"model.backbone={args.backbone}")
    if args.smoke:
        overrides += ["train.max_steps=1", f"train.max_train_examples={args.limit}",
                      f"train.max_eval_examples={args.limit}",
                      f"model.max_length={args.max_length}"]
    return overrides


def train_mtbert(args, run_dir: Path) -> dict:
    config = load_config(args.config, mtbert_overrides(args), data_dir=str(args.data_dir))
    resume = (run_dir / "checkpoints").is_dir() and any((run_dir / "checkpoints").iterdir())
    configure_process(config.train.threads, config.train.device)  # as `mtbert train` does
    table, seconds, model = train_and_evaluate(config, run_dir, resume=resume,
                                               limit=args.limit)
    dev = table["dev"]
    return {"scores": {name: dev[name] for name in TASKS}, "train_s": seconds,
            "parameters": sum(p.numel() for p in model.parameters()),
            "run_dir": str(run_dir), "overrides": mtbert_overrides(args)}


# ---------------------------------------------------------------- table


def table(results: dict) -> str:
    tasks = {name: TaskConfig(name=name, **PRESETS[name]) for name in TASKS}
    hf = [results[f"hf/{name}"] for name in TASKS]
    hf_scores = {name: r["score"] for name, r in zip(TASKS, hf)}
    hf_time, hf_params = sum(r["train_s"] for r in hf), sum(r["parameters"] for r in hf)
    ours = results["mtbert"]
    rows = []
    for label, scores, seconds, params in (
            ("(a) HF single-task cross-encoders (3 models)", hf_scores, hf_time, hf_params),
            ("(b) mtbert, one multitask model", ours["scores"], ours["train_s"],
             ours["parameters"])):
        rows.append([label, *(f"{scores[n]:.3f}" for n in TASKS),
                     f"{overall_score(tasks, scores):.3f}", f"{seconds / 60:.1f} min",
                     f"{params / 1e6:.1f}M"])
    overall = overall_score(tasks, ours["scores"]) - overall_score(tasks, hf_scores)
    rows.append(["(b) - (a)", *(f"{ours['scores'][n] - hf_scores[n]:+.3f}" for n in TASKS),
                 f"{overall:+.3f}", f"{(ours['train_s'] - hf_time) / 60:+.1f} min",
                 f"{ours['parameters'] / hf_params:.2f}x"])
    header = ["model", *(LABELS[n] for n in TASKS), "overall", "training wall time",
              "parameters stored"]
    return markdown_table(header, rows)


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
    settings = {"hf": hf_settings(args), "config": str(args.config),
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
        for name in TASKS:
            if f"hf/{name}" not in results:
                keep(f"hf/{name}", train_hf_task(name, folder, args))
    if args.only != "hf" and "mtbert" not in results:
        keep("mtbert", train_mtbert(args, args.out / "mtbert"))
    if not all(key in results for key in ("mtbert", *(f"hf/{n}" for n in TASKS))):
        print(f"partial results in {results_path}; run without --only for the table")
        return

    dev_sizes = ", ".join(f"{n} {results[f'hf/{n}']['dev_examples']}" for n in TASKS)
    steps = ", ".join(f"{n} {results[f'hf/{n}']['steps']}" for n in TASKS)
    print(f"dev examples scored: {dev_sizes}; backbone {args.backbone}; seed {args.seed}; "
          f"threads {torch.get_num_threads()}")
    print(f"(a): {args.epochs} epochs, batch {args.batch_size}, lr {args.lr}, max length "
          f"{args.max_length}, steps {steps}")
    print(f"(b): {args.config} {' '.join(results['mtbert']['overrides'])}\n")
    text = table(results)
    print(text)
    print(f"\n*{QUORA_NOTE.removeprefix('note: ')}")
    per_task = ", ".join(f"{n} {results[f'hf/{n}']['train_s'] / 60:.1f} min" for n in TASKS)
    print(f"(a) training time per task: {per_task}")
    (args.out / "results.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
