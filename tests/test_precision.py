"""`train.precision`: auto picks bf16 only where the device has fast bf16; bf16 training
steps give fp32's losses to within bf16 rounding."""

import json

import pytest
import torch

from mtbert import precision
from mtbert.training import Trainer

from conftest import SIAMESE_HEADS, tiny_config

CPU = torch.device("cpu")


@pytest.mark.parametrize("fast, expected", [(False, "fp32"), (True, "bf16")])
def test_auto_follows_the_bf16_probe(monkeypatch, fast, expected):
    monkeypatch.setattr(precision, "cpu_has_fast_bf16", lambda: fast)
    assert precision.resolve_precision("auto", CPU) == expected
    # an explicit setting is kept whatever the device has
    assert precision.resolve_precision("fp32", CPU) == "fp32"
    assert precision.resolve_precision("bf16", CPU) == "bf16"


def test_unknown_precision_is_refused():
    with pytest.raises(ValueError, match="precision"):
        precision.resolve_precision("fp16", CPU)


@pytest.mark.parametrize("fast, expected", [(False, torch.float32), (True, torch.bfloat16)])
def test_auto_run_trains_in_the_chosen_precision_and_records_it(
        monkeypatch, tmp_path, tiny_backbone, tiny_data, fast, expected):
    monkeypatch.setattr(precision, "cpu_has_fast_bf16", lambda: fast)
    config = tiny_config(tiny_backbone, tiny_data, *SIAMESE_HEADS, max_steps=1,
                         precision="auto", device="cpu")
    trainer = Trainer(config, tmp_path / "run")
    seen = []
    layer = trainer.model.encoder.layers[0].feed_forward.intermediate
    layer.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    trainer.fit()
    assert seen[0] == expected  # the matrix products of the training step
    assert json.loads((tmp_path / "run" / "run.json").read_text())["precision"] == \
        {torch.float32: "fp32", torch.bfloat16: "bf16"}[expected]
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
    assert all(s["exp_avg"].dtype == torch.float32 for s in trainer.optimizer.state.values())


# bf16 keeps 8 significant bits: each rounding is within 2^-9 (0.2%) relative. Through the six
# layers of MiniLM and three optimizer steps the task losses came out within 0.4% of fp32's;
# the test allows 1% (relative, or 0.01 absolute for losses below 1). A precision bug (a loss
# or softmax computed in bf16, weights or Adam moments kept in bf16) moves them further.
LOSS_TOLERANCE = 0.01


def test_bf16_training_steps_give_fp32_losses(tmp_path, backbone_dir, tiny_data):
    losses = {}
    for name in ("fp32", "bf16"):
        # no dropout: bf16 steps round their packed rows up (`BertModel.row_multiple`), so
        # they draw dropout masks for more rows and would drop other activations than fp32
        config = tiny_config(backbone_dir, tiny_data, *SIAMESE_HEADS, "model.hidden_dropout=0.0",
                             "model.attention_dropout=0.0", max_steps=3, precision=name,
                             device="cpu", lr=5e-5, head_lr=1e-3)
        trainer = Trainer(config, tmp_path / name)
        losses[name] = [trainer.train_step() for _ in range(3)]
    for step, (full, half) in enumerate(zip(losses["fp32"], losses["bf16"])):
        for key in (k for k in full if k.endswith("/loss")):
            assert half[key] == pytest.approx(full[key], rel=LOSS_TOLERANCE,
                                              abs=LOSS_TOLERANCE), (step, key)
    assert losses["fp32"] != losses["bf16"]  # bf16 did round something
