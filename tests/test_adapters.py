"""LoRA and MTL-LoRA: folding into the weights equals the adapted forward, the updates follow
their papers' formulas, a frozen encoder stays as it was."""

import pytest
import torch

from mtbert.config import ModelConfig
from mtbert.model.bert import PROJECTIONS, BertConfig, BertModel
from mtbert.model.conditioning import build_conditioning
from mtbert.model.conditioning.low_rank import fold
from mtbert.training import Trainer

from conftest import tiny_config

CONFIG = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                    intermediate_size=64, max_position_embeddings=16)
TASKS = ["sst", "sts"]


def adapters(variant, **options):
    torch.manual_seed(4)
    built = build_conditioning(ModelConfig(conditioning=variant, conditioning_options={
        "rank": 4, **options}), CONFIG, TASKS).eval()
    with torch.no_grad():  # trained-looking updates: B, Lambda and the mix away from init
        for p in built.parameters():
            p.add_(0.3 * torch.randn(p.shape))
    return built


@pytest.fixture(scope="module")
def batch():
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(5, CONFIG.vocab_size, (3, 9), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[2, 5:] = 0
    return input_ids, attention_mask


@pytest.mark.parametrize(("variant", "options"), [
    ("lora", {}), ("lora", {"targets": ["intermediate"]}),
    ("mtl_lora", {"up_projections": 3, "temperature": 0.5})])
def test_folded_weights_equal_the_adapted_forward(variant, options, batch):
    torch.manual_seed(0)  # float64: the comparison is about the algebra, not fp32 rounding
    encoder = BertModel(CONFIG).eval().double()
    conditioning = adapters(variant, **options).double()
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    with torch.no_grad():
        for task in TASKS:
            adapted, pooled = encoder(*batch, hooks=conditioning.hooks(task))
            folded, folded_pooled = fold(encoder, conditioning, task)(*batch)
            plain, _ = encoder(*batch)
            assert (adapted - plain).abs().max() > 1e-2  # the adapters do change the output
            torch.testing.assert_close(folded, adapted, atol=1e-10, rtol=1e-10)
            torch.testing.assert_close(folded_pooled, pooled, atol=1e-10, rtol=1e-10)
    for key, value in encoder.state_dict().items():  # folding works on a copy
        assert torch.equal(value, before[key]), key


def test_lora_update_is_scaled_b_times_a():
    lora = adapters("lora", alpha=12)
    x = torch.randn(5, CONFIG.hidden_size)
    update = lora.adapters["sts"][1]["qkv"]
    expected = torch.stack([(12 / 4) * update.up @ (update.down @ row) for row in x])
    torch.testing.assert_close(lora.delta("sts", 1, "qkv", x), expected)


def test_mtl_lora_update_mixes_the_shared_up_projections_per_task():
    mtl = adapters("mtl_lora", up_projections=3, temperature=2.0, alpha=8)
    x = torch.randn(5, CONFIG.intermediate_size)
    shared, own = mtl.shared[0]["output"], mtl.tasks["sst"][0]["output"]
    mix = torch.exp(own.mix / 2.0) / torch.exp(own.mix / 2.0).sum()
    expected = torch.zeros(5, CONFIG.hidden_size)
    for i in range(3):  # sum_i w_i B_i Lambda A x, row by row
        for n, row in enumerate(x):
            expected[n] += (8 / 4) * mix[i] * (shared.up[i] @ (own.transform @ (shared.down @ row)))
    torch.testing.assert_close(mtl.delta("sst", 0, "output", x), expected, atol=1e-5, rtol=1e-5)
    other = mtl.delta("sts", 0, "output", x)
    assert not torch.allclose(other, expected, atol=1e-3)  # another task, another update


def test_unknown_targets_and_bad_options_are_named():
    from mtbert.config import ConfigError
    for options, message in (({"targets": ["query"]}, "targets: distinct names among"),
                             ({"alpha": 0}, "alpha: expected a positive number"),
                             ({"temperature": -1}, "temperature: expected a positive")):
        with pytest.raises(ConfigError, match=message):
            build_conditioning(ModelConfig(conditioning="mtl_lora", conditioning_options=options),
                               CONFIG, TASKS)
    assert set(PROJECTIONS) == {"qkv", "attention_output", "intermediate", "output"}


def test_frozen_encoder_trains_only_adapters_and_heads(tmp_path, tiny_backbone, tiny_data):
    config = tiny_config(tiny_backbone, tiny_data, "model.conditioning=lora",
                         "model.conditioning_options={rank: 2}", "adapt.freeze_encoder=true",
                         max_steps=3)
    trainer = Trainer(config, tmp_path / "run")
    encoder = {k: v.clone() for k, v in trainer.model.encoder.state_dict().items()}
    lora = {k: v.clone() for k, v in trainer.model.conditioning.state_dict().items()}
    trainer.fit()
    assert trainer.model.shared_parameters() == []
    for key, value in trainer.model.encoder.state_dict().items():
        assert torch.equal(value, encoder[key]), key
    changed = [k for k, v in trainer.model.conditioning.state_dict().items()
               if not torch.equal(v, lora[k])]
    assert any(k.endswith(".up") for k in changed)


@pytest.mark.parametrize("technique", ["train.combiner=pcgrad", "train.weighting=gradnorm"])
def test_methods_on_encoder_gradients_refuse_a_frozen_encoder(technique, tiny_backbone,
                                                              tiny_data):
    from mtbert.config import ConfigError
    key = technique.split("=")[0]
    with pytest.raises(ConfigError, match=rf"{key}: .* acts on the encoder's gradients"):
        tiny_config(tiny_backbone, tiny_data, "adapt.freeze_encoder=true", technique)
    tiny_config(tiny_backbone, tiny_data, technique)  # fine with the encoder training


def test_mtl_lora_up_projections_part_from_the_real_initialisation(batch):
    """Nothing perturbed: at initialisation a step of two tasks gives each B_i a gradient of
    its own direction (the random mixes, as in the authors' code), so after one AdamW step
    the mixing weights get a gradient far above rounding. From an even mix every B_i gets the
    same gradient, stays equal to the others, and the mixes get none (float64 here)."""
    torch.manual_seed(0)
    encoder = BertModel(CONFIG).eval().double().requires_grad_(False)
    mtl = build_conditioning(ModelConfig(conditioning="mtl_lora", conditioning_options={
        "rank": 4, "up_projections": 3}), CONFIG, TASKS).double()
    targets = {task: torch.randn(3, 9, CONFIG.hidden_size, dtype=torch.float64)
               for task in TASKS}
    optimizer = torch.optim.AdamW(mtl.parameters(), lr=1e-3)

    def backward():
        optimizer.zero_grad()
        sum((encoder(*batch, hooks=mtl.hooks(task))[0] - targets[task]).square().mean()
            for task in TASKS).backward()

    backward()
    for layer in mtl.shared:
        for name, shared in layer.items():
            grads = shared.up.grad.flatten(1)  # (n, out * r)
            cosine = torch.nn.functional.cosine_similarity(grads[:, None], grads[None], dim=-1)
            assert (cosine[~torch.eye(3, dtype=torch.bool)] < 1 - 1e-6).all(), (name, cosine)
    optimizer.step()
    backward()
    for task in TASKS:
        for layer in mtl.tasks[task]:
            for name, own in layer.items():
                assert own.mix.grad.abs().max() > 1e-6, (task, name, own.mix.grad)
