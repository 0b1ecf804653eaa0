"""Fast inference paths: bf16 weights, int8 quantization and ONNX export keep the model's
predictions."""

import numpy as np
import pytest
import torch
from torch import nn

from mtbert.data.batching import collate
from mtbert.evaluation import predict, predict_outputs
from mtbert.inference import OnnxPredictor, export_onnx, quantize_dynamic, to_bf16
from mtbert.training import Trainer

from conftest import tiny_config

TASKS = ["sst", "quora", "sts"]  # 5-class classifier, one-logit classifier, siamese cosine
SIAMESE_QUORA = "tasks.quora.head={type: cosine, pooling: mean}"


def trained(tiny_backbone, tiny_data, tmp_path, *overrides):
    trainer = Trainer(tiny_config(tiny_backbone, tiny_data, *overrides, max_steps=8),
                      tmp_path / "run")
    for _ in range(8):
        trainer.train_step()
    return trainer


@pytest.fixture(scope="module")
def trainer(tiny_backbone, tiny_data, tmp_path_factory):
    return trained(tiny_backbone, tiny_data, tmp_path_factory.mktemp("inference"))


def test_quantized_copy_predicts_close_to_fp32(trainer):
    model = trainer.model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    quantized = quantize_dynamic(model)
    # the original is untouched
    assert isinstance(model.encoder.layers[0].feed_forward.intermediate, nn.Linear)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not isinstance(quantized.encoder.layers[0].feed_forward.intermediate, nn.Linear)
    assert type(quantized.heads["sst"].net[-1]) is nn.Linear  # heads stay fp32
    for name in TASKS:
        dev = trainer.data[name].dev
        ours = predict_outputs(quantized, name, dev, 64)
        np.testing.assert_allclose(ours, predict_outputs(model, name, dev, 64), atol=0.05)
        agree = predict(quantized, name, dev, 64) == predict(model, name, dev, 64)
        if trainer.data[name].config.kind == "classification":
            assert agree.mean() >= 0.9


def test_bf16_copy_predicts_close_to_fp32(trainer):
    model = trainer.model.eval()
    half = to_bf16(model)
    assert all(p.dtype == torch.bfloat16 for p in half.parameters())
    assert all(p.dtype == torch.float32 for p in model.parameters())  # original untouched
    for name in TASKS:  # joint classifier, one-logit classifier, siamese cosine
        dev = trainer.data[name].dev
        ours = predict_outputs(half, name, dev, 64)
        assert ours.dtype == np.float32
        # bf16 rounds to 8 significant bits (2^-9 relative) at each operation's output
        np.testing.assert_allclose(ours, predict_outputs(model, name, dev, 64), atol=0.03)


def test_keep_fp32_leaves_the_named_modules_alone(trainer):
    quantized = quantize_dynamic(trainer.model, keep_fp32=["layers.0"])
    assert type(quantized.encoder.layers[0].attention.qkv) is nn.Linear
    assert type(quantized.encoder.layers[1].attention.qkv) is not nn.Linear


@pytest.mark.parametrize("quantize", [False, True])
@pytest.mark.parametrize("name", TASKS)
def test_onnx_round_trip(trainer, tmp_path, name, quantize):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    model = trainer.model.eval()
    dev, task = trainer.data[name].dev, trainer.data[name].config
    predictor = OnnxPredictor(export_onnx(model, name, tmp_path / "m.onnx", quantize), task)
    batch = collate(dev, np.arange(len(dev)), trainer.tokenizer.pad_id)  # rows of mixed lengths
    with torch.no_grad():
        expected = model(name, batch).predictions.numpy()
    np.testing.assert_allclose(predictor.outputs(batch), expected, atol=0.05 if quantize else 1e-4)
    if not quantize:
        np.testing.assert_allclose(predictor.predict(dev, 8), predict(model, name, dev, 8),
                                   atol=1e-4)


@pytest.mark.parametrize("conditioning", ["pals", "input"])
def test_onnx_export_keeps_task_conditioning(tiny_backbone, tiny_data, tmp_path, conditioning):
    pytest.importorskip("onnxruntime")
    options = "{rank: 8, heads: 2}" if conditioning == "pals" else "{}"
    trainer = trained(tiny_backbone, tiny_data, tmp_path, f"model.conditioning={conditioning}",
                      f"model.conditioning_options={options}", SIAMESE_QUORA)
    for name in TASKS:
        dev, task = trainer.data[name].dev, trainer.data[name].config
        predictor = OnnxPredictor(export_onnx(trainer.model, name, tmp_path / f"{name}.onnx"),
                                  task)
        np.testing.assert_allclose(predictor.predict(dev), predict(trainer.model, name, dev),
                                   atol=1e-4)


def test_missing_onnxruntime_is_a_clear_error(trainer, tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_onnxruntime(name, *args, **kwargs):
        if name == "onnxruntime":
            raise ImportError("no onnxruntime here")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_onnxruntime)
    with pytest.raises(ImportError, match="pip install onnxruntime"):
        export_onnx(trainer.model, "sst", tmp_path / "m.onnx")
