"""`mtbert train | evaluate | predict`: the command line over the public functions."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from mtbert.config import ConfigError, load_config

log = logging.getLogger("mtbert")

QUORA_NOTE = ("note: the default backbone (all-MiniLM-L6-v2) was pre-trained on paraphrase "
              "data that includes Quora duplicates; its Quora scores are not a clean measure.")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mtbert", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train one model on all the config's tasks")
    train.add_argument("--config", type=Path, help="experiment YAML (configs/default.yaml)")
    train.add_argument("--data-dir", help="folder with the task files (default: config)")
    train.add_argument("--run-dir", type=Path, help="output folder (default: runs/NAME)")
    train.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                       help="config overrides, e.g. train.lr=3e-5 tasks.sts.head.type=cosine")

    evaluate = commands.add_parser("evaluate", help="score a trained model on labelled splits")
    evaluate.add_argument("run_dir", type=Path)
    evaluate.add_argument("--data-dir")
    evaluate.add_argument("--splits", nargs="+", default=["dev"])

    predict = commands.add_parser("predict", help="write prediction files for splits")
    predict.add_argument("run_dir", type=Path)
    predict.add_argument("--data-dir")
    predict.add_argument("--splits", nargs="+", default=["dev", "test"])
    predict.add_argument("--out", type=Path, help="folder (default: RUN_DIR/predictions)")
    return parser


def cmd_train(args: argparse.Namespace) -> None:
    from mtbert.evaluation import evaluate_splits, format_table
    from mtbert.training import Trainer, load_model

    config = load_config(args.config, args.overrides, args.data_dir)
    run_dir = args.run_dir or Path("runs") / config.name
    start = time.perf_counter()
    trainer = Trainer(config, run_dir)
    trainer.fit()
    train_seconds = time.perf_counter() - start
    model, tokenizer, config = load_model(run_dir)
    table = evaluate_splits(model, tokenizer, config, ["dev", "test"], run_dir / "predictions")
    print(format_table(table, model.tasks))
    print(f"training wall time: {train_seconds / 60:.1f} min; best model: {run_dir / 'best'}; "
          f"predictions: {run_dir / 'predictions'}")
    if any(t.preset == "quora" for t in config.tasks) and "minilm" in config.model.backbone:
        print(QUORA_NOTE)


def _load(args: argparse.Namespace):
    from mtbert.training import load_model

    model, tokenizer, config = load_model(args.run_dir)
    if args.data_dir:
        config.data_dir = args.data_dir
    return model, tokenizer, config


def cmd_evaluate(args: argparse.Namespace) -> None:
    from mtbert.evaluation import evaluate_splits, format_table

    model, tokenizer, config = _load(args)
    print(format_table(evaluate_splits(model, tokenizer, config, args.splits), model.tasks))


def cmd_predict(args: argparse.Namespace) -> None:
    from mtbert.evaluation import evaluate_splits

    model, tokenizer, config = _load(args)
    out = args.out or args.run_dir / "predictions"
    evaluate_splits(model, tokenizer, config, args.splits, out)
    print(f"predictions written to {out}")


COMMANDS = {"train": cmd_train, "evaluate": cmd_evaluate, "predict": cmd_predict}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    from mtbert.checkpoint import CorruptCheckpointError
    from mtbert.data.readers import DataError
    from mtbert.model.loading import CheckpointError
    from mtbert.training import TrainingError

    try:
        COMMANDS[args.command](args)
    except (ConfigError, DataError, CheckpointError, CorruptCheckpointError, TrainingError,
            FileNotFoundError) as error:
        print(f"mtbert {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
