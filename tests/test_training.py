"""End to end on a tiny BERT and tiny data: it learns, saves, reloads and predicts."""

import csv
import json

import numpy as np
import pytest
import torch

from mtbert.cli import main
from mtbert.evaluation import predict
from mtbert.model_folder import load_model
from mtbert.training import Trainer

from conftest import tiny_config

MEAN_POOLING = [f"tasks.{t}.head.pooling=mean" for t in ("sst", "quora", "sts")]
HEADS = {
    "cross-encoder": ["tasks.quora.head.type=classifier", "tasks.sts.head.type=classifier",
                      *MEAN_POOLING],
    "siamese": ["tasks.quora.head.type=pair_features", "tasks.sts.head.type=cosine",
                "tasks.sts.head.cosine_scale=learned", *MEAN_POOLING],
}


@pytest.mark.parametrize("heads", HEADS)
def test_tiny_model_overfits_each_task_type(tmp_path, tiny_backbone, tiny_data, heads):
    config = tiny_config(tiny_backbone, tiny_data, *HEADS[heads], epochs=100)
    trainer = Trainer(config, tmp_path / "run")
    before = trainer.evaluate("train")
    trainer.fit()
    after = trainer.evaluate("train")
    assert after["sst"] >= 0.9 and after["quora"] >= 0.9 and after["sts"] >= 0.9, after
    assert after["overall"] > before["overall"] + 0.2
    records = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").open()]
    assert records and all({"step", "dev", "train", "elapsed_s"} <= r.keys() for r in records)


def test_saved_model_reloads_to_identical_predictions(tmp_path, tiny_backbone, tiny_data):
    config = tiny_config(tiny_backbone, tiny_data, *HEADS["siamese"], epochs=2)
    trainer = Trainer(config, tmp_path / "run")
    trainer.fit()
    best = json.loads((tmp_path / "run/best/metrics.json").read_text())
    reloaded, tokenizer, _ = load_model(tmp_path / "run")
    assert not any(p.suffix in (".bin", ".pt", ".pkl") for p in (tmp_path / "run").rglob("*"))
    # The best model was saved at its evaluation: its dev scores must come back exactly.
    trainer.model.load_state_dict(reloaded.state_dict())
    assert trainer.evaluate("dev") == best["dev"]
    for name, data in trainer.data.items():
        ours = predict(reloaded, name, data.dev, 7)
        theirs = predict(trainer.model, name, data.dev, 64)
        np.testing.assert_array_equal(ours, theirs)


def test_training_is_deterministic(tmp_path, tiny_backbone, tiny_data):
    weights = []
    for run in ("a", "b"):
        trainer = Trainer(tiny_config(tiny_backbone, tiny_data, max_steps=6), tmp_path / run)
        trainer.fit()
        weights.append({k: v.clone() for k, v in trainer.model.state_dict().items()})
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_cli_train_evaluate_predict(tmp_path, tiny_backbone, tiny_data, capsys):
    config = tmp_path / "tiny.yaml"
    config.write_text(
        "# mtbert train --config tiny.yaml\n"
        f"model: {{backbone: {tiny_backbone}, max_length: 32}}\n"
        "tasks: [sst, quora, sts]\n"
        "train: {epochs: 1, batch_size: 16, lr: 1.0e-3}\n")
    run = tmp_path / "run"
    assert main(["train", "--config", str(config), "--data-dir", str(tiny_data),
                 "--run-dir", str(run)]) == 0
    out = capsys.readouterr().out
    assert "| dev |" in out and "overall" in out
    for name in ("sst-dev", "sst-test", "quora-dev", "sts-dev", "sts-test"):
        with open(run / "predictions" / f"{name}-output.csv") as f:
            rows = list(csv.reader(f))
        assert rows[0][0] == "id" and rows[0][1].startswith("Predicted_")
        assert len(rows) > 1
    assert main(["evaluate", str(run)]) == 0
    assert "| dev |" in capsys.readouterr().out
    assert main(["evaluate", str(run), "--dtype", "bf16"]) == 0
    assert "| dev |" in capsys.readouterr().out
    assert main(["predict", str(run), "--splits", "test", "--out", str(tmp_path / "p")]) == 0
    assert (tmp_path / "p" / "sst-test-output.csv").is_file()


def test_cli_reports_user_errors_in_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("tasks: [sst]\ntrain: {lr: fast}\n")
    assert main(["train", "--config", str(bad)]) == 2
    assert "train.lr: expected a number" in capsys.readouterr().err


def test_packed_tokens_give_the_padded_computation(tiny_backbone, tiny_data):
    """The encoder computes real tokens only; outputs equal computing every padded position."""
    from mtbert.data.batching import collate, encode_split
    from mtbert.data.readers import Example
    from mtbert.data.tasks import read_split
    from mtbert.model.bert import TokenLayout
    from mtbert.model.heads import pool
    from mtbert.training import Trainer as _Trainer

    config = tiny_config(tiny_backbone, tiny_data, *HEADS["siamese"], max_steps=1)
    trainer = _Trainer(config, "/nonexistent-not-written")
    model = trainer.model.eval()
    examples = read_split(config.task("sts"), "dev", tiny_data)
    long = " ".join(["good movie plot"] * 8)  # a few long sentences among short ones
    examples = [Example(e.id, (long if i < 3 else e.texts[0], e.texts[1]), e.label)
                for i, e in enumerate(examples)]
    split = encode_split(examples, trainer.tokenizer, siamese=True)
    batch = collate(split, range(len(split)), trainer.tokenizer.pad_id)
    assert batch.real_tokens() < 0.7 * batch.input_ids.numel()  # mostly padding
    with torch.no_grad():
        packed = model("sts", batch).predictions
        hidden = model.encoder.encode(batch.input_ids, batch.token_type_ids,
                                      TokenLayout.padded(batch.attention_mask))
        vectors = pool(hidden, None, batch.attention_mask, config.task("sts").head.pooling)
        padded = model.heads["sts"](vectors, batch.pair_index).predictions
    torch.testing.assert_close(packed, padded, rtol=0, atol=1e-5)


def test_bf16_autocast_path_trains(tmp_path, tiny_backbone, tiny_data):
    """bf16 autocast forced on the CPU, whatever the CPU has: weights stay fp32 and train."""
    trainer = Trainer(tiny_config(tiny_backbone, tiny_data, *HEADS["siamese"], max_steps=3,
                                  precision="bf16", device="cpu"), tmp_path / "run")
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.fit()
    assert trainer.state.skipped_steps == 0
    after = trainer.model.state_dict()
    assert all(v.dtype == before[k].dtype for k, v in after.items())  # weights stay fp32
    assert any(not torch.equal(v, before[k]) for k, v in after.items())
