"""Task-aware encoders: exact at initialisation, task-specific once trained, gradients stay in
the served task, parameter counts, errors, save and reload."""

from pathlib import Path

import numpy as np
import pytest
import torch

from mtbert.config import ConfigError, ModelConfig, load_config
from mtbert.evaluation import predict
from mtbert.model.bert import BertConfig, BertModel
from mtbert.model.conditioning import CONDITIONINGS, build_conditioning
from mtbert.model.conditioning.pals import pal_shape
from mtbert.model_folder import load_model
from mtbert.training import Trainer

from conftest import tiny_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "conditioning"
TASKS = ["sst", "quora", "sts"]
# Options for the tiny encoder (H = 32, 2 heads); the defaults are checked at full size below.
OPTIONS = {"input": {}, "attention": {}, "projected": {"embedding_size": 16},
           "projected_activation": {"embedding_size": 16, "activation": "tanh"},
           "pals": {"rank": 8, "heads": 2}, "lora": {"rank": 4, "alpha": 8},
           "mtl_lora": {"rank": 4, "up_projections": 2, "targets": ["qkv", "output"]}}
EXACT_AT_INIT = ["input", "attention", "projected", "pals", "lora", "mtl_lora"]
SHARED_PARAMETERS = {"projected", "projected_activation", "mtl_lora"}  # some owned by no task
CONFIG = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                    intermediate_size=64, max_position_embeddings=16)


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    return BertModel(CONFIG).eval()


@pytest.fixture(scope="module")
def batch():
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(5, CONFIG.vocab_size, (3, 9), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 6:] = 0  # padding, so the attention mask is used
    return input_ids, attention_mask


def build(variant):
    torch.manual_seed(2)
    model_config = ModelConfig(conditioning=variant, conditioning_options=OPTIONS[variant])
    return build_conditioning(model_config, CONFIG, TASKS)


def perturb(conditioning):
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in conditioning.parameters():
            p.add_(0.5 * torch.randn(p.shape, generator=generator))


def encode(encoder, batch, hooks=None):
    hidden, pooled = encoder(*batch, hooks=hooks)
    return torch.cat([hidden.flatten(), pooled.flatten()])


def owner(name):
    """The task a parameter belongs to, from its name; None: shared by all tasks."""
    return next((part for part in name.split(".") if part in TASKS), None)


def test_registry_has_the_seven_variants():
    assert sorted(CONDITIONINGS) == sorted(OPTIONS)


@pytest.mark.parametrize("variant", EXACT_AT_INIT)
def test_zero_initialised_variants_start_as_the_plain_encoder(variant, encoder, batch):
    conditioning = build(variant).eval()
    plain = encode(encoder, batch)
    for task in TASKS:
        assert torch.equal(encode(encoder, batch, conditioning.hooks(task)), plain), task


def test_activation_variant_starts_the_same_for_every_task(encoder, batch):
    conditioning = build("projected_activation").eval()
    outputs = [encode(encoder, batch, conditioning.hooks(task)) for task in TASKS]
    assert all(torch.equal(outputs[0], other) for other in outputs[1:])
    assert not torch.allclose(outputs[0], encode(encoder, batch))  # tanh is not the identity


@pytest.mark.parametrize("variant", OPTIONS)
def test_trained_conditioning_differs_between_tasks(variant, encoder, batch):
    conditioning = build(variant).eval()
    perturb(conditioning)
    outputs = [encode(encoder, batch)] + [
        encode(encoder, batch, conditioning.hooks(task)) for task in TASKS]
    for i in range(len(outputs)):
        for j in range(i):
            assert not torch.allclose(outputs[i], outputs[j], atol=1e-4), (i, j)


@pytest.mark.parametrize("variant", OPTIONS)
def test_gradients_reach_only_the_served_task(variant, encoder, batch):
    conditioning = build(variant).train()
    perturb(conditioning)
    named = dict(conditioning.named_parameters())
    assert any(owner(name) is None for name in named) == (variant in SHARED_PARAMETERS)
    for task in TASKS:
        conditioning.zero_grad(set_to_none=True)
        encode(encoder, batch, conditioning.hooks(task)).square().sum().backward()
        for name, p in named.items():
            if owner(name) in (task, None):
                assert p.grad is not None and p.grad.abs().sum() > 0, (task, name)
            else:
                assert p.grad is None or not p.grad.any(), (task, name)
    encoder.zero_grad(set_to_none=True)


def test_task_key_vectors_get_no_gradient(encoder, batch):
    """Softmax cancels a shift shared by all of a query's scores: K_task is inert."""
    conditioning = build("attention")
    perturb(conditioning)
    encode(encoder, batch, conditioning.hooks("sst")).square().sum().backward()
    grad = conditioning.vectors["sst"].grad.abs().amax(dim=-1)  # (L, 3): Q, K, V
    assert (grad[:, 1] < 1e-4 * grad[:, [0, 2]].amin(dim=1)).all(), grad
    encoder.zero_grad(set_to_none=True)


def test_hooks_are_cached_per_task():
    conditioning = build("pals")
    assert conditioning.hooks("sst") is conditioning.hooks("sst")
    assert conditioning.hooks("sst") is not conditioning.hooks("sts")
    with pytest.raises(ValueError, match="'nli'"):
        conditioning.hooks("nli")


# Default options at the default backbone's shape (MiniLM: H = 384, 6 layers, 12 heads).
H, L, T = 384, 6, len(TASKS)
R = 108  # the multiple of 12 heads nearest 0.266 * 384
FORMULAS = {"input": T * H,
            "attention": T * L * 3 * H,
            "projected": T * H + L * 3 * H * H,
            "projected_activation": T * H + L * 3 * H * H + L * 3 * (H * H + H),
            "pals": T * (2 * H * R + R + H + L * 3 * (R * R + R)),
            # rank 8 on qkv (H -> 3H), attention output (H -> H), intermediate (H -> 4H) and
            # output (4H -> H): inputs H + H + H + 4H, outputs 3H + H + 4H + H
            "lora": T * L * 8 * (7 * H + 9 * H),
            # + 3 up projections shared; per task an 8 x 8 transform and 3 mixing weights
            "mtl_lora": L * (8 * 7 * H + 3 * 8 * 9 * H + 4 * T * (8 * 8 + 3))}


@pytest.mark.parametrize("variant", OPTIONS)
def test_added_parameters_match_the_formula_and_the_module(variant):
    config = BertConfig(vocab_size=50, hidden_size=H, num_hidden_layers=L, num_attention_heads=12,
                        intermediate_size=4 * H)
    conditioning = CONDITIONINGS[variant](config, TASKS)
    actual = sum(p.numel() for p in conditioning.parameters())
    assert conditioning.added_parameters() == actual == FORMULAS[variant]
    tiny = build(variant)
    assert tiny.added_parameters() == sum(p.numel() for p in tiny.parameters())


def test_pal_rank_and_heads():
    assert pal_shape(768, None, None) == (204, 12)  # the paper's BERT-base PALs
    assert pal_shape(384, None, None) == (R, 12)
    assert pal_shape(384, 100, None) == (100, 10)  # heads capped to a divisor of the rank
    assert pal_shape(384, None, 4) == (104, 4)  # 4 * round(0.266 * 384 / 4)
    with pytest.raises(ValueError, match=r"rank \(100\) must be a multiple of heads \(12\)"):
        pal_shape(384, 100, 12)


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.stem)
def test_conditioning_configs_build_their_variant(path):
    config = load_config(path)
    assert config.model.conditioning == path.stem and config.name == f"conditioning-{path.stem}"
    shape = BertConfig(vocab_size=50, hidden_size=H, num_hidden_layers=L, num_attention_heads=12,
                        intermediate_size=4 * H)
    conditioning = build_conditioning(config.model, shape, [t.name for t in config.tasks])
    assert conditioning.added_parameters() == FORMULAS[path.stem]
    command = f"# mtbert train --config configs/conditioning/{path.name}\n"
    assert path.read_text().startswith(command)


@pytest.mark.parametrize(("variant", "options", "message"), [
    ("palz", {}, r"model\.conditioning: unknown variant 'palz'"),
    ("pals", {"rnak": 8}, r"model\.conditioning_options\.rnak: unknown option for 'pals'"),
    ("input", {"rank": 8}, r"model\.conditioning_options\.rank: unknown option for 'input'"),
    ("pals", {"rank": 0}, r"rank: expected a positive integer, got 0"),
    ("projected", {"embedding_size": "big"}, r"embedding_size: expected a positive integer"),
    ("projected_activation", {"activation": "relu"}, r"activation: unknown 'relu'"),
])
def test_unknown_variants_and_options_are_named(variant, options, message):
    with pytest.raises(ConfigError, match=message):
        build_conditioning(ModelConfig(conditioning=variant, conditioning_options=options),
                           CONFIG, TASKS)


@pytest.mark.parametrize("variant", OPTIONS)
def test_conditioned_model_trains_saves_and_reloads(variant, tmp_path, tiny_backbone, tiny_data):
    options = "{" + ", ".join(f"{k}: {v}" for k, v in OPTIONS[variant].items()) + "}"
    config = tiny_config(tiny_backbone, tiny_data, f"model.conditioning={variant}",
                         f"model.conditioning_options={options}", max_steps=2)
    trainer = Trainer(config, tmp_path / "run")
    initial = {k: v.clone() for k, v in trainer.model.conditioning.state_dict().items()}
    trainer.fit()
    reloaded, _, _ = load_model(tmp_path / "run")
    saved = reloaded.conditioning.state_dict()
    assert saved.keys() == initial.keys()
    assert any(not torch.equal(saved[k], initial[k]) for k in saved)  # it trained
    for name, data in trainer.data.items():
        np.testing.assert_array_equal(predict(reloaded, name, data.dev, 64),
                                      predict(trainer.model, name, data.dev, 64))
