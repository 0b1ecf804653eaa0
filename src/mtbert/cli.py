"""`mtbert train | evaluate | predict | ablate | report | serve | export | data`: the command
line over the public functions."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from mtbert.config import ConfigError, ExperimentConfig, load_config, validate
from mtbert.cpu import configure_process
from mtbert.serving.settings import ServeSettings

log = logging.getLogger("mtbert")

QUORA_NOTE = ("note: the default backbone (all-MiniLM-L6-v2) was pre-trained on paraphrase "
              "data that includes Quora duplicates; its Quora scores are not a clean measure.")


def positive_int(text: str) -> int:
    """An argparse type: a whole number >= 1, checked before any work."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def add_overwrite(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--overwrite", action="store_true",
                        help=f"replace {what} if it exists and is not empty (kept until the new "
                             "one is complete; never an input of the command)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mtbert", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train one model on all the config's tasks")
    train.add_argument("--config", type=Path, help="experiment YAML (configs/default.yaml)")
    train.add_argument("--data-dir", help="folder with the task files (default: config)")
    train.add_argument("--run-dir", type=Path, help="output folder (default: runs/NAME)")
    train.add_argument("--resume", type=Path, metavar="RUN_DIR",
                       help="continue an interrupted run from its last good checkpoint; "
                            "overrides may lower train.lr (e.g. after NaN losses)")
    train.add_argument("--overwrite", action="store_true",
                       help="replace the run that --run-dir already holds")
    train.add_argument("--from", dest="from_run", type=Path, metavar="RUN",
                       help="add the config's tasks to RUN's model: RUN's encoder, tasks and "
                            "conditioning stay frozen (their outputs unchanged); only the new "
                            "tasks' heads and adapters train")
    train.add_argument("--finetune", metavar="TASK",
                       help="with --from: fine-tune RUN's task TASK alone, encoder included "
                            "(two-stage MT-DNN), into runs/NAME-TASK; training settings: "
                            "--config, else RUN's own, and the overrides")
    train.add_argument("--nproc", type=int, metavar="N",
                       help="train on N processes of this machine under DDP (runs torchrun "
                            "--standalone --nproc-per-node N); batch sizes are per process. "
                            "For several machines call torchrun yourself (README)")
    train.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                       help="config overrides, e.g. train.lr=3e-5 tasks.sts.head.type=cosine")

    distill = commands.add_parser(
        "distill", help="train a multitask student taught by single-task teachers (BAM!)",
        description="Train the config's tasks as `mtbert train` does, each task with a "
                    "teacher learning from lambda * gold + (1 - lambda) * teacher, lambda "
                    "rising from 0 to 1 over training (teacher annealing, Clark et al. 2019).")
    distill.add_argument("--teachers", nargs="+", type=Path, required=True, metavar="RUN",
                         help="teacher runs: each teaches the tasks it has")
    distill.add_argument("--config", type=Path, help="the student's experiment YAML")
    distill.add_argument("--data-dir", help="folder with the task files (default: config)")
    distill.add_argument("--run-dir", type=Path, help="output folder (default: runs/NAME)")
    distill.add_argument("--overwrite", action="store_true",
                         help="replace the run that --run-dir already holds")
    distill.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                         help="config overrides, e.g. distill.temperature=2")

    evaluate = commands.add_parser("evaluate", help="score a trained model on labelled splits")
    evaluate.add_argument("run_dir", type=Path)
    evaluate.add_argument("--data-dir")
    evaluate.add_argument("--splits", nargs="+", default=["dev"])
    evaluate.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32",
                          help="weights and matrix products in bf16 (fast on CPUs with "
                               "AVX512-BF16/AMX)")

    predict = commands.add_parser(
        "predict", help="predict a CSV/TSV/JSONL file (--task, --input) or the config's splits",
        description="With --task and --input: predict every row of a file (or - for standard "
                    "input) into --output, streaming in chunks. Otherwise: write "
                    "{task}-{split}-output.csv files for the config's splits.")
    predict.add_argument("run_dir", type=Path, help="a run, its best/, or an export folder")
    predict.add_argument("--data-dir")
    predict.add_argument("--splits", nargs="+", default=["dev", "test"])
    predict.add_argument("--out", type=Path, help="folder (default: RUN_DIR/predictions)")
    predict.add_argument("--task", help="the task to predict (file mode)")
    predict.add_argument("--input", help="CSV/TSV/JSONL file, or - (stdin), read as the "
                                          "task's files are (header or not, quoting)")
    predict.add_argument("--output", default="-", help="file (.jsonl/.csv/.tsv; an existing "
                                                       "one is replaced, never --input) or - "
                                                       "(stdout, default)")
    predict.add_argument("--format", dest="output_format", choices=["jsonl", "csv", "tsv"],
                         help="output format (default: by --output's suffix; jsonl on stdout)")
    predict.add_argument("--input-format", choices=["jsonl", "csv", "tsv"],
                         help="input format (default: by suffix, else sniffed)")
    predict.add_argument("--text-columns", nargs="+", metavar="COLUMN",
                         help="input text column(s) (default: the task's text_columns)")
    predict.add_argument("--id-column", help="input id column, which must exist (default: the "
                                             "task's if the file has it, else rows are "
                                             "numbered from 0)")
    predict.add_argument("--probabilities", action="store_true",
                         help="also write each class's probability")
    predict.add_argument("--batch-size", type=positive_int,
                         help="default: the run's eval_batch_size")
    predict.add_argument("--quantize", choices=["int8"], help="int8 encoder (CPU)")
    predict.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32",
                         help="weights and matrix products in bf16 (fast on CPUs with "
                              "AVX512-BF16/AMX)")

    serve = commands.add_parser(
        "serve", help="serve a model over HTTP: /v1/predict, /v1/embed, /health, /metrics, "
                      "a page at /",
        description="An HTTP server in the shape of text-embeddings-inference: requests of "
                    "all clients are batched together (up to --max-batch inputs, or what "
                    "came within --max-wait-ms), one forward pass per task. OpenAPI docs at "
                    "/docs. SIGTERM lets the requests in flight finish, then exits.")
    serve.add_argument("run_dir", type=Path, help="a run, its best/, or an export folder")
    serve.add_argument("--host", default="127.0.0.1", help="address (default: 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="port (default: 8000; 0: any)")
    serve.add_argument("--quantize", choices=["int8"], help="int8 encoder (CPU)")
    defaults = ServeSettings()
    for flag, kind, meaning in (
            ("max-batch", int, "inputs per forward pass"),
            ("max-wait-ms", float, "how long the oldest queued input waits for others"),
            ("max-queue", int, "inputs waiting; a request that would pass it gets 503"),
            ("max-inputs", int, "inputs per request; more gets 413"),
            ("max-chars", int, "characters per text; more gets 422"),
            ("request-timeout-s", float, "a request without its results by then gets 504")):
        default = getattr(defaults, flag.replace("-", "_"))
        serve.add_argument(f"--{flag}", type=kind, default=default,
                           help=f"{meaning} (default: {default})")
    serve.add_argument("--api-key-env", metavar="VAR",
                       help="require 'Authorization: Bearer KEY' on /v1/* and /metrics, "
                            "KEY being the value of the environment variable VAR")

    export = commands.add_parser(
        "export", help="write a Hugging Face, sentence-transformers or ONNX folder + model card")
    export.add_argument("run_dir", type=Path, help="a run, its best/, or an export folder")
    export.add_argument("out", type=Path)
    export.add_argument("--format", required=True, dest="export_format",
                        choices=["hf", "sentence-transformers", "onnx"])
    export.add_argument("--quantize", choices=["int8"], help="onnx: int8 matrix products")
    export.add_argument("--task", help="onnx: this task only (default: every task); "
                        "a task-routed MoE: this task's dense path")
    add_overwrite(export, "OUT")

    data = commands.add_parser("data", help="download the standard task files; check a folder")
    data_commands = data.add_subparsers(dest="data_command", required=True)
    download = data_commands.add_parser(
        "download", help="fetch the task files and verify their sha256 sums")
    download.add_argument("--dest", type=Path, default=Path(ExperimentConfig.data_dir),
                          help=f"folder (default: {ExperimentConfig.data_dir})")
    download.add_argument("--mirror", metavar="URL",
                          help="base URL to fetch from instead of the public one (file:// works)")
    add_overwrite(download, "task files in --dest that are not the standard ones")
    data_check = data_commands.add_parser(
        "check", help="read every task file as training would; list malformed rows")
    data_check.add_argument("folder", type=Path)
    data_check.add_argument("--tasks", nargs="+",
                            help="presets to check (default: the ones `data download` fetches)")

    data_cache = data_commands.add_parser(
        "cache", help="list the token cache's entries (size, last use); --prune removes them")
    data_cache.add_argument("--dir", type=Path, dest="cache_dir",
                            help="the cache folder (default: $MTBERT_CACHE, else "
                                 "~/.cache/mtbert/tokens)")
    data_cache.add_argument("--prune", nargs="?", const=0.0, type=float, metavar="DAYS",
                            help="remove the entries unused for DAYS days (without DAYS: all); "
                                 "a later run builds what it needs again")

    ablate = commands.add_parser(
        "ablate", help="train configs x seeds under a compute budget; tabulate dev scores",
        description="Train each config for each seed into OUT/<config name>/seed-<k> "
                    "(finished runs are skipped: re-run to resume), then write "
                    "OUT/results.csv, OUT/results.md and OUT/results.png. The first config "
                    "is the baseline the others are compared with, seed by seed.")
    ablate.add_argument("items", nargs="+", metavar="CONFIG|KEY=VALUE",
                        help="experiment YAMLs and overrides applied to every config, "
                             "together (before or after the options, not between them)")
    ablate.add_argument("--budget", default="small",
                        help="small (60 steps, 10%% of the data), medium (200 steps, 25%%), "
                             "large (600 steps) or full (no caps); see "
                             "mtbert.experiments.budgets (default: small)")
    ablate.add_argument("--seeds", type=int, default=3,
                        help="seeds per config: train.seed + 0 .. N-1 (default: 3)")
    ablate.add_argument("--single-task", action="store_true",
                        help="also train each task of the first config alone (same recipe, "
                             "budget, seeds): the rows Δm%% is measured against")
    ablate.add_argument("--merge", nargs="+", default=[], metavar="METHOD",
                        choices=["average", "task-arithmetic", "ties"],
                        help="with --single-task: also a row per method merging each seed's "
                             "single-task runs (mtbert merge)")
    ablate.add_argument("--two-stage", nargs="?", const=True, default=False, metavar="CONFIG",
                        help="also a row <baseline>-two-stage (MT-DNN, Liu et al. 2019): each "
                             "task fine-tuned alone from the baseline's run of the same seed, "
                             "one model per task, drawing what its single-task row draws; with "
                             "CONFIG, under CONFIG's training settings (e.g. "
                             "configs/winning/two-stage.yaml, MT-DNN's short fine-tune)")
    ablate.add_argument("--out", type=Path, default=Path("runs/ablation"),
                        help="output folder (default: runs/ablation)")
    ablate.add_argument("--data-dir", help="folder with the task files (default: config)")
    ablate.add_argument("--no-report", dest="report", action="store_false",
                        help="skip each run's report.html (written by default, also for "
                             "finished runs that lack one)")
    ablate.add_argument("--tensorboard", action="store_true",
                        help="also write TensorBoard scalars for each run trained")
    ablate.add_argument("--plan", action="store_true",
                        help="train nothing: print each row's steps and examples per task "
                             "under the budget (single-task rows: also the old rule's)")

    affinity = commands.add_parser(
        "affinity", help="which tasks help which: measured pairwise transfer, TAG's one-run "
                         "estimate, task groups",
        description="Train every pair of CONFIG's tasks, each task alone and all together "
                    "(the ablation harness, same budget rule and seeds) into OUT; the "
                    "all-tasks runs log TAG's look-ahead affinity. Then choose task groups "
                    "from both matrices, train them, and write OUT/affinity.md, "
                    "OUT/affinity-measured.png and OUT/affinity-estimate.png "
                    "(see mtbert.experiments.affinity).")
    affinity.add_argument("items", nargs="+", metavar="CONFIG|KEY=VALUE",
                          help="one experiment YAML and overrides")
    affinity.add_argument("--budget", default="small", help="as for ablate (default: small)")
    affinity.add_argument("--seeds", type=int, default=3, help="seeds per row (default: 3)")
    affinity.add_argument("--every", type=int, default=10, metavar="N",
                          help="look-ahead affinity every N steps of the all-tasks runs "
                               "(train.affinity_every; default: 10)")
    affinity.add_argument("--groups", type=int, default=2, metavar="K",
                          help="partition the tasks into K groups (default: 2)")
    affinity.add_argument("--out", type=Path, default=Path("runs/affinity"),
                          help="output folder (default: runs/affinity)")
    affinity.add_argument("--data-dir", help="folder with the task files (default: config)")
    affinity.add_argument("--no-report", dest="report", action="store_false",
                          help="skip each run's report.html")

    merge = commands.add_parser(
        "merge", help="merge runs fine-tuned from the same backbone into one multitask model",
        description="Merge the runs' encoders (average, task arithmetic or TIES) and keep "
                    "every run's heads: one model folder for all their tasks, which "
                    "evaluate, predict, serve and export read like a run.")
    merge.add_argument("runs", nargs="+", type=Path, metavar="RUN")
    merge.add_argument("--method", required=True, choices=["average", "task-arithmetic", "ties"])
    merge.add_argument("--scale", type=float,
                       help="task-arithmetic and ties: the merged task vector's factor "
                            "(default: 0.5 and 1.0)")
    merge.add_argument("--density", type=float,
                       help="ties: share of each task vector's entries kept (default: 0.2)")
    merge.add_argument("--out", type=Path, required=True, help="the merged model's folder")
    add_overwrite(merge, "--out")

    report = commands.add_parser("report", help="write RUN_DIR/report.html (plots, curves)")
    report.add_argument("run_dir", type=Path)
    report.add_argument("--data-dir")
    report.add_argument("--max-examples", type=int,
                        help="dev examples per task to plot, 0 for all (default: those "
                             "the run was scored on, at most 5000)")
    report.add_argument("--tensorboard", action="store_true",
                        help="also write metrics.jsonl as TensorBoard scalars")
    add_overwrite(report, "plots/ (and tensorboard/) holding files an earlier report did not "
                          "write")
    return parser


def cmd_train(args: argparse.Namespace) -> None:
    from mtbert import distributed
    from mtbert.training import RESUME_OVERRIDES, TrainingError

    if args.nproc is not None and not distributed.launched_by_torchrun():
        if args.nproc < 1:
            raise ConfigError(f"--nproc: must be >= 1, got {args.nproc}")
        from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
        from torch.distributed.run import main as torchrun

        try:
            torchrun(["--standalone", f"--nproc-per-node={args.nproc}", "-m", "mtbert",
                      *_without_nproc(args.argv)])
        except ChildFailedError as error:
            rank, failure = error.get_first_failure()
            how = (f"signal {failure.signal_name()}" if failure.exitcode < 0
                   else f"exit code {failure.exitcode}")
            raise TrainingError(f"training process {rank} failed ({how}); the others were "
                                "stopped. Continue from the last checkpoint with --resume "
                                f"RUN_DIR --nproc {args.nproc}") from None
        return

    if args.resume is not None:
        others = [o for o in args.overrides if o.split("=", 1)[0].strip() not in RESUME_OVERRIDES]
        if (args.config or args.run_dir or args.overwrite or args.from_run or args.finetune
                or others):
            raise ConfigError("--resume takes the run's own config; drop --config, --run-dir, "
                              "--overwrite, --from, --finetune and overrides other than "
                              f"{', '.join(RESUME_OVERRIDES)}")
        run_dir = args.resume
        if not (run_dir / "config.yaml").is_file():
            raise ConfigError(f"--resume {run_dir}: no run there (no config.yaml)")
        config = load_config(run_dir / "config.yaml", args.overrides, args.data_dir)
    else:
        if args.finetune is not None:
            if args.from_run is None:
                raise ConfigError("--finetune TASK fine-tunes a task of a trained run: give "
                                  "--from RUN too")
            if args.config is None:  # RUN's own training settings, overrides on top
                from mtbert.model_folder import model_folder
                args.config = model_folder(args.from_run) / "experiment.yaml"
        config = load_config(args.config, args.overrides, args.data_dir)
        if args.from_run is not None:
            from mtbert.adapting import config_from_run
            config = config_from_run(args.from_run, config, args.finetune)
        run_dir = args.run_dir or Path("runs") / config.name
    _train(config, run_dir, args.resume is not None, args.overwrite)


def cmd_distill(args: argparse.Namespace) -> None:
    from mtbert.distillation import teachers_from_runs

    config = load_config(args.config, args.overrides, args.data_dir)
    config.distill.teachers = teachers_from_runs(args.teachers, [t.name for t in config.tasks])
    validate(config)
    _train(config, args.run_dir or Path("runs") / config.name, False, args.overwrite)


def _train(config: ExperimentConfig, run_dir: Path, resume: bool, overwrite: bool) -> None:
    """Train (or resume) a run, print its table and write its report; in a torchrun job,
    as one of its processes (only rank 0 prints and writes)."""
    from mtbert import distributed
    from mtbert.evaluation import format_table
    from mtbert.training import train_and_evaluate

    configure_process(config.train.threads, config.train.device)
    world = distributed.join(config.distributed) if distributed.launched_by_torchrun() else None
    try:
        table, train_seconds, model = train_and_evaluate(config, run_dir, resume,
                                                         overwrite=overwrite)
    finally:
        distributed.leave()
    if world is not None and not world.is_main:
        return
    print(format_table(table, model.tasks))
    print(f"training wall time: {train_seconds / 60:.1f} min; best model: {run_dir / 'best'}; "
          f"predictions: {run_dir / 'predictions'}")
    if any(t.preset == "quora" for t in config.tasks) and "minilm" in config.model.backbone:
        print(QUORA_NOTE)
    from mtbert.experiments.report import write_report
    print(f"report: {write_report(run_dir)}")


def _without_nproc(argv: list[str]) -> list[str]:
    """`argv` less its `--nproc N` (or `--nproc=N`)."""
    out, skip = [], False
    for arg in argv:
        if skip or arg.startswith("--nproc="):
            skip = False
            continue
        skip = arg == "--nproc"
        if not skip:
            out.append(arg)
    return out


def _load(args: argparse.Namespace):
    from mtbert.model_folder import load_model

    model, tokenizer, config = load_model(args.run_dir)
    if args.data_dir:
        config.data_dir = args.data_dir
    if args.dtype == "bf16":
        from mtbert.inference import to_bf16

        model = to_bf16(model)
    return model, tokenizer, config


def cmd_evaluate(args: argparse.Namespace) -> None:
    from mtbert.evaluation import evaluate_splits, format_table

    model, tokenizer, config = _load(args)
    print(format_table(evaluate_splits(model, tokenizer, config, args.splits), model.tasks))


def cmd_predict(args: argparse.Namespace) -> None:
    from mtbert.evaluation import evaluate_splits

    if args.task or args.input:
        return predict_file(args)
    model, tokenizer, config = _load(args)
    out = args.out or args.run_dir / "predictions"
    evaluate_splits(model, tokenizer, config, args.splits, out)
    print(f"predictions written to {out}")


def predict_file(args: argparse.Namespace) -> None:
    """`mtbert predict RUN --task T --input FILE|-`: rows in, predictions out, streamed."""
    from mtbert.api import load

    if not (args.task and args.input):
        raise ConfigError("file mode needs both --task and --input (FILE or - for stdin)")
    model = load(args.run_dir, quantize=args.quantize, batch_size=args.batch_size,
                 dtype=args.dtype)
    report = model.predict_file(
        args.task, args.input, args.output, text_columns=args.text_columns,
        id_column=args.id_column, input_format=args.input_format,
        output_format=args.output_format, probabilities=args.probabilities, progress=True)
    skipped = (f"; {len(report.skipped)} malformed rows skipped (first: {args.input}:"
               f"{report.skipped[0][0]}: {report.skipped[0][1]})" if report.skipped else "")
    print(f"{report.rows} rows predicted in {report.seconds:.1f} s "
          f"({report.rows / max(report.seconds, 1e-9):.0f} rows/s) -> {args.output}{skipped}",
          file=sys.stderr)


def cmd_serve(args: argparse.Namespace) -> None:
    from mtbert.api import load

    key = None
    if args.api_key_env:
        key = os.environ.get(args.api_key_env, "")
        if not key.strip():
            raise ConfigError(f"--api-key-env {args.api_key_env}: that environment variable "
                              "is not set or empty")
    settings = ServeSettings(max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
                             max_queue=args.max_queue, max_inputs=args.max_inputs,
                             max_chars=args.max_chars,
                             request_timeout_s=args.request_timeout_s, api_key=key)
    if not args.run_dir.is_dir():
        raise ConfigError(f"{args.run_dir}: no such folder")
    try:
        from mtbert.serving.app import serve
    except ImportError as error:
        raise ConfigError(f"serving needs the serve extra: pip install 'mtbert[serve]' "
                          f"({error})") from None
    serve(lambda: load(args.run_dir, quantize=args.quantize), settings, args.host, args.port)


def cmd_export(args: argparse.Namespace) -> None:
    from mtbert.export import export

    exported = export(args.run_dir, args.out, args.export_format, args.quantize, args.task,
                      args.overwrite)
    for task, difference in exported.differences.items():
        print(f"{task}: max |ONNX - PyTorch| output difference {difference:.2e}")
    print(f"exported ({args.export_format}) to {exported.folder}; model card: "
          f"{exported.folder / 'README.md'}")


def cmd_data(args: argparse.Namespace) -> None:
    from mtbert.data.download import check, download
    from mtbert.data.readers import DataError

    if args.data_command == "download":
        for line in download(args.dest, args.mirror, overwrite=args.overwrite):
            print(line)
        print(f"task files in {args.dest}")
        return
    if args.data_command == "cache":
        _data_cache(args.cache_dir, args.prune)
        return
    results = check(args.folder, args.tasks)
    for result in results:
        print("\n".join(result.lines(args.folder)))
    problems = [r for r in results if r.problem]
    if problems:
        raise DataError(f"{len(problems)} of {len(results)} task files are missing or "
                        f"unreadable in {args.folder}: " + ", ".join(r.name for r in problems))
    others = [r.name for r in results if r.standard is False]
    if others:
        print(f"{len(results)} task files readable in {args.folder}; {len(others)} of them "
              f"are not the standard files: {', '.join(others)}")
    else:
        print(f"{len(results)} task files ok in {args.folder}")


def _data_cache(folder: Path | None, prune_days: float | None) -> None:
    import time

    from mtbert.data.cache import cache_root, entries, prune

    root = cache_root(str(folder) if folder else None)
    listed = prune(root, prune_days) if prune_days is not None else entries(root)
    for entry in listed:
        used = time.strftime("%Y-%m-%d %H:%M", time.localtime(entry.last_used))
        print(f"{entry.folder.name}  {entry.bytes / 2**20:8.1f} MiB  last used {used}")
    total = sum(e.bytes for e in listed) / 2**20
    if prune_days is None:
        print(f"{len(listed)} entries, {total:.1f} MiB in {root}")
    else:
        print(f"removed {len(listed)} entries ({total:.1f} MiB) unused for {prune_days:g} days "
              f"from {root}; {len(entries(root))} left")


def cmd_ablate(args: argparse.Namespace) -> None:
    from mtbert.experiments.ablation import AblationError, plan_runs, plan_table, run_ablation

    configs = [i for i in args.items if "=" not in i or Path(i).is_file()]
    overrides = [i for i in args.items if i not in configs]
    if args.plan:
        print(plan_table(plan_runs(configs, args.budget, args.seeds, args.out, args.data_dir,
                                   overrides, args.single_task, args.merge,
                                   args.two_stage)))
        return
    configure_process()
    outcome = run_ablation(configs, args.budget, args.seeds, args.out, args.data_dir,
                           overrides, report=args.report, tensorboard=args.tensorboard,
                           single_task=args.single_task, merges=args.merge,
                           two_stage=args.two_stage)
    print(outcome.files["md"].read_text(encoding="utf-8"))
    print(f"{len(outcome.trained)} runs trained, {len(outcome.skipped)} already finished; "
          f"results: {', '.join(str(p) for p in outcome.files.values())}")
    if outcome.failed:
        raise AblationError(
            f"{len(outcome.failed)} of {len(outcome.runs)} runs failed (traceback in their "
            "error.txt; re-run the command to retry them): "
            + "; ".join(f"{run.run_dir}: {message}" for run, message in outcome.failed))


def cmd_affinity(args: argparse.Namespace) -> None:
    from mtbert.experiments.ablation import AblationError
    from mtbert.experiments.affinity import run_affinity

    configs = [i for i in args.items if "=" not in i or Path(i).is_file()]
    if len(configs) != 1:
        raise ConfigError(f"affinity: name one config file, got {configs or 'none'}")
    configure_process()
    outcome = run_affinity(configs[0], args.budget, args.seeds, args.out, args.data_dir,
                           [i for i in args.items if i not in configs], args.every,
                           args.groups, args.report, "mtbert " + " ".join(args.argv))
    print(outcome.files["md"].read_text(encoding="utf-8"))
    print(f"results: {', '.join(str(p) for p in outcome.files.values())}")
    if outcome.failed:
        raise AblationError(f"{len(outcome.failed)} runs failed (traceback in their error.txt; "
                            "re-run the command to retry them): " + "; ".join(outcome.failed))


def cmd_merge(args: argparse.Namespace) -> None:
    from mtbert.merging import merge_runs

    model = merge_runs(args.runs, args.method, args.out, args.scale, args.density,
                       args.overwrite)
    print(f"merged {len(args.runs)} runs ({args.method}) into {args.out}: tasks "
          f"{', '.join(model.tasks)}; score it with: mtbert evaluate {args.out}")


def cmd_report(args: argparse.Namespace) -> None:
    from mtbert.experiments.report import TensorBoardUnavailable, write_report, write_tensorboard

    page = write_report(args.run_dir, args.data_dir, args.max_examples, args.overwrite)
    print(f"report: {page}")
    if args.tensorboard:
        try:
            print(f"tensorboard: {write_tensorboard(args.run_dir, args.overwrite)}")
        except TensorBoardUnavailable as error:
            print(f"mtbert report: {error}", file=sys.stderr)


COMMANDS = {"train": cmd_train, "evaluate": cmd_evaluate, "predict": cmd_predict,
            "ablate": cmd_ablate, "report": cmd_report, "serve": cmd_serve, "export": cmd_export,
            "data": cmd_data, "merge": cmd_merge, "distill": cmd_distill,
            "affinity": cmd_affinity}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    from mtbert.checkpoint import CorruptCheckpointError, OutputError, RunFolderError
    from mtbert.data.readers import DataError
    from mtbert.export import ExportError
    from mtbert.model.loading import CheckpointError
    from mtbert.training import TrainingError

    try:
        COMMANDS[args.command](args)
    except (ConfigError, DataError, CheckpointError, CorruptCheckpointError, TrainingError,
            RunFolderError, ExportError, OutputError,
            OSError) as error:  # OSError: unusable file/folder
        print(f"mtbert {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
