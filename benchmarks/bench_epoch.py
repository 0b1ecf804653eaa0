"""Wall time of one multitask training epoch of a config (default: configs/default.yaml).

    python benchmarks/bench_epoch.py [--config configs/default.yaml] [--steps N]
        [--set KEY=VALUE ...] [--threads N] [--backbone DIR] [--data-dir DIR] [--smoke]

Builds `Trainer(config, tmpdir)` (setup, which reads and tokenizes the data, is timed apart)
and times `trainer.train_step()` for a whole epoch, `trainer.sampler.steps_per_epoch()` steps,
or for the first `--steps N` steps, extrapolated to the epoch. No evaluation, no checkpoints.
Prints steps per epoch, measured and extrapolated time, steps/s and real tokens/s.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from mtbert.config import load_config
from mtbert.cpu import configure_process
from mtbert.training import Trainer

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data"


def duration(seconds: float) -> str:
    minutes, seconds = divmod(seconds, 60)
    return f"{int(minutes)} min {seconds:04.1f} s" if minutes else f"{seconds:.2f} s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "default.yaml")
    parser.add_argument("--steps", type=int, default=None,
                        help="time this many steps and extrapolate (default: the whole epoch)")
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
        args.steps = 2
        overrides.append("model.max_length=32")
    if args.threads:
        overrides.append(f"train.threads={args.threads}")
    config = load_config(args.config, overrides, data_dir=str(args.data_dir))

    configure_process(config.train.threads, config.train.device)  # as `mtbert train` does
    with tempfile.TemporaryDirectory() as run_dir:
        start = time.perf_counter()
        trainer = Trainer(config, run_dir)
        setup_s = time.perf_counter() - start
        epoch_steps = trainer.sampler.steps_per_epoch()
        steps = min(args.steps or epoch_steps, epoch_steps)
        tokens = 0
        start = time.perf_counter()
        for step in range(1, steps + 1):
            tokens += trainer.train_step()["tokens"]
            if step % 50 == 0:
                elapsed = time.perf_counter() - start
                print(f"  step {step}/{steps}, {duration(elapsed)}", file=sys.stderr, flush=True)
        measured_s = time.perf_counter() - start

    tasks = ", ".join(f"{t.name} ({len(trainer.data[t.name].train)})" for t in config.tasks)
    print(f"epoch: {args.config.name}, tasks {tasks}, sampler {config.train.sampler}, "
          f"batch {config.train.batch_size}, threads {torch.get_num_threads()}")
    print(f"setup (load backbone, read and tokenize data, not timed below): {duration(setup_s)}\n")
    rows = [("steps per epoch", f"{epoch_steps}"),
            ("steps timed", f"{steps}"),
            ("measured time", duration(measured_s)),
            ("epoch time" + (" (extrapolated)" if steps < epoch_steps else ""),
             duration(measured_s * epoch_steps / steps)),
            ("steps/s", f"{steps / measured_s:.2f}"),
            ("real tokens/s", f"{tokens / measured_s:.0f}")]
    print("| quantity | value |\n|---|---|")
    print("\n".join(f"| {name} | {value} |" for name, value in rows))


if __name__ == "__main__":
    main()
