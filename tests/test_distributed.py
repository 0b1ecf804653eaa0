"""DDP on CPUs (gloo, 2 processes started by torchrun on 127.0.0.1): 2 ranks with batch B
train exactly like 1 process with batch 2B, for every technique; a killed rank stops the
job, and --resume ends with the weights of an uninterrupted run."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mtbert.data.batching import TaskStream
from mtbert.training import Trainer

from conftest import SIAMESE_HEADS, tiny_config

TESTS = Path(__file__).resolve().parent
PER_RANK_BATCH = 8
STEPS = 5
# Dropout off and a small learning rate: AdamW's first steps move every weight by about
# lr * sign(g), so a weight whose true gradient is ~0 would magnify rounding noise.
COMMON = [*SIAMESE_HEADS, *(f"tasks.{t}.head.dropout=0" for t in ("sst", "quora", "sts")),
          "train.lr=1e-4", "train.head_lr=1e-4", f"train.max_steps={STEPS}"]
TECHNIQUES = {
    "sum": ["train.sampler=proportional"],  # one task per step: DDP finds the unused heads
    "pcgrad": ["train.combiner=pcgrad"],
    "uncertainty": ["train.weighting=uncertainty", "train.weighting_lr=0.1"],
    "gradnorm": ["train.weighting=gradnorm", "train.weighting_lr=0.1"],
    "mnrl": ["tasks.sts.mnrl={rule: label, start: 2.5}", "tasks.quora.mnrl={rule: label, "
             "start: 0.5}"],
}


def torchrun(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo",
           "PYTHONPATH": os.pathsep.join([str(TESTS.parent / "src"), str(TESTS)])}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc-per-node", "2", "--master-addr", "127.0.0.1", *args],
                          env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def two_rank_runs(tiny_backbone, tiny_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ddp")
    spec = {"backbone": str(tiny_backbone), "data": str(tiny_data), "steps": STEPS,
            "techniques": {name: [*COMMON, *overrides, f"train.batch_size={PER_RANK_BATCH}"]
                           for name, overrides in TECHNIQUES.items()}}
    (out / "spec.json").write_text(json.dumps(spec))
    done = torchrun(str(TESTS / "ddp_worker.py"), str(out / "spec.json"), str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    return out


@pytest.mark.parametrize("technique", TECHNIQUES)
def test_two_ranks_train_like_one_process_with_twice_the_batch(
        technique, two_rank_runs, tiny_backbone, tiny_data, tmp_path):
    config = tiny_config(tiny_backbone, tiny_data, *COMMON, *TECHNIQUES[technique],
                         batch_size=2 * PER_RANK_BATCH)
    trainer = Trainer(config, tmp_path / "run")
    logged = [trainer.train_step() for _ in range(STEPS)]
    ranks = torch.load(two_rank_runs / f"{technique}.pt", weights_only=True)
    for one, two in zip(logged, ranks["logged"], strict=True):
        assert one.keys() == two.keys()
        for key in one:
            assert two[key] == pytest.approx(one[key], abs=1e-5, rel=1e-5), key
    if technique == "mnrl":
        assert any(step["sts/mnrl"] > 0 for step in logged)
    expected = trainer.model.state_dict()
    assert expected.keys() == ranks["model"].keys()
    for key, value in expected.items():
        torch.testing.assert_close(ranks["model"][key], value, atol=1e-5, rtol=0, msg=key)
    assert ranks["weights"] == pytest.approx(trainer.weighting.weights(), abs=1e-5)
    # Sharded evaluation, gathered: the scores of the whole dev sets.
    assert ranks["dev"] == pytest.approx(trainer.evaluate("dev"), abs=1e-4)


def test_rank_slices_are_the_one_process_batch(tiny_backbone, tiny_data):
    """Each rank's slice is disjoint from the other's; together they are the batch of one
    process with the global batch size, through epoch boundaries."""
    config = tiny_config(tiny_backbone, tiny_data, batch_size=2 * PER_RANK_BATCH, max_steps=1)
    split = Trainer(config, "unused").data["sts"].train
    single = TaskStream("sts", split, 2 * PER_RANK_BATCH, seed=3, pad_id=0)
    ranks = [TaskStream("sts", split, PER_RANK_BATCH, seed=3, pad_id=0, rank=r, world_size=2)
             for r in range(2)]
    for _ in range(3 * len(single)):
        parts = [stream.next().rows.numpy() for stream in ranks]
        assert not set(parts[0]) & set(parts[1])
        np.testing.assert_array_equal(np.sort(np.concatenate(parts)),
                                      np.sort(single.next().rows.numpy()))
