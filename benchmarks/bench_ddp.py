"""Training throughput on several processes: 1 process x C threads vs N processes (DDP, gloo)
x C/N threads each, on the same global batches.

    python benchmarks/bench_ddp.py [--config configs/default.yaml] [--nproc 2] [--cores 2]
        [--steps 30] [--warmup 5] [--repeats 2] [--set KEY=VALUE ...] [--backbone DIR]
        [--data-dir DIR] [--smoke]

The config's batch sizes are the global ones: the single process trains with them, each of
the N ranks with 1/N of them (`torchrun --standalone --nproc-per-node N`), so both sides
draw the same examples at every step (same seed, the same global batch plan) and do the same
optimizer steps. Each contender is a fresh process group (setup and `--warmup` steps are not
timed); the `--steps` steps that follow are timed between two barriers. The contenders
alternate, `--repeats` times each, the order flipping every repeat. Prints one row per run,
the median steps/s of each side and the median of the paired ratios (N processes / 1 process
within a repeat, robust to slow drifts in machine load); examples/s and real tokens/s count
the global batch; "gradient all-reduce alone" times one gloo all-reduce of as many values as
the model has trainable parameters, after the timed steps.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data"


def per_rank_overrides(config_path: Path, overrides: list[str], nproc: int,
                       data_dir: Path) -> list[str]:
    """Overrides that divide every batch size of the config by `nproc`."""
    from mtbert.config import load_config

    config = load_config(config_path, overrides, data_dir=str(data_dir))
    sizes = [("train.batch_size", config.train.batch_size)]
    sizes += [(f"tasks.{t.name}.batch_size", t.batch_size) for t in config.tasks if t.batch_size]
    for key, size in sizes:
        if size % nproc:
            raise SystemExit(f"{key} = {size} is not divisible by {nproc} processes")
    return [*overrides, *(f"{key}={size // nproc}" for key, size in sizes)]


def worker(args: argparse.Namespace) -> None:
    """One contender's process (or one rank of it): setup, warm-up, timed steps."""
    import torch

    from mtbert import distributed
    from mtbert.config import load_config
    from mtbert.cpu import configure_process
    from mtbert.training import Trainer

    config = load_config(args.config, args.overrides, data_dir=str(args.data_dir))
    configure_process(config.train.threads, config.train.device)
    world = distributed.join(config.distributed) if distributed.launched_by_torchrun() else None
    try:
        with tempfile.TemporaryDirectory() as run_dir:
            trainer = Trainer(config, run_dir)
            for _ in range(args.warmup):
                trainer.train_step()
            barrier = torch.distributed.barrier if world else (lambda: None)
            barrier()
            tokens, examples = 0, 0
            before = dict(trainer.state.examples_seen)
            start = time.perf_counter()
            for _ in range(args.steps):
                tokens += trainer.train_step()["tokens"]
            barrier()
            seconds = time.perf_counter() - start
            examples = sum(trainer.state.examples_seen.values()) - sum(before.values())
            all_reduce_s = time_all_reduce(trainer.model) if world else 0.0
        if world is None or world.is_main:
            print("RESULT " + json.dumps({
                "processes": world.size if world else 1, "threads": torch.get_num_threads(),
                "seconds": seconds, "steps_per_s": args.steps / seconds,
                "examples_per_s": examples / seconds, "tokens_per_s": tokens / seconds,
                "all_reduce_s": all_reduce_s, "parameters": sum(
                    p.numel() for p in trainer.model.parameters() if p.requires_grad)}),
                flush=True)
    finally:
        distributed.leave()


def time_all_reduce(model, repeats: int = 5) -> float:
    """Median seconds of one all-reduce of as many values as the model has trainable
    parameters: the least gradient traffic a DDP step adds."""
    import torch

    flat = torch.zeros(sum(p.numel() for p in model.parameters() if p.requires_grad))
    times = []
    for _ in range(repeats):
        torch.distributed.barrier()
        start = time.perf_counter()
        torch.distributed.all_reduce(flat)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run(args: argparse.Namespace, nproc: int) -> dict:
    threads = args.cores // nproc
    overrides = per_rank_overrides(args.config, args.overrides, nproc, args.data_dir)
    overrides.append(f"train.threads={threads}")
    script = [str(Path(__file__).resolve()), "--worker", "--config", str(args.config),
              "--data-dir", str(args.data_dir), "--steps", str(args.steps), "--warmup",
              str(args.warmup), "--set", *overrides]
    launcher = ([sys.executable] if nproc == 1 else
                [sys.executable, "-m", "torch.distributed.run", "--standalone",
                 "--nproc-per-node", str(nproc)])
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "GLOO_SOCKET_IFNAME": "lo",
           "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([*launcher, *script], env=env, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"{nproc} process(es) failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "default.yaml")
    parser.add_argument("--nproc", type=int, default=2, help="processes of the DDP side")
    parser.add_argument("--cores", type=int, default=os.cpu_count(),
                        help="threads of the single process, split among the N processes")
    parser.add_argument("--steps", type=int, default=30, help="timed steps")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--set", dest="overrides", nargs="*", default=[], metavar="KEY=VALUE",
                        help="config overrides, e.g. train.batch_size=64")
    parser.add_argument("--backbone", default=None, help="overrides model.backbone")
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--smoke", action="store_true", help="2 steps, short sequences")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.smoke:
        args.steps, args.warmup, args.repeats = 2, 1, 1
        args.overrides.append("model.max_length=32")
    if args.backbone:
        args.overrides.append(f"model.backbone={args.backbone}")
    if args.worker:
        return worker(args)

    results: dict[int, list[dict]] = {1: [], args.nproc: []}
    print(f"{args.config.name}: {args.warmup} warm-up + {args.steps} timed steps, "
          f"global batch as configured; 1 process x {args.cores} thread(s) vs {args.nproc} "
          f"processes x {args.cores // args.nproc} thread(s)\n")
    print("| processes x threads | seconds | steps/s | examples/s | real tokens/s | gradient "
          "all-reduce alone |")
    print("|---|---|---|---|---|---|")
    for repeat in range(args.repeats):
        for nproc in ((1, args.nproc) if repeat % 2 == 0 else (args.nproc, 1)):
            r = run(args, nproc)
            results[nproc].append(r)
            reduce_ms = f"{1000 * r['all_reduce_s']:.0f} ms" if nproc > 1 else "-"
            print(f"| {r['processes']} x {r['threads']} | {r['seconds']:.1f} | "
                  f"{r['steps_per_s']:.2f} | {r['examples_per_s']:.1f} | "
                  f"{r['tokens_per_s']:.0f} | "
                  f"{reduce_ms} |", flush=True)
    single, several = (statistics.median(r["steps_per_s"] for r in results[n])
                       for n in (1, args.nproc))
    ratios = [b["steps_per_s"] / a["steps_per_s"]
              for a, b in zip(results[1], results[args.nproc], strict=True)]
    print(f"\ntrainable parameters (values per gradient all-reduce): {r['parameters']:,}")
    print(f"median steps/s: 1 process {single:.2f}, {args.nproc} processes {several:.2f}; "
          f"paired ratios {', '.join(f'{r:.2f}' for r in ratios)}, median "
          f"{statistics.median(ratios):.2f}x")


if __name__ == "__main__":
    main()
