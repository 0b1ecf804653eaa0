"""Per-step losses and gradient norms of a config's first steps, as JSON: the check that a
refactor leaves training unchanged, bit for bit on CPU.

    python benchmarks/first_steps.py --out after.json
    git worktree add /tmp/before REV
    (cd /tmp/before && PYTHONPATH=src python /path/to/benchmarks/first_steps.py --out before.json)
    cmp before.json after.json

Works against versions whose `Trainer` set the thread count and allocator itself (before
`cpu.configure_process` existed).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from mtbert.config import load_config
from mtbert.training import Trainer

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/default.yaml")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    try:
        from mtbert.cpu import configure_process
    except ImportError:  # an older mtbert: its Trainer configured the process
        configure_process = None
    config = load_config(args.config, [f"train.max_steps={args.steps}"],
                         data_dir=str(args.data_dir))
    if configure_process is not None:
        configure_process(config.train.threads, config.train.device)
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(config, run_dir)
        steps = [{k: v for k, v in trainer.train_step().items()
                  if k.endswith("loss") or k == "grad_norm"} for _ in range(args.steps)]
    args.out.write_text(json.dumps(steps, indent=0), encoding="utf-8")
    print(f"{len(steps)} steps -> {args.out}")


if __name__ == "__main__":
    main()
