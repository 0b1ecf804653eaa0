"""DDP on CPUs (gloo, 2 processes started by torchrun on 127.0.0.1): with dropout off, 2 ranks
with batch B train exactly like 1 process with batch 2B, for every technique (with dropout on
each rank draws its own masks: README says so); a killed rank stops the job, and --resume
ends with the weights of an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from mtbert.config import load_config
from mtbert.data.batching import TaskStream
from mtbert.training import Trainer, TrainingError

from conftest import SIAMESE_HEADS, tiny_config, wait_for_checkpoint

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
    # DDP stays out of the first micro-step's backward (no_sync), averages in the second's
    "accumulation": ["train.sampler=proportional", "train.grad_accumulation=2"],
    # SMART's proximal term (its mentor runs outside DDP's forward) and a weight average
    "proximal": ["train.regularizers=[{name: smart_proximal, weight: 10, options: "
                 "{decay: 0.5}}]", "train.weight_average={method: ema, decay: 0.5}"],
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


def test_dwa_resumed_from_rank_0s_state_ends_like_an_uninterrupted_run():
    """Each rank sees its own losses; every rank holds the same DWA state (the step's loss
    sums are averaged over the ranks), so rank 0's checkpoint resumes all of them exactly."""
    done = torchrun(str(TESTS / "ddp_dwa_worker.py"), timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]


KILL_TOTAL_STEPS = 30


def start_training(args: list[str], tiny_data: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo",
           "PYTHONPATH": str(TESTS.parent / "src")}
    return subprocess.Popen([sys.executable, "-m", "mtbert", "train", "--nproc", "2",
                             "--data-dir", str(tiny_data), *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def worker_of_rank(launcher: subprocess.Popen, rank: int) -> int:
    """The pid of the launcher's child process that torchrun gave `rank`."""
    children = Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children").read_text().split()
    for pid in map(int, children):
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        if f"RANK={rank}".encode() in environ:
            return pid
    raise AssertionError(f"no worker of rank {rank} among {children}")


def test_killed_rank_stops_the_job_and_resume_ends_like_an_uninterrupted_run(
        tmp_path, tiny_backbone, tiny_data):
    config = tmp_path / "tiny.yaml"
    config.write_text(
        "# tiny resumable 2-process run\n"
        "name: tiny\n"
        f"model: {{backbone: {tiny_backbone}, max_length: 32, hidden_dropout: 0.1}}\n"
        "tasks: [sst, quora, sts]\n"
        f"train: {{epochs: 100, max_steps: {KILL_TOTAL_STEPS}, batch_size: 8, lr: 1.0e-3,\n"
        "        checkpoint_every: 5, evals_per_epoch: 1, combiner: pcgrad,\n"
        "        weighting: uncertainty, threads: 1}\n"
        "distributed: {timeout_s: 60}\n")
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    process = start_training(["--config", str(config), "--run-dir", str(straight)], tiny_data)
    assert process.wait(timeout=300) == 0, process.stderr.read()[-3000:]

    process = start_training(["--config", str(config), "--run-dir", str(killed)], tiny_data)
    wait_for_checkpoint(process, killed, "step-0000001*")  # mid-run, mid-epoch
    os.kill(worker_of_rank(process, 1), signal.SIGKILL)
    assert process.wait(timeout=120) == 2  # rank 0 was stopped too, with a message
    message = process.stderr.read()
    assert "training process 1 failed (signal SIGKILL)" in message, message[-3000:]
    assert not (killed / "checkpoints" / f"step-{KILL_TOTAL_STEPS:08d}").exists()

    process = start_training(["--resume", str(killed)], tiny_data)
    assert process.wait(timeout=300) == 0, process.stderr.read()[-3000:]
    final = f"checkpoints/step-{KILL_TOTAL_STEPS:08d}"
    for name in ("model.safetensors", "weighting.safetensors", "rng-rank1.safetensors"):
        expected, actual = load_file(straight / final / name), load_file(killed / final / name)
        assert expected.keys() == actual.keys()
        assert all(torch.equal(expected[k], actual[k]) for k in expected), name
    # Its global batches need 2 processes: one process refuses to resume it.
    trainer = Trainer(load_config(killed / "config.yaml", data_dir=str(tiny_data)), killed)
    with pytest.raises(TrainingError, match="trained on 2 process"):
        trainer.resume()


def test_bench_ddp_smoke(tiny_backbone, tiny_data):
    done = subprocess.run(
        [sys.executable, str(TESTS.parent / "benchmarks" / "bench_ddp.py"), "--smoke",
         "--cores", "2", "--backbone", str(tiny_backbone), "--data-dir", str(tiny_data)],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": str(TESTS.parent / "src")})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| 1 x 2 |" in done.stdout and "| 2 x 1 |" in done.stdout
    assert "median steps/s: 1 process" in done.stdout


def test_a_global_batch_smaller_than_the_world_is_skipped_not_an_empty_slice(tiny_backbone,
                                                                            tiny_data):
    """3 ranks, global batch 6: 64 rows leave a last batch of 4 or fewer per bucket; a batch
    with fewer rows than ranks would give some rank nothing to train on."""
    config = tiny_config(tiny_backbone, tiny_data, max_steps=1)
    split = Trainer(config, "unused").data["sts"].train
    split = split.subset(np.arange(61))  # 61 = 10 x 6 + 1: one batch of a single row
    ranks = [TaskStream("sts", split, 2, seed=3, pad_id=0, rank=r, world_size=3)
             for r in range(3)]
    for _ in range(3 * len(ranks[0])):
        parts = [stream.next().rows.numpy() for stream in ranks]
        assert all(len(part) > 0 for part in parts)
        assert len(np.unique(np.concatenate(parts))) == sum(map(len, parts))
    assert len(ranks[0]) == 10  # the one-row batch is skipped
