"""Adding a task to a trained model (`mtbert train --from RUN`): the old tasks' outputs stay
bit-identical, the new task trains; per-task best models are kept when asked."""

import json

import pytest
import torch

from mtbert.cli import main
from mtbert.config import ConfigError
from mtbert.evaluation import head_outputs
from mtbert.model_folder import load_model
from mtbert.training import Trainer, train_and_evaluate

from conftest import tiny_config

LORA = ["model.conditioning=mtl_lora", "model.conditioning_options={rank: 2, up_projections: 2}"]


@pytest.fixture(scope="module")
def lora_run(tiny_backbone, tiny_data, tmp_path_factory):
    run = tmp_path_factory.mktemp("adapt") / "base"
    train_and_evaluate(tiny_config(tiny_backbone, tiny_data, *LORA, tasks="[sst, sts]",
                                   max_steps=3), run, splits=("dev",))
    return run


def outputs(run, data):
    model, _, _ = load_model(run)
    return {task: head_outputs(model, task, split.dev, 64) for task, split in data.items()}


def test_added_task_trains_and_old_outputs_stay_bit_identical(lora_run, tiny_backbone,
                                                              tiny_data, tmp_path):
    added = tmp_path / "added"
    code = main(["train", "--from", str(lora_run), "--run-dir", str(added), "--data-dir",
                 str(tiny_data), "tasks=[quora]", f"model.backbone={tiny_backbone}",
                 "train.max_steps=3", "train.batch_size=16", "train.lr=3e-3",
                 "train.eval_batch_size=64"])
    assert code == 0
    base, _, _ = load_model(lora_run)
    new, _, config = load_model(added)
    assert [t.name for t in config.tasks] == ["sst", "sts", "quora"]
    trainer = Trainer(config, tmp_path / "unused")  # the tasks' dev data, tokenized
    old = {t: d for t, d in trainer.data.items() if t != "quora"}
    before, after = outputs(lora_run, old), outputs(added, old)
    for task in old:
        assert torch.equal(before[task], after[task]), task
    for key, value in base.state_dict().items():  # every trained weight is as it was
        assert torch.equal(new.state_dict()[key], value), key
    fresh = Trainer(config, tmp_path / "fresh").model.state_dict()  # quora's initial weights
    trained = [k for k in new.state_dict() if "quora" in k
               and not torch.equal(new.state_dict()[k], fresh[k])]
    assert any(k.startswith("heads.quora") for k in trained)
    assert any(k.startswith("conditioning.tasks.quora") for k in trained)


def test_adding_a_task_the_run_has_is_refused(lora_run, tiny_backbone, tiny_data, tmp_path,
                                              capsys):
    code = main(["train", "--from", str(lora_run), "--run-dir", str(tmp_path / "x"),
                 "--data-dir", str(tiny_data), "tasks=[sst]", f"model.backbone={tiny_backbone}"])
    assert code == 2
    assert "already in" in capsys.readouterr().err


def test_task_best_models_are_kept_when_asked(tiny_backbone, tiny_data, tmp_path):
    config = tiny_config(tiny_backbone, tiny_data, "adapt.keep_task_best=true",
                         "train.evals_per_epoch=4", tasks="[sst, sts]", max_steps=4)
    trainer = Trainer(config, tmp_path / "run")
    trainer.fit()
    for task in ("sst", "sts"):
        best = max(r["dev"][task] for r in trainer.state.history)
        model, _, _ = load_model(tmp_path / "run" / "best-tasks" / task)
        saved = json.loads((tmp_path / "run" / "best-tasks" / task / "metrics.json").read_text())
        assert saved["dev"][task] == best and saved["task"] == task
        assert model.tasks.keys() == {"sst", "sts"}
    with pytest.raises(ConfigError, match="adapt.keep_task_bst"):
        tiny_config(tiny_backbone, tiny_data, "adapt.keep_task_bst=true")


def test_finetune_loads_the_run_and_trains_the_encoder_and_that_head_only(
        tiny_run, tiny_backbone, tiny_data, tmp_path):
    tuned = tmp_path / "tuned"
    code = main(["train", "--from", str(tiny_run), "--finetune", "quora", "--run-dir",
                 str(tuned),
                 "--data-dir", str(tiny_data), f"model.backbone={tiny_backbone}",
                 "train.max_steps=3", "train.batch_size=16", "train.lr=3e-3",
                 "train.eval_batch_size=64", "train.precision=fp32"])
    assert code == 0
    base, _, _ = load_model(tiny_run)
    model, _, config = load_model(tuned)
    assert [t.name for t in config.tasks] == ["quora"] and config.adapt.finetune == "quora"
    assert config.task("quora") == base.tasks["quora"]  # the run's own spec of the task
    assert not any(k.startswith(("heads.sst", "heads.sts")) for k in model.state_dict())
    start = Trainer(config, tmp_path / "start").model  # built and loaded, not trained
    assert all(p.requires_grad for p in start.parameters())
    expected = {k: v for k, v in base.state_dict().items() if not k.startswith(
        ("heads.sst", "heads.sts"))}
    assert start.state_dict().keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(start.state_dict()[key], value), key
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, expected[k])}
    assert any(k.startswith("encoder.") for k in changed)
    assert any(k.startswith("heads.quora") for k in changed)


def test_finetune_needs_a_task_of_the_run(tiny_run, tiny_backbone, tiny_data, tmp_path,
                                          capsys):
    code = main(["train", "--from", str(tiny_run), "--finetune", "cfimdb", "--run-dir",
                 str(tmp_path / "x"), "--data-dir", str(tiny_data),
                 f"model.backbone={tiny_backbone}"])
    assert code == 2
    assert "cfimdb" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="adapt.finetune"):
        tiny_config(tiny_backbone, tiny_data, "adapt.finetune=sts")
