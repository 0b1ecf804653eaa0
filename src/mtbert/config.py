"""Typed configuration: dataclasses own every default; YAML and command-line overrides fill them.

Unknown keys and values of the wrong type fail with a `ConfigError` naming the key, e.g.
`train.lr: expected a number, got 'fast'`. Task entries may start from a built-in preset
(`preset: sst`) and override any field of it.
"""

from __future__ import annotations

import copy
import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

SAFE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


class ConfigError(ValueError):
    """A configuration value is missing, unknown or of the wrong type; the message names it."""


@dataclass
class HeadConfig:
    """How a task turns encoder states into predictions (see `model/heads.py`).

    type: `classifier` (an MLP on one pooled vector: the sentence, or the jointly encoded
    pair `[CLS] a [SEP] b [SEP]`), `cosine` (siamese: cosine of the two sentence embeddings),
    `pair_features` (siamese: MLP on [u, v, |u-v|, u*v], Reimers & Gurevych 2019).
    """

    type: Literal["classifier", "cosine", "pair_features"] = "classifier"
    pooling: Literal["pooler", "cls", "mean"] = "pooler"
    hidden_layers: int = 0
    hidden_size: int | None = None  # None: the encoder's hidden size
    dropout: float = 0.1
    cosine_scale: Literal["fixed", "learned"] = "fixed"
    features: list[str] = field(default_factory=lambda: ["u", "v", "abs_diff", "product"])


@dataclass
class AuxiliaryMnrlConfig:
    """Multiple negatives ranking loss on a pair task's sentence embeddings (Henderson et al.
    2017), positives chosen by gold label or by embedding cosine above an annealed threshold."""

    rule: Literal["label", "cosine", "all"] = "label"
    start: float = 4.4
    step_per_epoch: float = 0.05
    scale: float = 20.0
    weight: float = 1.0


@dataclass
class TaskConfig:
    """One task: its data, input kind, output kind, head, loss and metric."""

    name: str = ""
    preset: str | None = None
    text_columns: list[str] = field(default_factory=lambda: ["sentence"])
    label_column: str | None = None
    id_column: str = "id"
    kind: Literal["classification", "regression"] = "classification"
    num_classes: int | None = None
    label_names: list[str] | None = None  # class names, index order; None: "0", "1", ...
    label_range: list[float] | None = None
    train_file: str | None = None
    dev_file: str | None = None
    test_file: str | None = None
    metric: Literal["accuracy", "pearson", "spearman"] = "accuracy"
    prediction_column: str = "Predicted_Label"
    head: HeadConfig = field(default_factory=HeadConfig)
    loss: str | None = None  # None: cross_entropy / bce / mse by kind
    loss_options: dict[str, Any] = field(default_factory=dict)
    batch_size: int | None = None  # None: train.batch_size
    weight: float = 1.0  # used by the `static` weighting
    mnrl: AuxiliaryMnrlConfig | None = None

    @property
    def is_pair(self) -> bool:
        return len(self.text_columns) == 2


@dataclass
class ModelConfig:
    backbone: str = "all-minilm-l6-v2"
    max_length: int = 128
    hidden_dropout: float | None = None  # None: the checkpoint's value
    attention_dropout: float | None = None
    conditioning: str | None = None  # a task-conditioning variant (see model/conditioning)
    conditioning_options: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainConfig:
    epochs: float = 3.0
    batch_size: int = 32
    lr: float = 5e-5
    head_lr: float | None = None  # None: lr
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    grad_clip: float = 1.0
    grad_accumulation: int = 1
    seed: int = 11711
    sampler: str = "round_robin"
    sampler_options: dict[str, Any] = field(default_factory=dict)
    weighting: str = "sum"
    weighting_options: dict[str, Any] = field(default_factory=dict)
    weighting_lr: float = 1e-2
    combiner: Literal["sum", "pcgrad"] = "sum"
    eval_batch_size: int = 128
    evals_per_epoch: int = 1
    max_steps: int | None = None  # stop early (budgets, smoke tests)
    max_train_examples: int | None = None  # per task; subsample for budgets and tests
    max_eval_examples: int | None = None
    max_bad_steps: int = 5  # NaN/inf steps in a row before training stops
    checkpoint_every: int = 200  # optimizer steps between resume checkpoints (also at evals)
    keep_checkpoints: int = 2  # the newest N resume checkpoints are kept
    threads: int | None = None  # None: all cores
    device: str = "auto"  # auto (cuda when available), cpu, cuda, cuda:N
    precision: Literal["fp32", "bf16"] = "fp32"  # bf16: autocast on CUDA (slow on CPUs)


@dataclass
class ExperimentConfig:
    name: str = "default"
    data_dir: str = "../shared/data"
    model: ModelConfig = field(default_factory=ModelConfig)
    tasks: list[TaskConfig] = field(default_factory=list)
    train: TrainConfig = field(default_factory=TrainConfig)
    strict_data: bool = False  # malformed rows are errors instead of skipped rows
    max_skipped_share: float = 0.05  # reading fails when more of a file's rows are malformed

    def task(self, name: str) -> TaskConfig:
        for task in self.tasks:
            if task.name == name:
                return task
        raise ConfigError(f"no task named {name!r}; tasks: {[t.name for t in self.tasks]}")


# ---------------------------------------------------------------- dict -> dataclass, checked


def from_dict(cls: type, data: Any, where: str = "") -> Any:
    """Build dataclass `cls` from plain data, checking names and types; errors name the key."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{_join(where, unknown[0])}: unknown key; known keys: {sorted(known)}")
    return cls(**{key: _convert(hints[key], value, _join(where, key))
                  for key, value in data.items()})


def _join(where: str, key: Any) -> str:
    return f"{where}.{key}" if where else str(key)


def _convert(hint: Any, value: Any, where: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _convert(option, value, where)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(errors[0])
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: expected one of {list(args)}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_convert(args[0], v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return {k: _convert(args[1], v, _join(where, k)) for k, v in value.items()}
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, where)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):  # YAML reads 5e-5 as a string
        try:
            return float(value)
        except ValueError:
            pass
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        kind = {float: "a number", int: "an integer", str: "a string", bool: "true or false"}
        raise ConfigError(f"{where}: expected {kind.get(hint, hint.__name__)}, got {value!r}")
    return value


def to_dict(config: Any) -> Any:
    return dataclasses.asdict(config)


# ---------------------------------------------------------------- YAML, presets, overrides


def load_config(path: str | Path | None, overrides: list[str] = (),
                data_dir: str | None = None) -> ExperimentConfig:
    """Read an experiment YAML, apply `key=value` overrides, resolve task presets, validate."""
    raw = read_raw(Path(path)) if path is not None else {}
    for override in overrides:
        apply_override(raw, override)
        raw = resolve_presets(raw)  # an override may name presets too: tasks=[sst,sts]
    if data_dir is not None:
        raw["data_dir"] = data_dir
    config = from_dict(ExperimentConfig, raw)
    validate(config)
    return config


def read_raw(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """A config file as plain data, presets resolved. `extends: other.yaml` (relative to the
    file) starts from that config: mappings merge key by key, tasks merge by name."""
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    if path.resolve() in seen:
        raise ConfigError(f"{path}: `extends` loops back to itself")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    raw = resolve_presets(raw)
    parent = raw.pop("extends", None)
    if parent is None:
        return raw
    base = read_raw(path.parent / str(parent), (*seen, path.resolve()))
    tasks = {t.get("name"): t for t in base.get("tasks", [])}
    for index, task in enumerate(raw.pop("tasks", [])):
        if not task.get("name"):
            raise ConfigError(f"{path}: tasks[{index}]: an extending config names its tasks")
        tasks[task["name"]] = _deep_merge(tasks.get(task["name"], {}), task)
    merged = _deep_merge(base, raw)
    merged["tasks"] = list(tasks.values())
    return merged


def resolve_presets(raw: dict) -> dict:
    """Expand `preset: NAME` task entries into full task dicts (user keys win)."""
    from mtbert.data.tasks import PRESETS

    raw = copy.deepcopy(raw)
    tasks = raw.get("tasks", [])
    if not isinstance(tasks, list):
        raise ConfigError("tasks: expected a list of task entries")
    resolved = []
    for index, entry in enumerate(tasks):
        if isinstance(entry, str):
            entry = {"preset": entry}
        if not isinstance(entry, dict):
            raise ConfigError(f"tasks[{index}]: expected a mapping or a preset name")
        preset = entry.get("preset")
        if preset is not None:
            if preset not in PRESETS:
                raise ConfigError(f"tasks[{index}].preset: unknown preset {preset!r}; "
                                  f"known: {sorted(PRESETS)}")
            entry = _deep_merge(copy.deepcopy(PRESETS[preset]), entry)
            entry.setdefault("name", preset)
        resolved.append(entry)
    raw["tasks"] = resolved
    return raw


def _deep_merge(base: dict, update: dict) -> dict:
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _deep_merge(base[key], value)
        else:
            base[key] = value
    return base


def apply_override(raw: dict, override: str) -> None:
    """`train.lr=3e-5` or `tasks.sts.head.type=cosine` (tasks addressed by name)."""
    if "=" not in override:
        raise ConfigError(f"override {override!r} must look like key=value")
    dotted, text = override.split("=", 1)
    value = yaml.safe_load(text)
    keys = dotted.strip().split(".")
    node: Any = raw
    for depth, key in enumerate(keys[:-1]):
        if isinstance(node, list):  # the task list: address entries by name
            matches = [t for t in node if isinstance(t, dict) and t.get("name") == key]
            if not matches:
                raise ConfigError(f"{'.'.join(keys[:depth + 1])}: no task named {key!r}")
            node = matches[0]
        else:
            node = node.setdefault(key, {})
    node[keys[-1]] = value


def validate(config: ExperimentConfig) -> None:
    """Checks that span several fields; each error names the key."""
    if not config.tasks:
        raise ConfigError("tasks: at least one task is needed")
    names = [t.name for t in config.tasks]
    if len(set(names)) != len(names) or not all(names):
        raise ConfigError(f"tasks: every task needs a unique, non-empty name; got {names}")
    for where, name in [("name", config.name)] + [(f"tasks[{i}].name", n)
                                                  for i, n in enumerate(names)]:
        if not SAFE_NAME.fullmatch(name):  # names become file and folder names
            raise ConfigError(f"{where}: {name!r} may hold only letters, digits, '.', '_', '-'")
    for i, task in enumerate(config.tasks):
        where = f"tasks[{i}] ({task.name})"
        if len(task.text_columns) not in (1, 2):
            raise ConfigError(f"{where}.text_columns: one column (single) or two (pair)")
        if task.kind == "classification" and (task.num_classes or 0) < 2:
            raise ConfigError(f"{where}.num_classes: a classification task needs >= 2 classes")
        if task.kind == "regression" and (not task.label_range or len(task.label_range) != 2):
            raise ConfigError(f"{where}.label_range: a regression task needs [low, high]")
        if task.label_names is not None and (task.kind != "classification"
                                             or len(task.label_names) != task.num_classes):
            raise ConfigError(f"{where}.label_names: one name per class of a classification "
                              f"task ({task.num_classes} classes), got {task.label_names}")
        if task.head.type != "classifier" and not task.is_pair:
            raise ConfigError(f"{where}.head.type: {task.head.type!r} needs a sentence pair")
        if task.head.type == "cosine" and task.kind == "classification" and task.num_classes != 2:
            raise ConfigError(f"{where}.head.type: cosine classifies only two classes")
        if task.mnrl is not None and task.head.type == "classifier":
            raise ConfigError(f"{where}.mnrl: needs a siamese head (cosine or pair_features)")
        if task.train_file is None:
            raise ConfigError(f"{where}.train_file: missing")
    train = config.train
    if train.epochs <= 0 or train.batch_size < 1 or train.grad_accumulation < 1:
        raise ConfigError("train: epochs, batch_size and grad_accumulation must be positive")
    if not 0 <= train.warmup_ratio < 1:
        raise ConfigError(f"train.warmup_ratio: must be in [0, 1), got {train.warmup_ratio}")


def dump_config(config: ExperimentConfig, path: Path) -> None:
    path.write_text(yaml.safe_dump(to_dict(config), sort_keys=False), encoding="utf-8")
