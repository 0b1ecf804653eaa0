"""minBERT against transformers.BertModel: same weights, same outputs."""

import csv

import pytest
import torch

from mtbert.model.bert import BertConfig, BertModel, Dropout, TokenLayout
from mtbert.model.loading import (
    CheckpointError,
    hf_to_mtbert,
    load_bert,
    mtbert_to_hf,
    read_weights,
)
from mtbert.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")


def sst_sentences(data_dir, n):
    with open(data_dir / "ids-sst-dev.csv", encoding="utf-8") as f:
        rows = csv.DictReader(f, delimiter="\t")
        return [row["sentence"].strip() for _, row in zip(range(n), rows)]


def max_diff(ours, theirs, ids, mask):
    """Largest |difference| of hidden states at real tokens and of the pooler; padded positions
    (never computed by `forward`) must be zeros. The padded layout, which computes every
    position like transformers does, is compared at padding too."""
    hidden, pooled = ours(ids, mask)
    with torch.no_grad():
        out = theirs(input_ids=ids, attention_mask=mask)
    real = mask.bool()
    assert not hidden[~real].any()
    every_position = ours.encode(ids, None, TokenLayout.padded(mask))
    padding = (every_position - out.last_hidden_state).abs()[~real]
    return ((hidden - out.last_hidden_state).abs()[real].max().item(),
            padding.max().item() if padding.numel() else 0.0,
            (pooled - out.pooler_output).abs().max().item())


@torch.no_grad()
def test_embedded_backbone_matches_transformers(backbone_dir, data_dir):
    ours, _ = load_bert(backbone_dir)
    theirs = transformers.BertModel.from_pretrained(backbone_dir).eval()
    tokenizer = Tokenizer.from_folder(backbone_dir)
    ids, types = tokenizer.encode(sst_sentences(data_dir, 16))
    width = max(map(len, ids))
    assert min(map(len, ids)) < width, "the batch must contain padding"
    input_ids = torch.tensor([row + [0] * (width - len(row)) for row in ids])
    mask = (input_ids != 0).long()
    hidden_diff, padding_diff, pooled_diff = max_diff(ours, theirs, input_ids, mask)
    assert hidden_diff <= 1e-5
    assert pooled_diff <= 1e-5
    # States at padded positions are never used; there float noise grows (on this batch ours
    # are 1.0e-5 from transformers' SDPA path and 2.0e-5 from its eager path).
    assert padding_diff <= 5e-5


SHAPES = {
    "bert-base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                      intermediate_size=3072),
    "tiny-2x64": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=128),
    "odd-3x96": dict(hidden_size=96, num_hidden_layers=3, num_attention_heads=3,
                     intermediate_size=200, max_position_embeddings=64, type_vocab_size=3),
}


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("fmt", ["safetensors", "bin", "bin-prefixed", "safetensors-prefixed"])
@torch.no_grad()
def test_random_berts_of_other_shapes(tmp_path, shape, fmt):
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=1000, **SHAPES[shape])
    if fmt.endswith("prefixed"):
        theirs = transformers.BertForPreTraining(config).eval()  # keys start with "bert."
        reference = theirs.bert
    else:
        theirs = reference = transformers.BertModel(config).eval()
    theirs.save_pretrained(tmp_path)
    if fmt.startswith("bin"):  # transformers 5 writes only safetensors: write the legacy file
        (tmp_path / "model.safetensors").unlink()
        torch.save(theirs.state_dict(), tmp_path / "pytorch_model.bin")
    if fmt.endswith("prefixed"):
        assert any(k.startswith("bert.") for k in read_weights(tmp_path))
    ours, _ = load_bert(tmp_path)
    input_ids = torch.randint(1, 1000, (3, 17))
    mask = torch.ones_like(input_ids)
    mask[1, 9:] = 0
    mask[2, 4:] = 0
    hidden_diff, padding_diff, pooled_diff = max_diff(ours, reference, input_ids, mask)
    assert hidden_diff <= 1e-5 and pooled_diff <= 1e-5 and padding_diff <= 5e-5


def test_state_dict_names_round_trip():
    torch.manual_seed(0)
    reference = transformers.BertModel(transformers.BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64))
    hf_state = {k: v for k, v in reference.state_dict().items() if "position_ids" not in k}
    mapped, _ = hf_to_mtbert(hf_state)
    back = mtbert_to_hf(mapped)
    assert back.keys() == hf_state.keys()
    assert all(torch.equal(back[k], hf_state[k]) for k in hf_state)


def test_config_from_dict_rejects_unsupported():
    with pytest.raises(ValueError, match="multiple"):
        BertConfig(hidden_size=30, num_attention_heads=4)
    with pytest.raises(ValueError, match="absolute"):
        BertConfig.from_dict({"position_embedding_type": "relative_key"})


def test_dropout_only_in_training():
    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, intermediate_size=64))
    ids = torch.randint(1, 50, (2, 7))
    model.eval()
    assert torch.equal(model(ids)[0], model(ids)[0])
    model.train()
    assert not torch.equal(model(ids)[0], model(ids)[0])


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_drops_at_rate_p_and_rescales(p):
    torch.manual_seed(0)
    x = torch.rand(64, 33, 384) + 0.5  # odd element count: the last 64-bit word is partial
    dropout = Dropout(p).train()
    y = dropout(x)
    dropped = (y == 0).double().mean().item()
    assert abs(dropped - p) < 5 * (p * (1 - p) / x.numel()) ** 0.5  # 5 standard errors
    kept = y != 0
    assert torch.allclose(y[kept], x[kept] / (1 - p))
    # the gradient flows through kept elements only, with the same scale
    x.requires_grad_(True)
    torch.manual_seed(1)
    y = dropout(x)
    y.sum().backward()
    assert torch.allclose(x.grad, (y != 0).float() / (1 - p))
    # seeded: the same mask again; eval and p = 0: the identity
    torch.manual_seed(1)
    assert torch.equal(dropout(x), y)
    assert dropout.eval()(x) is x and Dropout(0.0).train()(x) is x
    # no pattern across positions: each of the 4 elements sharing a word drops at rate p
    flat = (Dropout(p).train()(torch.ones(400_000)) == 0).view(-1, 4).double().mean(0)
    assert (flat - p).abs().max() < 5 * (p * (1 - p) / 100_000) ** 0.5


class TestBadCheckpoints:
    def save_tiny(self, folder):
        config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, intermediate_size=64)
        transformers.BertModel(config).save_pretrained(folder)
        return config

    def test_missing_folder(self, tmp_path):
        with pytest.raises(CheckpointError, match="does not exist"):
            load_bert(tmp_path / "nope")

    def test_missing_weights(self, tmp_path):
        self.save_tiny(tmp_path)
        (tmp_path / "model.safetensors").unlink()
        with pytest.raises(CheckpointError, match="neither model.safetensors nor"):
            load_bert(tmp_path)

    def test_missing_config(self, tmp_path):
        self.save_tiny(tmp_path)
        (tmp_path / "config.json").unlink()
        with pytest.raises(CheckpointError, match="no config.json"):
            load_bert(tmp_path)

    def test_wrong_shapes_named(self, tmp_path):
        config = self.save_tiny(tmp_path)
        config.intermediate_size = 48
        config.save_pretrained(tmp_path)
        with pytest.raises(CheckpointError, match=r"layers\.0\.feed_forward\.intermediate\.weight"):
            load_bert(tmp_path)

    def test_missing_and_unexpected_keys_named(self, tmp_path):
        from safetensors.torch import save_file
        self.save_tiny(tmp_path)
        state = read_weights(tmp_path)
        state.pop("encoder.layer.0.output.dense.bias")
        state["encoder.layer.0.extra.weight"] = torch.zeros(2)
        save_file(state, tmp_path / "model.safetensors")
        with pytest.raises(CheckpointError, match=r"layers\.0\.feed_forward\.output\.bias.*extra"):
            load_bert(tmp_path)

    def test_truncated_safetensors(self, tmp_path):
        self.save_tiny(tmp_path)
        weights = tmp_path / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:1000])
        with pytest.raises(CheckpointError, match="not a valid safetensors"):
            load_bert(tmp_path)

    def test_malicious_pickle_is_refused_without_running(self, tmp_path):
        import pickle
        self.save_tiny(tmp_path)
        (tmp_path / "model.safetensors").unlink()
        marker = tmp_path / "pwned"

        class Exploit:
            def __reduce__(self):
                return (open, (str(marker), "w"))

        with open(tmp_path / "pytorch_model.bin", "wb") as f:
            pickle.dump({"weight": Exploit()}, f)
        with pytest.raises(CheckpointError, match="refused"):
            load_bert(tmp_path)
        assert not marker.exists()

    def test_pickle_of_non_tensors_is_refused(self, tmp_path):
        self.save_tiny(tmp_path)
        (tmp_path / "model.safetensors").unlink()
        torch.save({"weight": [1, 2, 3]}, tmp_path / "pytorch_model.bin")
        with pytest.raises(CheckpointError, match="dict of tensors"):
            load_bert(tmp_path)

    def test_offline_hub_id_fails_with_one_sentence(self, monkeypatch):
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        with pytest.raises(CheckpointError) as error:
            load_bert("some-org/definitely-not-cached-model")
        assert "could not download 'some-org/definitely-not-cached-model'" in str(error.value)
        assert error.value.__cause__ is None


def test_attention_with_dropout_is_sdpa_math_with_the_dropout_mask():
    """The CPU training path computes what `scaled_dot_product_attention` does, masks
    included, with `dropout`'s mask on the attention weights (the generator is reset before
    each); without dropout it is SDPA itself."""
    import torch.nn.functional as F

    from mtbert.model.bert import attention_with_dropout, dropout

    torch.manual_seed(0)
    q, k, v = (torch.randn(3, 2, 7, 4, requires_grad=True) for _ in range(3))
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3, [1] + [0] * 6]).bool()[:, None, None, :]

    def reference():
        weights = F.scaled_dot_product_attention(q, k, torch.eye(7).expand(3, 2, 7, 7),
                                                 attn_mask=mask)  # softmax of the scores
        keep = dropout(torch.ones(3, 2, 7, 7), 0.3)  # drawn as `attention_with_dropout` does
        return (weights * keep) @ v

    results = []
    for attend in (reference, lambda: attention_with_dropout(q, k, v, mask, 0.3)):
        torch.manual_seed(1)
        y = attend()
        grads = torch.autograd.grad((y * torch.arange(4.0)).sum(), (q, k, v))
        results.append((y, *grads))
    for ours, theirs in zip(results[1], results[0]):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    torch.manual_seed(1)
    assert not torch.equal(attention_with_dropout(q, k, v, mask, 0.3),
                           attention_with_dropout(q, k, v, mask, 0.0))  # dropout did drop
    torch.testing.assert_close(attention_with_dropout(q, k, v, mask, 0.0),
                               F.scaled_dot_product_attention(q, k, v, attn_mask=mask))


def test_rows_rounded_up_give_the_same_outputs_and_gradients():
    """Filler rows (`TokenLayout.packed(..., row_multiple)`) change nothing real tokens get."""
    torch.manual_seed(0)
    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=32,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = BertModel(config)
    ids = torch.randint(5, 50, (3, 9))
    for mask in (torch.tensor([[1] * 9, [1] * 5 + [0] * 4, [1] * 2 + [0] * 7]),
                 torch.ones(3, 9, dtype=torch.long)):
        results = []
        for multiple in (1, 16):
            layout = TokenLayout.packed(mask, multiple)
            if multiple > 1:
                assert layout.index.numel() % multiple == 0
            hidden = model.encode(ids, None, layout)
            weights = torch.arange(16.0)
            params = [p for n, p in model.named_parameters() if not n.startswith("pooler")]
            grads = torch.autograd.grad((hidden * weights).sum(), params)
            results.append((hidden, *grads))
        for rounded, exact in zip(*results[::-1]):
            torch.testing.assert_close(rounded, exact, rtol=1e-5, atol=1e-6)
