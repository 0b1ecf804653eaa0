"""Typed configuration: dataclasses own every default; YAML and command-line overrides fill them.

Unknown keys and values of the wrong type fail with a `ConfigError` naming the key, e.g.
`train.lr: expected a number, got 'fast'`. Task entries may start from a built-in preset
(`preset: sst`) and override any field of it.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
import reprlib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from mtbert.errors import ConfigError
from mtbert.presets import PRESETS

SAFE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
MAX_CONFIG_BYTES = 1 << 20  # a config file is a few hundred bytes; refuse anything absurd
MIN_MAX_LENGTH = 8  # tokens per input, special tokens included
MAX_CONFIG_NODES = 100_000  # values after YAML aliases are expanded (alias bombs)

_repr = reprlib.Repr()  # error messages show a bounded view of any value
_repr.maxstring = _repr.maxother = 40
_repr.maxlist = _repr.maxdict = 4
_repr.maxlevel = 2


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "..."


def short_repr(value: Any) -> str:
    """`value` as an error message quotes it: one line, at most 120 characters."""
    return _one_line(_repr.repr(value), 120)




@dataclass
class HeadConfig:
    """How a task turns encoder states into predictions (see `model/heads.py`).

    type: `classifier` (an MLP on one pooled vector: the sentence, or the jointly encoded
    pair `[CLS] a [SEP] b [SEP]`), `cosine` (siamese: cosine of the two sentence embeddings),
    `pair_features` (siamese: MLP on [u, v, |u-v|, u*v], Reimers & Gurevych 2019).
    """

    type: str = "classifier"  # a name in model.heads.HEADS
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

    rule: str = "label"  # a name in losses.POSITIVE_RULES
    start: float = 4.4
    step_per_epoch: float = 0.05
    scale: float = 20.0
    weight: float = 1.0


@dataclass
class TaskConfig:
    """One task: its data, input kind, output kind, head, loss and metric(s)."""

    name: str = ""
    preset: str | None = None
    text_columns: list[str] = field(default_factory=lambda: ["sentence"])
    label_column: str | None = None
    id_column: str = "id"  # a file without it: ids are the 0-based row numbers
    # Files without a header line: their fields' names, in order (the first line is data).
    columns: list[str] | None = None
    quoting: Literal["minimal", "none"] = "minimal"  # none: a quote is text (GLUE's files)
    kind: Literal["classification", "regression"] = "classification"
    num_classes: int | None = None
    label_names: list[str] | None = None  # class names, index order; None: "0", "1", ...
    label_range: list[float] | None = None
    train_file: str | None = None
    dev_file: str | None = None
    test_file: str | None = None
    # A name in evaluation.METRICS, or a list of them: the task's score is their mean (GLUE
    # scores MRPC by F1 and accuracy, STS-B by Pearson and Spearman); each is also reported.
    metric: str | list[str] = "accuracy"
    prediction_column: str = "Predicted_Label"
    head: HeadConfig = field(default_factory=HeadConfig)
    loss: str | None = None  # None: cross_entropy / bce / mse by kind
    loss_options: dict[str, Any] = field(default_factory=dict)
    batch_size: int | None = None  # None: train.batch_size
    weight: float = 1.0  # read by weightings that use task weights (`static`)
    mnrl: AuxiliaryMnrlConfig | None = None

    @property
    def is_pair(self) -> bool:
        return len(self.text_columns) == 2

    @property
    def metrics(self) -> list[str]:
        """The metrics whose mean is the task's score."""
        return [self.metric] if isinstance(self.metric, str) else list(self.metric)


@dataclass
class MoEConfig:
    """Sparse mixture-of-experts FFNs, upcycled from the backbone's (see `model/moe.py`)."""

    experts: int = 4
    top_k: int = 1
    every: int = 2  # every N-th encoder layer gets experts (2: the 2nd, 4th, ...)
    routing: Literal["token", "task", "task_aware"] = "token"
    capacity_factor: float | None = 1.25  # training, token gates only; None: nothing dropped
    noisy_gating: bool = True  # token gates only (Shazeer et al. 2017)
    balance_weight: float = 0.01  # Switch load-balancing loss
    z_weight: float = 0.001  # router z-loss
    task_embedding_size: int = 32  # task_aware routing


@dataclass
class ModelConfig:
    backbone: str = "all-minilm-l6-v2"
    max_length: int = 128
    hidden_dropout: float | None = None  # None: the checkpoint's value
    attention_dropout: float | None = None
    conditioning: str | None = None  # a task-conditioning variant (see model/conditioning)
    conditioning_options: dict[str, Any] = field(default_factory=dict)
    moe: MoEConfig | None = None  # None: dense feed-forward blocks


@dataclass
class RegularizerConfig:
    """An auxiliary term of the training loss (`regularizers/`), added as `weight * term`
    after the loss weighting and distillation. `options` go to the regulariser's class, whose
    defaults are its paper's (`smart`: epsilon, noise, step_size, steps; `smart_proximal`:
    decay)."""

    name: str = ""  # a name in regularizers.REGULARIZERS
    weight: float = 1.0
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class WeightAverageConfig:
    """Evaluate and keep an average of the weights (`weight_averaging.py`)."""

    method: str = "ema"  # a name in weight_averaging.AVERAGES: ema, swa
    decay: float | None = None  # ema only; None: 0.999
    start: float = 0.0  # share of the run's steps before the average takes in weights


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
    combiner: str = "sum"
    eval_batch_size: int = 128
    evals_per_epoch: int = 1
    max_steps: int | None = None  # stop early (budgets, smoke tests)
    train_fraction: float | None = None  # keep this share of every task (budgets)
    max_train_examples: int | None = None  # per task; subsample for smoke tests
    max_eval_examples: int | None = None  # per task; one seeded sample shared by every run
    max_bad_steps: int = 5  # NaN/inf steps in a row before training stops
    checkpoint_every: int = 200  # optimizer steps between resume checkpoints (also at evals)
    keep_checkpoints: int = 2  # the newest N resume checkpoints are kept
    threads: int | None = None  # None: all cores
    device: str = "auto"  # auto (cuda when available), cpu, cuda, cuda:N
    # auto: bf16 autocast where the device has fast bf16 (CUDA with bf16, CPUs with AVX512-BF16
    # or AMX), fp32 elsewhere (see precision.py); weights, optimizer and losses stay fp32
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    # every N optimizer steps, log TAG's look-ahead inter-task affinity (see lookahead.py)
    affinity_every: int | None = None
    data_maps: bool = False  # per-example confidence and variability (see data_maps.py)
    regularizers: list[RegularizerConfig] = field(default_factory=list)
    weight_average: WeightAverageConfig | None = None  # None: the raw weights are the model


@dataclass
class AdaptConfig:
    """Training part of a model: adapters on a frozen encoder, a new task beside trained ones."""

    freeze_encoder: bool = False  # train conditioning (e.g. LoRA) and heads only
    # `mtbert train --from RUN`: start from RUN's model; its encoder, its tasks' heads and
    # conditioning stay frozen (their outputs bit-identical) and only the new tasks train.
    from_run: str | None = None
    # `mtbert train --from RUN --finetune TASK` (two-stage MT-DNN, Liu et al. 2019): a model
    # of TASK alone, starting from RUN's encoder and TASK's head, everything training.
    finetune: str | None = None
    keep_task_best: bool = False  # also keep each task's best model in best-TASK/


@dataclass
class DistillConfig:
    """Teacher-annealed distillation (BAM!, Clark et al. 2019; see `distillation.py`)."""

    # task -> its teacher: an mtbert run or model folder with that task, or a prediction file
    # as `mtbert predict --probabilities` writes it: JSONL (`id`, `probabilities` or `score`)
    # or CSV/TSV (columns `id` and `p_<class>`..., or `score`).
    teachers: dict[str, str] = field(default_factory=dict)
    temperature: float = 1.0  # softens classification teachers' probabilities
    anneal: bool = True  # lambda from 0 (teacher) to 1 (gold) over training; False: lambda = 0


@dataclass
class DistributedConfig:
    """How the processes of a `torchrun` job talk (see `distributed.py`); a run in one
    process ignores it. The world size comes from torchrun, not from here."""

    backend: Literal["auto", "gloo", "nccl"] = "auto"  # auto: nccl on CUDA, gloo on CPUs
    timeout_s: float = 600.0  # a collective that waits longer (a rank died) stops the job


@dataclass
class ExperimentConfig:
    name: str = "default"
    data_dir: str = "../shared/data"
    model: ModelConfig = field(default_factory=ModelConfig)
    tasks: list[TaskConfig] = field(default_factory=list)
    train: TrainConfig = field(default_factory=TrainConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    # The overall dev score (model selection, tables) is the mean of the task scores with
    # correlation-like metrics mapped from [-1, 1] to (r + 1) / 2 (`normalised`, CS224N's
    # overall score), or as they are (`mean`: the GLUE score).
    overall_score: Literal["normalised", "mean"] = "normalised"
    strict_data: bool = False  # malformed rows are errors instead of skipped rows
    max_skipped_share: float = 0.05  # reading fails when more of a file's rows are malformed
    cache_dir: str | None = None  # token cache; None: $MTBERT_CACHE or ~/.cache/mtbert/tokens
    adapt: AdaptConfig = field(default_factory=AdaptConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)

    def task(self, name: str) -> TaskConfig:
        for task in self.tasks:
            if task.name == name:
                return task
        raise ConfigError(f"no task named {name!r}; tasks: {[t.name for t in self.tasks]}")

    def input_paths(self) -> list[Path]:
        """The local files and folders a run of this config reads (data folder, backbone
        when it is a path, `--from` run, teachers): what no output may replace."""
        named = [self.data_dir, self.model.backbone, self.adapt.from_run,
                 *self.distill.teachers.values()]
        return [Path(p).expanduser() for p in named if p and Path(p).expanduser().exists()]


# ---------------------------------------------------------------- dict -> dataclass, checked


def from_dict(cls: type, data: Any, where: str = "") -> Any:
    """Build dataclass `cls` from plain data, checking names and types; errors name the key."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {short_repr(data)}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{_join(where, unknown[0])}: unknown key; known keys: {sorted(known)}")
    return cls(**{key: convert_value(hints[key], value, _join(where, key))
                  for key, value in data.items()})


def _join(where: str, key: Any) -> str:
    return f"{where}.{key}" if where else str(key)


def convert_value(hint: Any, value: Any, where: str) -> Any:
    """`value` (parsed YAML) as the type `hint` asks (dataclasses, lists, dicts, unions,
    literals, scalars), or a ConfigError naming `where`."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return convert_value(option, value, where)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(errors[0])
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: expected one of {list(args)}, got {short_repr(value)}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {short_repr(value)}")
        return [convert_value(args[0], v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {short_repr(value)}")
        return {k: convert_value(args[1], v, _join(where, k)) for k, v in value.items()}
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, where)
    if hint is float and isinstance(value, (int, str)) and not isinstance(value, bool):
        try:  # YAML reads 5e-5 as a string
            value = float(value)
        except (ValueError, OverflowError):
            pass
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        kind = {float: "a number", int: "an integer", str: "a string", bool: "true or false"}
        raise ConfigError(f"{where}: expected {kind.get(hint, hint.__name__)}, got "
                          f"{short_repr(value)}")
    if hint is float and not math.isfinite(value):
        raise ConfigError(f"{where}: expected a finite number, got {value}")
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
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: larger than {MAX_CONFIG_BYTES} bytes; not a config file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    raw = load_yaml(text, str(path)) or {}
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


class _BoundedLoader(yaml.SafeLoader):
    """PyYAML's safe loader that refuses documents whose aliases expand beyond
    `MAX_CONFIG_NODES` values or refer to themselves: a 30-line alias bomb expands to
    billions of values when a config is validated, printed or written out."""

    def construct_document(self, node: yaml.Node) -> Any:
        _check_expanded_size(node)
        return super().construct_document(node)


def _check_expanded_size(root: yaml.Node) -> None:
    sizes: dict[int, int] = {}  # id(node) -> values under it, aliases expanded
    open_nodes: set[int] = set()

    def size(node: yaml.Node) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in open_nodes:
            raise ConfigError("an alias refers to a value that contains it")
        open_nodes.add(key)
        children = node.value if isinstance(node, yaml.SequenceNode) else (
            [n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode)
            else [])
        total = 1
        for child in children:
            total += size(child)
            if total > MAX_CONFIG_NODES:
                raise ConfigError(f"aliases expand to more than {MAX_CONFIG_NODES} values")
        open_nodes.discard(key)
        sizes[key] = total
        return total

    size(root)


def load_yaml(text: str, where: str) -> Any:
    """YAML text as plain data, with aliases bounded; errors name `where`."""
    try:
        return yaml.load(text, Loader=_BoundedLoader)  # noqa: S506 (a SafeLoader subclass)
    except ConfigError as error:
        raise ConfigError(f"{where}: {error}") from None
    except RecursionError:
        raise ConfigError(f"{where}: nested too deeply") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{where}: not valid YAML: {_one_line(str(error))}") from None


def resolve_presets(raw: dict) -> dict:
    """Expand `preset: NAME` task entries into full task dicts (user keys win)."""
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
    value = load_yaml(text, f"override {dotted.strip()}")
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
                              f"task ({task.num_classes} classes), got "
                              f"{short_repr(task.label_names)}")
        if task.train_file is None:
            raise ConfigError(f"{where}.train_file: missing")
        if task.columns is not None:
            unnamed = [c for c in (*task.text_columns, task.label_column)
                       if c is not None and c not in task.columns]
            if unnamed:
                raise ConfigError(f"{where}.columns: names the fields of a file without a "
                                  f"header, and lacks {', '.join(map(repr, unnamed))}; "
                                  f"columns: {short_repr(task.columns)}")
    for key, value, ok, requirement in _bounds(config):
        if value is not None and not ok(value):
            raise ConfigError(f"{key}: must be {requirement}, got {short_repr(value)}")
    finetune = config.adapt.finetune
    if finetune is not None and (config.adapt.from_run is None or names != [finetune]):
        raise ConfigError(f"adapt.finetune: {finetune!r} fine-tunes that task of "
                          "adapt.from_run alone (train --from RUN --finetune TASK); got "
                          f"from_run {config.adapt.from_run!r} and tasks {names}")
    for task in config.distill.teachers:
        if task not in names:
            raise ConfigError(f"distill.teachers.{task}: no task of that name; tasks: {names}")


def _bounds(config: ExperimentConfig) -> list[tuple[str, Any, Any, str]]:
    """(key, value, test, requirement) for every number whose range matters; None values
    mean "use the default" and pass."""
    def positive(value): return value > 0
    def at_least(low): return lambda value: value >= low
    def fraction(value): return 0 <= value < 1
    train, model = config.train, config.model
    bounds = [
        ("train.epochs", train.epochs, positive, "> 0"),
        ("train.batch_size", train.batch_size, at_least(1), ">= 1"),
        ("train.eval_batch_size", train.eval_batch_size, at_least(1), ">= 1"),
        ("train.grad_accumulation", train.grad_accumulation, at_least(1), ">= 1"),
        ("train.lr", train.lr, positive, "> 0"),
        ("train.head_lr", train.head_lr, positive, "> 0"),
        ("train.weighting_lr", train.weighting_lr, positive, "> 0"),
        ("train.weight_decay", train.weight_decay, at_least(0), ">= 0"),
        ("train.warmup_ratio", train.warmup_ratio, fraction, "in [0, 1)"),
        ("train.grad_clip", train.grad_clip, at_least(0), ">= 0 (0: no clipping)"),
        ("train.evals_per_epoch", train.evals_per_epoch, at_least(1), ">= 1"),
        ("train.max_steps", train.max_steps, at_least(1), ">= 1"),
        ("train.train_fraction", train.train_fraction, lambda v: 0 < v <= 1, "in (0, 1]"),
        ("train.max_train_examples", train.max_train_examples, at_least(1), ">= 1"),
        ("train.max_eval_examples", train.max_eval_examples, at_least(1), ">= 1"),
        ("train.max_bad_steps", train.max_bad_steps, at_least(1), ">= 1"),
        ("train.checkpoint_every", train.checkpoint_every, at_least(1), ">= 1"),
        ("train.keep_checkpoints", train.keep_checkpoints, at_least(1), ">= 1"),
        ("train.threads", train.threads, at_least(1), ">= 1"),
        ("train.affinity_every", train.affinity_every, at_least(1), ">= 1"),
        ("model.max_length", model.max_length, at_least(MIN_MAX_LENGTH),
         f">= {MIN_MAX_LENGTH} ([CLS] a [SEP] b [SEP] needs room for text)"),
        ("model.hidden_dropout", model.hidden_dropout, fraction, "in [0, 1)"),
        ("model.attention_dropout", model.attention_dropout, fraction, "in [0, 1)"),
        ("distributed.timeout_s", config.distributed.timeout_s, positive, "> 0"),
        ("max_skipped_share", config.max_skipped_share, lambda v: 0 <= v <= 1, "in [0, 1]"),
        ("distill.temperature", config.distill.temperature, positive, "> 0"),
        *((f"train.regularizers[{i}].weight", r.weight, positive, "> 0 (0 cannot act)")
          for i, r in enumerate(train.regularizers)),
    ]
    if train.weight_average is not None:
        bounds.append(("train.weight_average.start", train.weight_average.start, fraction,
                       "in [0, 1): the share of the run before averaging, which must leave "
                       "steps to average"))
    if model.moe is not None:
        moe = model.moe
        bounds += [
            ("model.moe.experts", moe.experts, at_least(2), ">= 2"),
            ("model.moe.top_k", moe.top_k, lambda v: 1 <= v <= moe.experts,
             f"in [1, model.moe.experts] = [1, {moe.experts}]"),
            ("model.moe.every", moe.every, at_least(1), ">= 1"),
            ("model.moe.capacity_factor", moe.capacity_factor, positive, "> 0"),
            ("model.moe.balance_weight", moe.balance_weight, at_least(0), ">= 0"),
            ("model.moe.z_weight", moe.z_weight, at_least(0), ">= 0"),
            ("model.moe.task_embedding_size", moe.task_embedding_size, at_least(1), ">= 1"),
        ]
    for i, task in enumerate(config.tasks):
        where = f"tasks[{i}] ({task.name})"
        bounds += [
            (f"{where}.batch_size", task.batch_size, at_least(1), ">= 1"),
            (f"{where}.head.hidden_layers", task.head.hidden_layers, at_least(0), ">= 0"),
            (f"{where}.head.hidden_size", task.head.hidden_size, at_least(1), ">= 1"),
            (f"{where}.head.dropout", task.head.dropout, fraction, "in [0, 1)"),
            (f"{where}.label_range", task.label_range,
             lambda r: len(r) != 2 or r[0] < r[1], "[low, high] with low < high"),
        ]
        if task.mnrl is not None:
            bounds += [(f"{where}.mnrl.scale", task.mnrl.scale, positive, "> 0"),
                       (f"{where}.mnrl.weight", task.mnrl.weight, at_least(0), ">= 0")]
    return bounds


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """Nested config data as {"train.lr": 5e-05, "tasks.sst.head.type": ...} (tasks by name)."""
    if isinstance(data, dict):
        items = data.items()
    elif isinstance(data, list) and data and all(isinstance(v, dict) for v in data):
        items = ((v.get("name", i), v) for i, v in enumerate(data))
    else:
        return {prefix: data}
    flat = {}
    for key, value in items:
        flat.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def config_differences(before: dict, after: dict, ignore: tuple[str, ...] = (),
                       common_only: bool = False) -> list[str]:
    """`key: old -> new` for each setting that differs between two config dicts, except keys
    starting with one of `ignore`; `common_only` skips keys that only one of them has."""
    old, new = flatten(before), flatten(after)
    keys = old.keys() & new.keys() if common_only else old.keys() | new.keys()
    return [f"{key}: {short_repr(old.get(key))} -> {short_repr(new.get(key))}"
            for key in sorted(keys) if old.get(key) != new.get(key) and not key.startswith(ignore)]


def dump_config(config: ExperimentConfig, path: Path) -> None:
    path.write_text(yaml.safe_dump(to_dict(config), sort_keys=False), encoding="utf-8")
