"""`mtbert export`: folders that transformers, sentence-transformers and ONNX Runtime load with
mtbert's outputs, and a model card written from the run."""

import json

import numpy as np
import pytest
import torch
import yaml

import mtbert
from mtbert.cli import main
from mtbert.config import load_config
from mtbert.data.batching import encode_split
from mtbert.data.readers import Example
from mtbert.data.tasks import read_split
from mtbert.inference import OnnxPredictor
from mtbert.model.loading import CheckpointError
from mtbert.model_folder import load_model
from mtbert.training import Trainer, train_and_evaluate

from conftest import SIAMESE_HEADS, tiny_config

TEXTS = ["good movie", "a bad plot with an awful actor and a small dog", "fine",
         "the cat sleeps", "big red film story"]


@pytest.fixture(scope="module")
def model(tiny_run):
    return mtbert.load(tiny_run)


@pytest.fixture(scope="module")
def hf_folder(tiny_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "hf"
    assert main(["export", str(tiny_run), str(out), "--format", "hf"]) == 0
    return out


@pytest.fixture(scope="module")
def st_folder(tiny_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "st"
    assert main(["export", str(tiny_run), str(out), "--format", "sentence-transformers"]) == 0
    return out


def test_hf_export_loads_in_transformers_with_mtbert_hidden_states(hf_folder, model):
    transformers = pytest.importorskip("transformers")
    encoder, info = transformers.AutoModel.from_pretrained(hf_folder, output_loading_info=True)
    assert type(encoder).__name__ == "BertModel"
    assert not any(info.values()), info  # no missing, unexpected or mismatched keys
    assert json.loads((hf_folder / "config.json").read_text())["architectures"] == ["BertModel"]
    tokenizer = transformers.AutoTokenizer.from_pretrained(hf_folder)
    pairs = list(zip(TEXTS, TEXTS[1:]))
    singles = tokenizer(TEXTS)
    assert [singles["input_ids"], singles["token_type_ids"]] == list(model.tokenizer.encode(TEXTS))
    joint = tokenizer([a for a, _ in pairs], [b for _, b in pairs])
    assert [joint["input_ids"], joint["token_type_ids"]] == list(model.tokenizer.encode(pairs))
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = encoder(**batch).last_hidden_state
        ours, _ = model.model.encoder(batch["input_ids"], batch["attention_mask"],
                                      batch["token_type_ids"])
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(hidden[real], ours[real], rtol=0, atol=1e-5)


def test_hf_export_restores_the_whole_multitask_model(hf_folder, model):
    exported = mtbert.load(hf_folder)
    pairs = list(zip(TEXTS, TEXTS[1:]))
    for task, inputs in (("sst", TEXTS), ("quora", pairs), ("sts", pairs)):
        assert exported.predict(task, inputs) == model.predict(task, inputs)
    assert (hf_folder / "mtbert_heads.safetensors").is_file()
    assert (hf_folder / "vocab.txt").is_file() and (hf_folder / "tokenizer_config.json").is_file()


def test_sentence_transformers_export_encodes_like_mtbert(st_folder, model):
    st = pytest.importorskip("sentence_transformers")
    loaded = st.SentenceTransformer(str(st_folder), device="cpu")
    for normalize in (False, True):
        theirs = loaded.encode(TEXTS, normalize_embeddings=normalize, convert_to_numpy=True)
        np.testing.assert_allclose(theirs, model.encode(TEXTS, normalize=normalize), atol=1e-5)
    pooling = json.loads((st_folder / "1_Pooling" / "config.json").read_text())
    assert pooling["pooling_mode_mean_tokens"] and not pooling["pooling_mode_cls_token"]
    assert mtbert.load(st_folder).predict("sst", TEXTS) == model.predict("sst", TEXTS)


def test_model_card_metrics_equal_the_runs_metrics(st_folder, tiny_run):
    card = (st_folder / "README.md").read_text(encoding="utf-8")
    front = yaml.safe_load(card.split("---\n")[1])
    metrics = json.loads((tiny_run / "best" / "metrics.json").read_text())
    results = front["model-index"][0]["results"]
    assert {r["task"]["name"]: r["metrics"][0]["value"] for r in results} == {
        task: value for task, value in metrics["dev"].items() if task != "overall"}
    assert front["library_name"] == "sentence-transformers"
    assert front["datasets"] == ["sst", "quora", "sts"]
    assert {"license", "pipeline_tag", "tags"} <= front.keys()
    assert "base_model" not in front  # the tiny backbone is a local folder, not a hub id
    assert "very negative, negative, neutral, positive, very positive" in card
    assert 'SentenceTransformer("st")' in card and 'mtbert.load("st")' in card
    assert f"at step {metrics['step']} on the whole dev sets (`metrics.json`)" in card


def test_a_card_of_a_run_scored_on_a_dev_sample_says_which(tiny_backbone, tiny_data, tmp_path):
    """With `train.max_eval_examples` the saved scores are of a sample: metrics.json says
    how many examples of how many, and the card says so instead of calling them dev scores."""
    run = tmp_path / "run"
    train_and_evaluate(tiny_config(tiny_backbone, tiny_data, tasks="[sst, sts]", max_steps=2,
                                   max_eval_examples=10), run, splits=())
    metrics = json.loads((run / "best" / "metrics.json").read_text())
    whole = {task: len(read_split(load_config(None, [f"tasks=[{task}]"]).tasks[0], "dev",
                                  tiny_data)) for task in ("sst", "sts")}
    assert metrics["dev_examples"] == {task: {"scored": 10, "of": n} for task, n in whole.items()}
    assert min(whole.values()) > 10
    out = tmp_path / "hf"
    assert main(["export", str(run), str(out), "--format", "hf"]) == 0
    card = (out / "README.md").read_text(encoding="utf-8")
    assert (f"at step {metrics['step']} on the fixed dev sample that training selected the "
            f"model by, not on the whole dev sets (sst 10 of {whole['sst']}, sts 10 of "
            f"{whole['sts']} examples)" in " ".join(card.split()))
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["model-index"][0]["results"][0]["metrics"][0]["name"] == (
        f"dev accuracy (10 of {whole['sst']} examples)")


def test_onnx_export_is_checked_against_pytorch(tiny_run, model, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    out = tmp_path / "onnx"
    assert main(["export", str(tiny_run), str(out), "--format", "onnx"]) == 0
    printed = capsys.readouterr().out
    for task in ("sst", "quora", "sts"):
        difference = float(printed.split(f"{task}: max |ONNX - PyTorch| output difference ")[1]
                           .split()[0])
        assert difference < 1e-4
    predictor = OnnxPredictor(out / "sts.onnx", model.model.tasks["sts"])
    split = encode_split([Example("0", (a, b), None) for a, b in zip(TEXTS, TEXTS[1:])],
                         model.tokenizer, siamese=True)
    scores = predictor.predict(split, pad_id=model.tokenizer.pad_id)
    expected = [p.label for p in model.predict("sts", list(zip(TEXTS, TEXTS[1:])))]
    np.testing.assert_allclose(scores, expected, atol=1e-4)
    assert "library_name: onnx" in (out / "README.md").read_text()
    with pytest.raises(CheckpointError, match="OnnxPredictor"):
        mtbert.load(out)
    assert main(["export", str(tiny_run), str(tmp_path / "q"), "--format", "onnx", "--task",
                 "sst", "--quantize", "int8"]) == 0
    assert sorted(p.name for p in (tmp_path / "q").glob("*.onnx")) == ["sst.onnx"]


@pytest.mark.parametrize("overrides, fmt, message", [
    (["model.conditioning=input"], "hf", "task conditioning"),
    (["model.conditioning=input"], "sentence-transformers", "task conditioning"),
    (["tasks.quora.head.pooling=pooler"], "sentence-transformers", "pools with 'pooler'"),
])
def test_exports_that_would_mislead_are_refused(tiny_backbone, tiny_data, tmp_path, capsys,
                                                overrides, fmt, message):
    config = tiny_config(tiny_backbone, tiny_data, *SIAMESE_HEADS, *overrides, max_steps=1)
    Trainer(config, tmp_path / "run").fit()
    assert main(["export", str(tmp_path / "run"), str(tmp_path / "out"), "--format", fmt]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("mtbert export: error: ") and message in error
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("arguments, message", [
    (["--format", "hf", "--quantize", "int8"], "--quantize applies to --format onnx only"),
    (["--format", "onnx", "--task", "nli"], "unknown task 'nli'"),
])
def test_export_option_errors(tiny_run, tmp_path, capsys, arguments, message):
    assert main(["export", str(tiny_run), str(tmp_path / "out"), *arguments]) == 2
    assert message in capsys.readouterr().err


def test_lora_task_exports_folded_into_a_plain_bert(tiny_backbone, tiny_data, tmp_path):
    config = tiny_config(tiny_backbone, tiny_data, *SIAMESE_HEADS, "model.conditioning=lora",
                         "model.conditioning_options={rank: 2}", max_steps=2)
    Trainer(config, tmp_path / "run").fit()
    assert main(["export", str(tmp_path / "run"), str(tmp_path / "sts"), "--format", "hf",
                 "--task", "sts"]) == 0
    adapted, folded = mtbert.load(tmp_path / "run"), mtbert.load(tmp_path / "sts")
    assert list(folded.tasks) == ["sts"]
    inputs = [("a cat runs", "a dog runs"), ("red film", "big blue plot"), ("cat", "cat")]
    got = [p.label for p in folded.predict("sts", inputs)]
    expected = [p.label for p in adapted.predict("sts", inputs)]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    trained, _, _ = load_model(tmp_path / "run")  # the adapters are in the weights now
    exported, _, _ = load_model(tmp_path / "sts")
    assert exported.conditioning is None
    assert not torch.equal(exported.encoder.layers[0].attention.qkv.weight,
                           trained.encoder.layers[0].attention.qkv.weight)
