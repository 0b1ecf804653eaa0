"""One rank of the 2-process runs of test_distributed.py (started by torchrun): trains the
tiny model with each technique for a few steps, scores it on dev (sharded), and rank 0
saves what the test compares.

    torchrun --standalone --nproc-per-node 2 tests/ddp_worker.py SPEC.json OUT_DIR
"""

import json
import sys
from pathlib import Path

import torch

from mtbert import distributed
from mtbert.config import DistributedConfig
from mtbert.training import Trainer

from conftest import tiny_config


def main(spec_file: str, out: str) -> None:
    spec = json.loads(Path(spec_file).read_text())
    world = distributed.join(DistributedConfig(backend="gloo", timeout_s=60))
    try:
        for name, overrides in spec["techniques"].items():
            config = tiny_config(Path(spec["backbone"]), Path(spec["data"]), *overrides)
            trainer = Trainer(config, Path(out) / name)
            logged = [trainer.train_step() for _ in range(spec["steps"])]
            dev = trainer.evaluate("dev")
            if world.is_main:
                torch.save({"logged": logged, "dev": dev, "model": trainer.model.state_dict(),
                            "weights": trainer.weighting.weights()}, Path(out) / f"{name}.pt")
    finally:
        distributed.leave()


if __name__ == "__main__":
    main(*sys.argv[1:])
