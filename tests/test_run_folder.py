"""Nothing lost, nothing mixed (issue 21): one process per run folder, no silent reuse of a
folder that holds another run, resume only under the run's own config, NaN stops that leave a
good checkpoint, interrupted writes undone."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from mtbert.checkpoint import RunFolderError, RunLock, recover_interrupted_writes
from mtbert.cli import main
from mtbert.model_folder import load_model
from mtbert.training import Trainer, TrainingError, train_and_evaluate

from conftest import tiny_config


def steps_on_disk(run_dir):
    return sorted(int(p.name.split("-")[1]) for p in (run_dir / "checkpoints").glob("step-*"))


def test_a_second_process_cannot_train_into_a_folder_in_use(tmp_path, tiny_backbone,
                                                             tiny_data):
    """Defect 2: two `mtbert train` into one folder interleaved metrics and overwrote each
    other's best/ and checkpoints, both exiting 0."""
    run_dir = tmp_path / "run"
    options = ["--data-dir", str(tiny_data), "--run-dir", str(run_dir)]
    overrides = ["tasks=[sst]", f"model.backbone={tiny_backbone}", "model.max_length=32",
                 "train.epochs=1000", "train.threads=1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen([sys.executable, "-m", "mtbert", "train", *options, *overrides],
                             env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not (run_dir / "config.yaml").is_file():  # training has started
            assert first.poll() is None and time.time() < deadline
            time.sleep(0.05)
        config_before = (run_dir / "config.yaml").read_bytes()
        for extra in ([], ["--overwrite"]):
            second = subprocess.run(
                [sys.executable, "-m", "mtbert", "train", *options, *extra, *overrides,
                 "train.lr=1e-3"],
                env=env, capture_output=True, text=True, timeout=120)
            assert second.returncode == 2, second.stderr
            assert f"in use by another mtbert process (pid {first.pid})" in second.stderr
            assert "Traceback" not in second.stderr
        assert first.poll() is None, "the first run must go on untouched"
        assert (run_dir / "config.yaml").read_bytes() == config_before
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    with RunLock(run_dir):  # the OS released the killed process's lock
        pass


def test_a_new_run_refuses_a_folder_holding_another_run(tmp_path, tiny_backbone, tiny_data,
                                                        capsys):
    """Defect 3: training again into a run folder kept the old run's checkpoints (they sort
    later), appended to its metrics, and --resume restored the old state."""
    run_dir = tmp_path / "run"
    old = tiny_config(tiny_backbone, tiny_data, max_steps=6, checkpoint_every=2)
    train_and_evaluate(old, run_dir, splits=("dev",))
    assert steps_on_disk(run_dir) == [4, 6]

    args = ["train", "--data-dir", str(tiny_data), "--run-dir", str(run_dir),
            "tasks=[sst]", f"model.backbone={tiny_backbone}", "model.max_length=32",
            "train.max_steps=2"]
    assert main(args) == 2
    assert "holds another run" in capsys.readouterr().err
    assert steps_on_disk(run_dir) == [4, 6]

    new = tiny_config(tiny_backbone, tiny_data, "train.lr=1e-3", max_steps=2,
                      checkpoint_every=2)
    train_and_evaluate(new, run_dir, splits=("dev",), overwrite=True)
    assert steps_on_disk(run_dir) == [2]
    assert not (run_dir / ".replaced-run").exists()  # dropped once the new run is complete
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
    assert [r["step"] for r in records] == [2]
    assert "lr: 0.001" in (run_dir / "config.yaml").read_text()


def test_resume_refuses_a_checkpoint_of_another_config(tmp_path, tiny_backbone, tiny_data,
                                                       capsys):
    run_dir = tmp_path / "run"
    train_and_evaluate(tiny_config(tiny_backbone, tiny_data, max_steps=2), run_dir,
                       splits=("dev",))
    saved = run_dir / "config.yaml"
    saved.write_text(saved.read_text().replace("batch_size: 16", "batch_size: 8"))
    assert main(["train", "--resume", str(run_dir), "--data-dir", str(tiny_data)]) == 2
    err = capsys.readouterr().err
    assert "was trained with another config" in err and "batch_size: 16 -> 8" in err


def test_a_nan_stop_keeps_the_last_good_checkpoint_and_resumes_with_a_lower_lr(
        tmp_path, tiny_backbone, tiny_data, monkeypatch):
    """Defect 5: checkpoints were written while steps were skipped, pruning removed the good
    ones, and --resume failed again at once (its restored state was mid-streak)."""
    run_dir = tmp_path / "run"
    config = tiny_config(tiny_backbone, tiny_data, max_steps=30, checkpoint_every=1,
                         keep_checkpoints=2, max_bad_steps=3, evals_per_epoch=4)
    trainer = Trainer(config, run_dir)
    original = type(trainer.losses["sst"]).forward
    calls = {"n": 0}

    def diverging(self, output, labels, epoch):
        value, auxiliary, parts = original(self, output, labels, epoch)
        if self is trainer.losses["sst"]:
            calls["n"] += 1
            if calls["n"] > 7:  # steps 1..7 good, NaN from step 8 on
                value, parts = value * float("nan"), {**parts, "loss": float("nan")}
        return value, auxiliary, parts

    monkeypatch.setattr(type(trainer.losses["sst"]), "forward", diverging)
    with pytest.raises(TrainingError, match=r"--resume .* train\.lr=0\.0015"):
        trainer.fit()
    assert trainer.state.step == 9  # 7 good steps, then the third bad one raised
    assert steps_on_disk(run_dir) == [6, 7]
    state = json.loads((run_dir / "checkpoints/step-00000007/state.json").read_text())
    assert state["train_state"]["bad_steps"] == 0
    assert json.loads((run_dir / "best/metrics.json").read_text())["step"] <= 7
    monkeypatch.undo()

    lower = tiny_config(tiny_backbone, tiny_data, "train.lr=1.5e-3", max_steps=30,
                        checkpoint_every=1, keep_checkpoints=2, max_bad_steps=3,
                        evals_per_epoch=4)
    resumed = Trainer(lower, run_dir)
    assert resumed.resume().name == "step-00000007"
    factor = resumed.scheduler.lr_lambdas[0](resumed.scheduler.last_epoch)
    assert resumed.optimizer.param_groups[0]["lr"] == pytest.approx(1.5e-3 * factor)
    expected = load_file(run_dir / "checkpoints/step-00000007/model.safetensors")
    assert all(torch.equal(v, expected[k]) for k, v in resumed.model.state_dict().items())
    resumed.fit()
    assert resumed.state.step == resumed.total_steps and resumed.state.skipped_steps == 0


def test_unchanged_resume_keeps_the_saved_learning_rates(tmp_path, tiny_backbone, tiny_data):
    config = tiny_config(tiny_backbone, tiny_data, "train.head_lr=1e-2", max_steps=4,
                         checkpoint_every=3, warmup_ratio=0.5)
    trainer = Trainer(config, tmp_path / "run")
    trainer.fit()
    saved = json.loads((tmp_path / "run/checkpoints/step-00000003/state.json").read_text())
    resumed = Trainer(config, tmp_path / "run")
    resumed.resume()
    resumed._load_training_state(tmp_path / "run/checkpoints/step-00000003")
    lrs = [g["lr"] for g in resumed.optimizer.param_groups]
    assert lrs == saved["scheduler"]["_last_lr"]


def test_interrupted_writes_are_undone_at_the_next_start(tmp_path, tiny_backbone, tiny_data):
    """A crash between write_checkpoint's two renames left only `.best.old`; killed writes left
    hidden `.step-*` folders that were never removed."""
    run_dir = tmp_path / "run"
    config = tiny_config(tiny_backbone, tiny_data, max_steps=4, checkpoint_every=2)
    Trainer(config, run_dir).fit()
    (run_dir / "best").rename(run_dir / ".best.old")
    leftover = run_dir / "checkpoints" / ".step-00000006.k1ll3d"
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"\0" * 1000)

    model, _, _ = load_model(run_dir)  # reads .best.old without touching the folder
    assert (run_dir / ".best.old").is_dir() and not (run_dir / "best").exists()
    resumed = Trainer(config, run_dir)
    resumed.resume()
    assert not leftover.exists()
    recover_interrupted_writes(run_dir)
    assert (run_dir / "best").is_dir() and not (run_dir / ".best.old").exists()
    assert load_model(run_dir)[0].state_dict().keys() == model.state_dict().keys()


def test_a_task_without_dev_data_keeps_the_last_model(tmp_path, tiny_backbone, tiny_data):
    """It used to end with "missing manifest": no evaluation ever saved best/."""
    config = tiny_config(tiny_backbone, tiny_data, "tasks.sst.dev_file=null", tasks="[sst]",
                         max_steps=3)
    table, _, _ = train_and_evaluate(config, tmp_path / "run", splits=("test",))
    assert json.loads((tmp_path / "run/best/metrics.json").read_text()) == {"dev": {},
                                                                            "step": 3}
    assert (tmp_path / "run/predictions/sst-test-output.csv").is_file()


def test_the_lock_is_exclusive_within_a_process_too(tmp_path):
    with RunLock(tmp_path / "run"):
        with pytest.raises(RunFolderError, match="in use"):
            with RunLock(tmp_path / "run"):
                pass


def test_overwrite_keeps_the_old_run_until_the_new_one_is_complete(tmp_path, tiny_backbone,
                                                                   tiny_data, monkeypatch):
    """Issue 35: `train --overwrite` removed the old run when the new one started, so a new
    run that failed left neither."""
    run_dir = tmp_path / "run"
    train_and_evaluate(tiny_config(tiny_backbone, tiny_data, max_steps=2), run_dir,
                       splits=("dev",))
    old_weights = (run_dir / "best" / "model.safetensors").read_bytes()

    def crash(self):
        raise RuntimeError("killed mid-run")

    monkeypatch.setattr(Trainer, "fit", crash)
    with pytest.raises(RuntimeError, match="killed mid-run"):
        train_and_evaluate(tiny_config(tiny_backbone, tiny_data, "train.lr=1e-3", max_steps=2),
                           run_dir, splits=("dev",), overwrite=True)
    kept = run_dir / ".replaced-run"
    assert (kept / "best" / "model.safetensors").read_bytes() == old_weights
    assert (kept / "config.yaml").is_file() and (kept / "metrics.jsonl").is_file()
