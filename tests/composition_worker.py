"""The 2-process cells of the composition matrix (tests/composition.py), in one torchrun job:
each technique's run trained, checked and resumed on 2 ranks, a task added and a task
fine-tuned under 2 ranks; rank 0 writes each outcome to OUT/ddp-results.json.

    torchrun --standalone --nproc-per-node 2 tests/composition_worker.py SPEC.json
"""

import json
import sys
import traceback
from pathlib import Path

from composition import Refused, Setup, train_checked

from mtbert import distributed
from mtbert.config import DistributedConfig


def main(spec_file: str) -> None:
    spec = json.loads(Path(spec_file).read_text())
    setup = Setup(Path(spec["backbone"]), Path(spec["data"]), Path(spec["work"]))
    world = distributed.join(DistributedConfig(backend="gloo", timeout_s=60))
    results = {}
    try:
        for name in spec["techniques"]:
            techniques = (name,) if name else ()
            try:
                if name == "add_task":
                    config, techniques = setup.added_task_config((), ("processes", "add_task")), ()
                elif name == "finetune":  # from the plain run trained above
                    config, techniques = setup.finetune_config(
                        setup.work / "ddp-base", (), ("processes", "finetune")), ()
                else:
                    config = setup.config(techniques)
                results[name] = {"checked": train_checked(
                    config, setup.work / f"ddp-{name or 'base'}", list(techniques))}
            except Refused as refused:
                results[name] = {"refused": str(refused)}
            except Exception:  # the cell fails with it
                results[name] = {"error": traceback.format_exc()}
    finally:
        if world.is_main:
            (setup.work / "ddp-results.json").write_text(json.dumps(results))
        distributed.leave()


if __name__ == "__main__":
    main(*sys.argv[1:])
