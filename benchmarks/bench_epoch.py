"""Wall time of one multitask training epoch of a config (default: configs/default.yaml),
in fp32 and bf16 side by side.

    python benchmarks/bench_epoch.py [--config configs/default.yaml] [--steps N] [--block 10]
        [--precisions fp32 bf16] [--profile N] [--set KEY=VALUE ...] [--threads N]
        [--backbone DIR] [--data-dir DIR] [--smoke]

Builds one `Trainer(config, tmpdir)` per precision (`train.precision` set to it; setup, which
reads and tokenizes the data, is timed apart) and times `trainer.train_step()` in alternating
blocks of `--block` steps (the order flips every block), for a whole epoch per precision,
`trainer.sampler.steps_per_epoch()` steps, or for the first `--steps N` steps, extrapolated to
the epoch. Every trainer has the same seed, so block i of each precision trains on the same
batches. No evaluation, no checkpoints. Prints per precision the steps per epoch, measured and
extrapolated time, steps/s and real tokens/s, the median paired ratio of tokens/s to the
first precision, and the GEMM-bound limit of this machine (see `bench_train.gemm_limit_lines`).

`--profile N` then runs N more steps per precision under `torch.profiler` and splits each
step's self CPU time into matrix products (`MATRIX_PRODUCTS`) and everything else, with the
largest other operators: the rest does not shrink with bf16's faster matrix units, so it
bounds the bf16 / fp32 ratio (printed: the ratio with free bf16 matrix products, and the rest
a step may take for a target ratio).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from bench_train import gemm_limit_lines, markdown_table

from mtbert.config import load_config
from mtbert.cpu import configure_process
from mtbert.training import Trainer

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data"


MATRIX_PRODUCTS = frozenset({"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"})


def duration(seconds: float) -> str:
    minutes, seconds = divmod(seconds, 60)
    return f"{int(minutes)} min {seconds:04.1f} s" if minutes else f"{seconds:.2f} s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "default.yaml")
    parser.add_argument("--steps", type=int, default=None,
                        help="time this many steps and extrapolate (default: the whole epoch)")
    parser.add_argument("--block", type=int, default=10, help="steps per timed block")
    parser.add_argument("--precisions", nargs="+", choices=["fp32", "bf16"],
                        default=["fp32", "bf16"])
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="then profile N more steps per precision (matrix products vs rest)")
    parser.add_argument("--set", dest="overrides", nargs="*", default=[], metavar="KEY=VALUE",
                        help="config overrides, e.g. train.batch_size=16")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--backbone", default=None, help="overrides model.backbone")
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--smoke", action="store_true", help="2 steps, short sequences")
    args = parser.parse_args()
    overrides = list(args.overrides)
    if args.backbone:
        overrides.append(f"model.backbone={args.backbone}")
    if args.smoke:
        args.steps, args.block = 2, 1
        overrides.append("model.max_length=32")
    if args.threads:
        overrides.append(f"train.threads={args.threads}")
    configs = {name: load_config(args.config, [*overrides, f"train.precision={name}"],
                                 data_dir=str(args.data_dir)) for name in args.precisions}
    config = configs[args.precisions[0]]

    configure_process(config.train.threads, config.train.device)  # as `mtbert train` does
    with tempfile.TemporaryDirectory() as run_dir:
        start = time.perf_counter()
        trainers = {name: Trainer(c, Path(run_dir) / name) for name, c in configs.items()}
        setup_s = (time.perf_counter() - start) / len(trainers)
        trainer = trainers[args.precisions[0]]
        epoch_steps = trainer.sampler.steps_per_epoch()
        steps = min(args.steps or epoch_steps, epoch_steps)
        blocks: dict[str, list[tuple[int, float]]] = {name: [] for name in trainers}
        for index, first in enumerate(range(0, steps, args.block)):
            order = list(trainers) if index % 2 == 0 else list(trainers)[::-1]
            for name in order:
                tokens, start = 0, time.perf_counter()
                for _ in range(min(args.block, steps - first)):
                    tokens += trainers[name].train_step()["tokens"]
                blocks[name].append((tokens, time.perf_counter() - start))
            print(f"  step {first + args.block}/{steps}", file=sys.stderr, flush=True)
        profile = profile_lines(trainers, args.profile) if args.profile else []

    tasks = ", ".join(f"{t.name} ({len(trainer.data[t.name].train)})" for t in config.tasks)
    print(f"epoch: {args.config.name}, tasks {tasks}, sampler {config.train.sampler}, "
          f"batch {config.train.batch_size}, threads {torch.get_num_threads()}, "
          f"{steps} steps per precision in alternating blocks of {args.block}")
    print(f"setup (load backbone, read and tokenize data, not timed below): {duration(setup_s)} "
          f"per trainer\n")
    speed = {name: sum(t for t, _ in runs) / sum(s for _, s in runs)
             for name, runs in blocks.items()}
    rows = [("steps per epoch", *(f"{epoch_steps}" for _ in blocks)),
            ("steps timed", *(f"{steps}" for _ in blocks)),
            ("measured time", *(duration(sum(s for _, s in runs)) for runs in blocks.values())),
            ("epoch time" + (" (extrapolated)" if steps < epoch_steps else ""),
             *(duration(sum(s for _, s in runs) * epoch_steps / steps)
               for runs in blocks.values())),
            ("steps/s", *(f"{steps / sum(s for _, s in runs):.2f}" for runs in blocks.values())),
            ("real tokens/s", *(f"{speed[name]:.0f}" for name in blocks))]
    print(markdown_table(["quantity", *blocks], [list(row) for row in rows]))
    base = args.precisions[0]
    for name in args.precisions[1:]:
        ratios = [(t / s) / (tb / sb) for (t, s), (tb, sb) in zip(blocks[name], blocks[base])]
        print(f"\n{name} / {base} real tokens/s: {speed[name] / speed[base]:.2f}x overall, "
              f"median of {len(ratios)} paired blocks {statistics.median(ratios):.2f}x "
              f"(per block: {', '.join(f'{r:.2f}' for r in ratios)})")
    lengths = np.concatenate([d.train.lengths() / (2 if d.train.pair_index is not None else 1)
                              for d in trainer.data.values()])
    print("\n".join(["", *gemm_limit_lines(trainer.model.encoder.config, float(lengths.mean()),
                                           True, speed)]))
    if profile:
        print("\n".join(["", *profile]))


def profile_split(trainer: Trainer, steps: int) -> tuple[float, dict[str, float]]:
    """Self CPU milliseconds per step in matrix products, and per other operator."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            trainer.train_step()
    per_op = {event.key: event.self_cpu_time_total / 1e3 / steps for event in prof.key_averages()}
    products = sum(ms for op, ms in per_op.items() if op in MATRIX_PRODUCTS)
    return products, {op: ms for op, ms in per_op.items() if op not in MATRIX_PRODUCTS}


def profile_lines(trainers: dict[str, Trainer], steps: int, target: float = 1.8) -> list[str]:
    split = {name: profile_split(trainer, steps) for name, trainer in trainers.items()}
    rows = []
    for name, (products, others) in split.items():
        rest = sum(others.values())
        top = sorted(others.items(), key=lambda item: -item[1])[:6]
        rows.append([name, f"{products:.1f} ms ({products / (products + rest):.0%})",
                     f"{rest:.1f} ms", ", ".join(f"{op} {ms:.1f}" for op, ms in top)])
    lines = [f"profile: {steps} more steps per precision, self CPU time per step "
             "(torch.profiler; it adds its own overhead to every operator)", "",
             markdown_table(["precision", "matrix products", "everything else",
                             "largest others"], rows)]
    if {"fp32", "bf16"} <= split.keys():
        (f_products, f_others), (b_products, b_others) = split["fp32"], split["bf16"]
        fp32_step, b_rest = f_products + sum(f_others.values()), sum(b_others.values())
        bf16_step = b_products + b_rest
        lines += ["", f"bf16 / fp32 from these step times: {fp32_step / bf16_step:.2f}x; with "
                      "free bf16 matrix products and the rest as it is: at most "
                      f"{fp32_step / b_rest:.2f}x; {target}x needs bf16's rest under "
                      f"{fp32_step / target - b_products:.1f} ms a step (now {b_rest:.1f})"]
    return lines


if __name__ == "__main__":
    main()
