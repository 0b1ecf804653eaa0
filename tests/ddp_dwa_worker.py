"""One rank of test_distributed.py's DWA resume check (started by torchrun): each rank sees
its own losses; a run resumed mid-epoch from rank 0's state (what a checkpoint holds) must end
with the weights of the uninterrupted run, on every rank. Exits non-zero if not.

    torchrun --standalone --nproc-per-node 2 tests/ddp_dwa_worker.py
"""

import torch

from mtbert import distributed
from mtbert.balancing.dwa import DynamicWeightAverage
from mtbert.config import DistributedConfig

STEPS_PER_EPOCH, EPOCHS, RESUME_AT = 3, 3, 4  # step 4: mid-epoch 2


def train(dwa: DynamicWeightAverage, rank: int, steps: range) -> None:
    for step in steps:
        dwa({"a": torch.tensor(1.0 + rank + 0.3 * step),  # the ranks' losses differ
             "b": torch.tensor(2.0 / (1 + rank) - 0.1 * step)}, [])
        dwa.after_optimizer_step()
        if (step + 1) % STEPS_PER_EPOCH == 0:
            dwa.on_epoch_end()


def main() -> None:
    world = distributed.join(DistributedConfig(backend="gloo", timeout_s=60))
    try:
        total = range(STEPS_PER_EPOCH * EPOCHS)
        straight = DynamicWeightAverage(["a", "b"])
        train(straight, world.rank, total)
        interrupted = DynamicWeightAverage(["a", "b"])
        train(interrupted, world.rank, total[:RESUME_AT])
        saved = [interrupted.state_dict() if world.is_main else None]
        torch.distributed.broadcast_object_list(saved)  # rank 0 saves, every rank loads
        resumed = DynamicWeightAverage(["a", "b"])
        resumed.load_state_dict(saved[0])
        train(resumed, world.rank, total[RESUME_AT:])
        assert straight.weights() != {"a": 1.0, "b": 1.0}, "DWA never acted"
        assert resumed.weights() == straight.weights(), (world.rank, resumed.weights(),
                                                         straight.weights())
    finally:
        distributed.leave()


if __name__ == "__main__":
    main()
