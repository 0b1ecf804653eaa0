"""Crash safety: resume after SIGKILL is bit-identical, corrupt checkpoints fall back,
NaN steps are skipped, names cannot escape the run directory."""

import os
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from mtbert.checkpoint import CorruptCheckpointError, verify_checkpoint
from mtbert.config import ConfigError
from mtbert.training import Trainer, TrainingError

from conftest import tiny_config, wait_for_checkpoint

TOTAL_STEPS = 60


def write_config(path, backbone):
    path.write_text(
        "# tiny resumable run\n"
        "name: tiny\n"
        f"model: {{backbone: {backbone}, max_length: 32, hidden_dropout: 0.1}}\n"
        "tasks: [sst, quora, sts]\n"
        f"train: {{epochs: 100, max_steps: {TOTAL_STEPS}, batch_size: 16, lr: 1.0e-3,\n"
        "        checkpoint_every: 5, evals_per_epoch: 1, combiner: pcgrad,\n"
        "        weighting: uncertainty, threads: 1}\n")
    return path


def start_training(args, tiny_data):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "mtbert", "train", "--data-dir",
                             str(tiny_data), *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def final_weights(run_dir):
    return load_file(run_dir / "checkpoints" / f"step-{TOTAL_STEPS:08d}" / "model.safetensors")


def test_resume_after_sigkill_ends_with_identical_weights(tmp_path, tiny_backbone, tiny_data):
    config = write_config(tmp_path / "tiny.yaml", tiny_backbone)
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    process = start_training(["--config", str(config), "--run-dir", str(straight)], tiny_data)
    assert process.wait(timeout=600) == 0, process.stderr.read()

    process = start_training(["--config", str(config), "--run-dir", str(killed)], tiny_data)
    wait_for_checkpoint(process, killed, "step-0000002*")  # mid-run, mid-epoch
    assert process.poll() is None, "training ended before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (killed / "checkpoints" / f"step-{TOTAL_STEPS:08d}").exists()

    process = start_training(["--resume", str(killed)], tiny_data)
    assert process.wait(timeout=600) == 0, process.stderr.read()
    expected, actual = final_weights(straight), final_weights(killed)
    assert expected.keys() == actual.keys()
    assert all(torch.equal(expected[k], actual[k]) for k in expected)


def test_corrupt_newest_checkpoint_falls_back_to_previous(tmp_path, tiny_backbone, tiny_data):
    config = tiny_config(tiny_backbone, tiny_data, max_steps=10, checkpoint_every=5,
                         evals_per_epoch=1)
    trainer = Trainer(config, tmp_path / "run")
    trainer.fit()
    newest, previous = sorted((tmp_path / "run" / "checkpoints").glob("step-*"))[::-1][:2]
    weights = newest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # truncate
    with pytest.raises(CorruptCheckpointError, match="checksum"):
        verify_checkpoint(newest)
    resumed = Trainer(config, tmp_path / "run")
    assert resumed.resume() == previous
    assert resumed.state.step == int(previous.name.split("-")[1])
    expected = load_file(previous / "model.safetensors")
    assert all(torch.equal(v, expected[k]) for k, v in resumed.model.state_dict().items())


def test_no_usable_checkpoint_is_a_clear_error(tmp_path, tiny_backbone, tiny_data):
    trainer = Trainer(tiny_config(tiny_backbone, tiny_data, max_steps=1), tmp_path / "run")
    with pytest.raises(TrainingError, match="no usable checkpoint"):
        trainer.resume()


def test_nan_steps_are_skipped_then_training_stops(tmp_path, tiny_backbone, tiny_data,
                                                   monkeypatch):
    config = tiny_config(tiny_backbone, tiny_data, max_steps=40, checkpoint_every=2,
                         max_bad_steps=3, evals_per_epoch=1)
    trainer = Trainer(config, tmp_path / "run")
    loss = trainer.losses["sst"]
    original = type(loss).forward
    calls = {"n": 0}

    def flaky(self, output, labels, epoch):
        value, auxiliary, parts = original(self, output, labels, epoch)
        if self is not loss:
            return value, auxiliary, parts
        calls["n"] += 1
        if calls["n"] in (3,) or calls["n"] >= 8:  # one isolated NaN, then NaN for good
            value = value * float("nan")
            parts = {**parts, "loss": float("nan")}
        return value, auxiliary, parts

    monkeypatch.setattr(type(loss), "forward", flaky)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    with pytest.raises(TrainingError, match="3 steps in a row"):
        trainer.fit()
    assert trainer.state.skipped_steps == 4  # the isolated one + three in a row
    assert trainer.state.step == 9
    assert all(torch.isfinite(v).all() for v in trainer.model.state_dict().values())
    assert any(not torch.equal(v, before[k]) for k, v in trainer.model.state_dict().items())
    last_good = sorted((tmp_path / "run" / "checkpoints").glob("step-*"))[-1]
    verify_checkpoint(last_good)  # intact


@pytest.mark.parametrize("name", ["../escape", "a/b", "..", ""])
def test_names_cannot_escape_the_run_directory(tiny_backbone, tiny_data, name):
    with pytest.raises(ConfigError):
        tiny_config(tiny_backbone, tiny_data, f"name='{name}'")
