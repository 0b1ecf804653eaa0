"""One way in and out of a model folder: the trainer, the CLI, the API, the report and the
export all save and load trained models here.

A folder says what it is in `mtbert_config.json`:

- `multitask` (a run's `best/`): `model.safetensors` holds the whole `MultitaskModel` under
  mtbert's parameter names (encoder, conditioning, heads). There is deliberately no
  `config.json`: `transformers` must not mistake the folder for a `BertModel` and load it
  with random weights. `mtbert export` writes folders that `transformers` reads.
- `export` (written by `mtbert export --format hf|sentence-transformers`): a standard BERT
  folder (`config.json`, `model.safetensors` under Hugging Face names, tokenizer files) plus
  the heads in `mtbert_heads.safetensors`.
- `onnx`: ONNX graphs per task; run them with `mtbert.inference.OnnxPredictor`.

Every folder also holds `experiment.yaml` (the resolved config), `metrics.json`, the
tokenizer and a sha256 `manifest.json`. Folders written before `mtbert_config.json`
existed (encoder config in `config.json`) still load.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from mtbert.checkpoint import (
    CorruptCheckpointError,
    load_tensors,
    save_json,
    save_tensors,
    verify_checkpoint,
    write_checkpoint,
)
from mtbert.config import ConfigError, ExperimentConfig, dump_config, load_config
from mtbert.model.bert import BertConfig, BertModel, current_key
from mtbert.model.conditioning import build_conditioning
from mtbert.model.loading import CheckpointError, load_bert
from mtbert.model.moe import upcycle
from mtbert.model.multitask import MultitaskModel
from mtbert.tokenizer import Tokenizer

FORMAT_FILE = "mtbert_config.json"
HEADS_FILE = "mtbert_heads.safetensors"
FORMAT_VERSION = 1
# Files a folder of each layout cannot do without (checked against its manifest).
REQUIRED = {"multitask": ["model.safetensors", "experiment.yaml"],
            "export": ["model.safetensors", "config.json", HEADS_FILE, "experiment.yaml"]}


def build_model(config: ExperimentConfig, encoder: BertModel) -> MultitaskModel:
    """The multitask model of `config` around `encoder`: conditioning (if any), heads, and
    mixture-of-experts layers upcycled from the encoder's (in place) if configured."""
    names = [t.name for t in config.tasks]
    conditioning = build_conditioning(config.model, encoder.config, names)
    routing = None
    if config.model.moe is not None:
        try:
            routing = upcycle(encoder, config.model.moe, names)
        except ValueError as error:
            raise ConfigError(f"model.moe: {error}") from None
    return MultitaskModel(encoder, config.tasks, conditioning, routing)


def format_record(layout: str, encoder: BertConfig | None = None, **extra) -> dict:
    """The content of `mtbert_config.json` for a folder of `layout`."""
    record = {"format": "mtbert", "version": FORMAT_VERSION, "layout": layout}
    if encoder is not None:
        record["encoder"] = asdict(encoder)
    return record | extra


def write_common(folder: Path, tokenizer: Tokenizer, config: ExperimentConfig,
                 metrics: dict) -> None:
    """What every model folder holds beside its weights: tokenizer, config, metrics."""
    tokenizer.save(folder)
    dump_config(config, folder / "experiment.yaml")
    save_json(folder / "metrics.json", metrics)


def save_model(folder: Path, model: MultitaskModel, tokenizer: Tokenizer,
               config: ExperimentConfig, metrics: dict) -> None:
    """Atomically write a `multitask` folder: everything `evaluate`, `predict`, `export` and
    `mtbert.load` need (weights, encoder config, tokenizer, config, metrics at save time)."""

    def write(tmp: Path) -> None:
        save_tensors(tmp / "model.safetensors", model.state_dict())
        save_json(tmp / FORMAT_FILE, format_record(
            "multitask", model.encoder.config,
            note="mtbert parameter names, heads included; not a transformers folder: "
                 "`mtbert export RUN OUT --format hf` writes one"))
        write_common(tmp, tokenizer, config, metrics)

    write_checkpoint(folder, write)


def model_folder(path: str | Path) -> Path:
    """The model folder of `path`: a run's `best/` (or `.best.old`, left when a write of
    `best/` was interrupted), or `path` itself."""
    path = Path(path)
    for candidate in ("best", ".best.old"):
        if (path / candidate).is_dir():
            return path / candidate
    if not path.is_dir():
        what = "is a file, not a folder" if path.exists() else "no such folder"
        raise CheckpointError(f"{path}: {what} (expected a run folder, its best/, or a folder "
                              "written by `mtbert export`)")
    return path


def read_layout(folder: Path) -> dict:
    """`mtbert_config.json` of `folder` (synthesised for folders written before it existed);
    a folder that is not mtbert's is an error that says what is missing."""
    format_file = folder / FORMAT_FILE
    if format_file.is_file():
        try:
            record = json.loads(format_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise CorruptCheckpointError(f"{format_file} is unreadable: {error}") from None
        if record.get("format") != "mtbert" or record.get("version", 0) > FORMAT_VERSION:
            raise CheckpointError(f"{format_file}: not an mtbert folder of a version this "
                                  f"mtbert reads (format {record.get('format')!r}, version "
                                  f"{record.get('version')!r})")
        return record
    has_config = (folder / "config.json").is_file()
    if has_config and (folder / "experiment.yaml").is_file():
        return {"layout": "multitask", "legacy": True}  # best/ before mtbert_config.json
    if has_config:
        raise CheckpointError(
            f"{folder} is a plain BERT checkpoint (config.json and weights) without mtbert's "
            f"task heads ({HEADS_FILE}) and experiment config (experiment.yaml); "
            "to fine-tune it, use it as model.backbone")
    raise CheckpointError(
        f"{folder} is not an mtbert model folder: it has no {FORMAT_FILE} and no "
        "experiment.yaml (expected a run folder, its best/, or a folder written by "
        "`mtbert export`)")


def load_model(path: str | Path) -> tuple[MultitaskModel, Tokenizer, ExperimentConfig]:
    """A model folder (a run, its `best/`, or an hf / sentence-transformers export) as
    (model in eval mode on the CPU, tokenizer, resolved experiment config)."""
    folder = model_folder(path)
    layout = read_layout(folder)
    if layout["layout"] not in REQUIRED:
        raise CheckpointError(f"{folder} is an {layout['layout']} export: run its graphs with "
                              "mtbert.inference.OnnxPredictor")
    legacy = layout.get("legacy", False)
    verify_checkpoint(folder, REQUIRED[layout["layout"]] + (["config.json"] if legacy else []))
    config = load_config(folder / "experiment.yaml")
    if layout["layout"] == "multitask":
        bert_config = (BertConfig.from_json(folder / "config.json") if legacy
                       else BertConfig.from_dict(layout["encoder"]))
        model = build_model(config, BertModel(bert_config))
        _load_weights(model, load_tensors(folder / "model.safetensors"), folder, set())
    else:
        model = build_model(config, load_bert(folder)[0])
        encoder_keys = {f"encoder.{k}" for k in model.encoder.state_dict()}
        _load_weights(model, load_tensors(folder / HEADS_FILE), folder, encoder_keys)
    try:
        tokenizer = Tokenizer.from_folder(folder, config.model.max_length)
    except ValueError as error:
        raise CheckpointError(f"{folder}: {error}") from None
    return model.eval(), tokenizer, config


def _load_weights(model: MultitaskModel, state: dict, folder: Path, loaded: set[str]) -> None:
    """Copy `state` into `model`; every parameter not in `loaded` must come from it, in its
    shape. Keys of weights saved before the encoder's FFN was a module are renamed."""
    state = {current_key(k, "encoder."): v for k, v in state.items()}
    expected = model.state_dict()
    missing = sorted(expected.keys() - state.keys() - loaded)
    unexpected = sorted(state.keys() - expected.keys())
    if missing or unexpected:
        raise CorruptCheckpointError(
            f"{folder}: weights do not fit the model: missing {missing[:3]}, unexpected "
            f"{unexpected[:3]} ({len(missing)} and {len(unexpected)} in all)")
    for key, tensor in state.items():
        if tensor.shape != expected[key].shape:
            raise CorruptCheckpointError(
                f"{folder}: {key} has shape {list(tensor.shape)}, the model expects "
                f"{list(expected[key].shape)}")
    model.load_state_dict(state, strict=False)
