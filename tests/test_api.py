"""The Python API: `mtbert.load` a trained run and predict / encode sentences of one's own."""

import csv
import json
import logging
import shutil

import numpy as np
import pytest
import torch

import mtbert
from mtbert.api import InputError
from mtbert.checkpoint import CorruptCheckpointError, save_json, write_checkpoint
from mtbert.config import ConfigError
from mtbert.data.batching import encode_split
from mtbert.data.readers import DataError
from mtbert.data.tasks import read_split
from mtbert.evaluation import predict
from mtbert.model.heads import is_siamese
from mtbert.model.loading import CheckpointError
from mtbert.model_folder import load_model, save_model


@pytest.fixture(scope="module")
def model(tiny_run):
    return mtbert.load(tiny_run)


def dev_inputs(model, name):
    examples = read_split(model.model.tasks[name], "dev", model.config.data_dir)
    return examples, [e.texts if len(e.texts) == 2 else e.texts[0] for e in examples]


def test_task_metadata(model):
    assert list(model.tasks) == ["sst", "quora", "sts"]
    sst, quora, sts = model.tasks.values()
    assert (sst.kind, sst.pair) == ("classification", False)
    assert sst.labels == ("very negative", "negative", "neutral", "positive", "very positive")
    assert quora.pair and quora.labels == ("not duplicate", "duplicate")
    assert sts.kind == "regression" and sts.labels is None and sts.label_range == (0.0, 5.0)


@pytest.mark.parametrize("name", ["sst", "quora", "sts"])
def test_predict_equals_the_evaluation_outputs(model, tiny_run, name):
    """The API on the dev file's texts gives what `evaluate` wrote and `predict` returns."""
    examples, inputs = dev_inputs(model, name)
    ours = model.predict(name, inputs, batch_size=5)
    task = model.model.tasks[name]
    split = encode_split(examples, model.tokenizer, is_siamese(task))
    expected = predict(model.model, name, split, 64, model.tokenizer.pad_id)
    with open(tiny_run / "predictions" / f"{name}-dev-output.csv") as f:
        written = {row["id"]: row[task.prediction_column] for row in csv.DictReader(f)}
    assert len(ours) == len(examples) == len(written)
    for example, prediction, value in zip(examples, ours, expected):
        if task.kind == "classification":
            assert prediction.label_id == int(value) == int(written[example.id])
            assert prediction.label == model.tasks[name].labels[prediction.label_id]
            probabilities = list(prediction.probabilities.values())
            assert sum(probabilities) == pytest.approx(1.0, abs=1e-6)
            assert int(np.argmax(probabilities)) == prediction.label_id
        else:
            assert prediction.label == pytest.approx(float(value), abs=1e-6)
            assert prediction.label == pytest.approx(float(written[example.id]), abs=6e-5)
            assert 0.0 <= prediction.label <= 5.0


def test_encode_gives_the_embeddings_the_cosine_head_was_trained_on(model):
    """sts is a fixed-scale cosine head on mean-pooled sentences: 5 * relu(cos(u, v))."""
    _, pairs = dev_inputs(model, "sts")
    u = model.encode([a for a, _ in pairs], normalize=True)
    v = model.encode([b for _, b in pairs], normalize=True, batch_size=3)
    assert u.shape == (len(pairs), model.model.encoder.config.hidden_size)
    np.testing.assert_allclose(np.linalg.norm(u, axis=1), 1.0, atol=1e-5)
    scores = 5 * np.maximum((u * v).sum(1), 0)
    np.testing.assert_allclose(scores, [p.label for p in model.predict("sts", pairs)],
                               atol=1e-4)
    raw = model.encode(["good movie"])
    assert not np.allclose(np.linalg.norm(raw), 1.0)
    assert model.encode([]).shape == (0, raw.shape[1])


def test_bad_inputs_are_clear_errors(model):
    with pytest.raises(ConfigError, match="unknown task 'nli'.*sst, quora, sts"):
        model.predict("nli", ["a"])
    with pytest.raises(DataError, match=r"input 1: task 'quora' takes \(text, text\) pairs"):
        model.predict("quora", [("good", "bad"), "good movie"])
    with pytest.raises(DataError, match="input 0: task 'sst' takes single texts"):
        model.predict("sst", [("good", "bad")])
    with pytest.raises(DataError, match="input 1: empty text"):
        model.predict("sst", ["good", "  "])
    with pytest.raises(InputError, match="input 1: not valid Unicode at character 3") as error:
        model.encode(["good", "bad\ud800"])  # a lone surrogate: tokenizers would raise TypeError
    assert (error.value.index, error.value.reason) == (1, "not valid Unicode at character 3")
    assert model.predict("sst", []) == []


def test_over_long_text_is_truncated_and_warned_once(tiny_run, caplog):
    model = mtbert.load(tiny_run)
    long = " ".join(["good movie plot"] * 40)  # 120 tokens, max_length is 32
    with caplog.at_level(logging.WARNING, logger="mtbert.api"):
        first = model.predict("sst", [long, "good"])
        model.predict("sst", [long])
        model.encode([long])
    warnings = [r for r in caplog.records if "truncated" in r.getMessage()]
    assert len(warnings) == 1 and "max_length=32" in warnings[0].getMessage()
    cut = model.predict("sst", [" ".join(["good movie plot"] * 20)])[0]  # also over 32 tokens
    assert first[0].label == cut.label
    np.testing.assert_allclose(list(first[0].probabilities.values()),
                               list(cut.probabilities.values()), atol=1e-5)


def test_int8_model_predicts_close_to_fp32(model, tiny_run):
    quantized = mtbert.load(tiny_run / "best", quantize="int8")
    _, inputs = dev_inputs(model, "sts")
    ours = np.array([p.label for p in quantized.predict("sts", inputs)])
    np.testing.assert_allclose(ours, [p.label for p in model.predict("sts", inputs)], atol=0.1)
    with pytest.raises(ConfigError, match="quantize"):
        mtbert.load(tiny_run, quantize="int4")


def test_bf16_model_predicts_and_encodes_close_to_fp32(model, tiny_run):
    half = mtbert.load(tiny_run / "best", dtype="bf16")
    for task in ("sst", "sts"):
        _, inputs = dev_inputs(model, task)
        ours, full = half.predict(task, inputs), model.predict(task, inputs)
        if task == "sts":
            np.testing.assert_allclose([p.label for p in ours], [p.label for p in full],
                                       atol=0.1)
        else:
            np.testing.assert_allclose([list(p.probabilities.values()) for p in ours],
                                       [list(p.probabilities.values()) for p in full],
                                       atol=0.02)
    texts = ["good movie", "a bad plot"]
    vectors = half.encode(texts)
    assert vectors.dtype == np.float32
    np.testing.assert_allclose(vectors, model.encode(texts), atol=0.05)
    with pytest.raises(ConfigError, match="dtype"):
        mtbert.load(tiny_run, dtype="fp16")
    with pytest.raises(ConfigError, match="quantize"):
        mtbert.load(tiny_run, quantize="int8", dtype="bf16")


def test_best_folder_is_no_trap_for_transformers(tiny_run):
    transformers = pytest.importorskip("transformers")
    best = tiny_run / "best"
    assert not (best / "config.json").exists()
    assert json.loads((best / "mtbert_config.json").read_text())["layout"] == "multitask"
    with pytest.raises((OSError, ValueError)):
        transformers.AutoModel.from_pretrained(best)


def test_old_best_folders_with_config_json_still_load(model, tmp_path):
    """Runs saved before mtbert_config.json kept the encoder config in config.json."""
    old = tmp_path / "old-best"
    save_model(old, model.model, model.tokenizer, model.config, {"dev": {}})

    def legacy(tmp):
        for path in old.iterdir():
            if path.name not in ("manifest.json", "mtbert_config.json"):
                shutil.copy(path, tmp / path.name)
        save_json(tmp / "config.json", model.model.encoder.config.to_hf_dict())

    write_checkpoint(tmp_path / "legacy", legacy)
    reloaded, _, _ = load_model(tmp_path / "legacy")
    for key, value in model.model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[key], value)


def test_foreign_or_corrupt_folders_are_refused_with_what_is_missing(tiny_run, tiny_backbone,
                                                                     tmp_path):
    with pytest.raises(CheckpointError, match="no such folder"):
        mtbert.load(tmp_path / "nowhere")
    (tmp_path / "random").mkdir()
    (tmp_path / "random" / "notes.txt").write_text("hello")
    with pytest.raises(CheckpointError, match="not an mtbert model folder.*experiment.yaml"):
        mtbert.load(tmp_path / "random")
    with pytest.raises(CheckpointError, match="plain BERT checkpoint.*task heads"):
        mtbert.load(tiny_backbone)
    corrupt = tmp_path / "corrupt"
    shutil.copytree(tiny_run / "best", corrupt)
    weights = corrupt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(CorruptCheckpointError, match="model.safetensors does not match"):
        mtbert.load(corrupt)


def test_label_names_need_one_name_per_class():
    from mtbert.config import load_config

    assert load_config(None, ["tasks=[cfimdb]"]).tasks[0].label_names == ["negative", "positive"]
    with pytest.raises(ConfigError, match=r"tasks\[0\] \(sst\).label_names: one name per class"):
        load_config(None, ["tasks=[sst]", "tasks.sst.label_names=[bad, good]"])
