"""Ship a trained model: Hugging Face, sentence-transformers and ONNX folders + a model card.

- `hf`: a standard BERT folder (`config.json` with `architectures: ["BertModel"]`,
  `model.safetensors` under Hugging Face names, `vocab.txt`, `tokenizer.json`,
  `tokenizer_config.json`) that `transformers.AutoModel.from_pretrained` loads; beside it
  the heads (`mtbert_heads.safetensors`), `experiment.yaml` and `metrics.json`, so that
  `mtbert.load` restores the whole multitask model.
- `sentence-transformers`: the same folder plus `modules.json`, `sentence_bert_config.json`
  and `1_Pooling/config.json`, pooling as the model's siamese head was trained.
- `onnx`: one graph per task (`inference.export_onnx`), checked against PyTorch on export.

Every folder gets a `README.md` model card written from the run, and a sha256 manifest.
A model with task conditioning is refused for `hf` and `sentence-transformers`: its plain
encoder is not the model the tasks were trained with. Low-rank adapters (LoRA, MTL-LoRA) are
the exception with `--task`: that task's adapters are folded into the encoder's weights and
the folder holds that task alone, as a plain BERT (the ONNX graphs keep adapters apart).
A mixture-of-experts encoder is not plain BERT and is refused in every format, except a
task-routed one (Task-MoE) with `--task`: that task's path is extracted as a dense encoder
(`model.moe.extract_task_encoder`) and exported as a single-task model.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml

from mtbert.api import task_info
from mtbert.checkpoint import claim_output, load_json, save_json, save_tensors, write_checkpoint
from mtbert.config import ExperimentConfig, TaskConfig
from mtbert.data.batching import collate, encode_split
from mtbert.data.readers import Example
from mtbert.losses import loss_name
from mtbert.model.conditioning.low_rank import LowRankAdapters, fold
from mtbert.model.heads import is_siamese
from mtbert.model.loading import DEFAULT_BACKBONE, mtbert_to_hf
from mtbert.model.moe import experts_of, extract_task_encoder
from mtbert.model.multitask import MultitaskModel
from mtbert.model_folder import (
    FORMAT_FILE,
    HEADS_FILE,
    format_record,
    load_model,
    model_folder,
    write_common,
)
from mtbert.tokenizer import Tokenizer

FORMATS = ("hf", "sentence-transformers", "onnx")
DEFAULT_BACKBONE_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"
ST_POOLING = {"mean": "pooling_mode_mean_tokens", "cls": "pooling_mode_cls_token"}
# Sentences the ONNX graphs are checked on (any vocabulary: unknown words become [UNK]).
CHECK_TEXTS = ["a gripping film with a great cast", "the plot is thin and the acting worse",
               "How do I learn Python quickly?", "What is the best way to learn Python?",
               "A man is playing a guitar.", "It was fine."]


class ExportError(ValueError):
    """The model cannot be exported as asked; the message says why."""


@dataclass
class Exported:
    """An export folder and, for ONNX, each task's max |ONNX - PyTorch| output difference."""

    folder: Path
    differences: dict[str, float] = field(default_factory=dict)


def export(run: str | Path, out: str | Path, fmt: str, quantize: str | None = None,
           task: str | None = None, overwrite: bool = False) -> Exported:
    """Write the model of `run` (a run, its `best/`, or a model folder) to `out` in `fmt`;
    an existing `out` as `checkpoint.claim_output` allows (`overwrite`)."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown format {fmt!r}; choose from {', '.join(FORMATS)}")
    if quantize not in (None, "int8"):
        raise ExportError(f"--quantize: only int8 is supported, got {quantize!r}")
    out = claim_output(out, [run, model_folder(run)], overwrite)
    model, tokenizer, config = load_model(run)
    if task is not None and task not in model.tasks:
        raise ExportError(f"unknown task {task!r}; this model's tasks: {', '.join(model.tasks)}")
    foldable = isinstance(model.conditioning, LowRankAdapters)
    moe = bool(experts_of(model.encoder))
    if quantize and fmt != "onnx" or task and fmt != "onnx" and not (moe or foldable):
        raise ExportError("--quantize applies to --format onnx only; --task to onnx, and to hf "
                          "and sentence-transformers of a model with low-rank adapters (which "
                          "it folds) or of a task-routed mixture of experts")
    metrics = load_json(model_folder(run) / "metrics.json")
    if moe:
        model, config = _dense_task_path(model, config, task)
    if fmt == "onnx":
        return _export_onnx(model, tokenizer, config, metrics, out, quantize, task)
    if task is not None and isinstance(model.conditioning, LowRankAdapters):
        model, config = folded(model, config, task)
    if model.conditioning is not None:
        raise ExportError(
            f"the model uses task conditioning ({config.model.conditioning}): its plain encoder "
            f"is not what the tasks were trained with, so a {fmt} folder would give wrong "
            "outputs; use --format onnx (per task, conditioning included) or mtbert.load")
    pooling = embedding_pooling(model)
    if fmt == "sentence-transformers" and pooling not in ST_POOLING:
        raise ExportError(f"the siamese head pools with {pooling!r}, which sentence-transformers' "
                          "Pooling module does not offer (mean or cls)")

    def write(tmp: Path) -> None:
        save_tensors(tmp / "model.safetensors", mtbert_to_hf(model.encoder.state_dict()))
        save_json(tmp / "config.json", model.encoder.config.to_hf_dict())
        save_tensors(tmp / HEADS_FILE, {k: v for k, v in model.state_dict().items()
                                        if not k.startswith("encoder.")})
        write_common(tmp, tokenizer, config, metrics)
        write_hf_tokenizer(tmp, tokenizer)
        save_json(tmp / FORMAT_FILE, format_record(
            "export", export_format=fmt,
            note=f"{HEADS_FILE}: the task heads under mtbert's names; mtbert.load(folder) "
                 "restores the multitask model"))
        if fmt == "sentence-transformers":
            write_sentence_transformers(tmp, model, tokenizer, pooling)
        (tmp / "README.md").write_text(model_card(config, metrics, fmt, out.name),
                                       encoding="utf-8")

    return Exported(write_checkpoint(out, write))


def folded(model: MultitaskModel, config: ExperimentConfig, task: str
           ) -> tuple[MultitaskModel, ExperimentConfig]:
    """`task` (one of the model's) alone, its low-rank adapters folded into a plain encoder's
    weights."""
    config = dataclasses.replace(
        config, tasks=[config.task(task)],
        model=dataclasses.replace(config.model, conditioning=None, conditioning_options={}))
    single = MultitaskModel(fold(model.encoder, model.conditioning, task), config.tasks)
    single.heads[task].load_state_dict(model.heads[task].state_dict())
    return single.eval(), config


def _dense_task_path(model: MultitaskModel, config: ExperimentConfig, task: str | None
                     ) -> tuple[MultitaskModel, ExperimentConfig]:
    """A Task-MoE model's path for `task` as a dense single-task model and its config."""
    not_plain = (f"the encoder is a mixture of experts ({config.model.moe.routing} routing), "
                 "not plain BERT, so no export format holds it; load the run folder with "
                 "mtbert.load or serve it with mtbert serve. A task-routed model "
                 "(model.moe.routing: task, top_k 1) exports one task's path as a dense "
                 "encoder with --task NAME")
    if task is None:
        raise ExportError(not_plain)
    try:
        encoder = extract_task_encoder(model.encoder, model.routing, task)
    except ValueError as error:
        raise ExportError(f"{not_plain} ({error})") from None
    single = copy.deepcopy(config)
    single.tasks, single.model.moe = [config.task(task)], None
    dense = MultitaskModel(encoder, single.tasks, model.conditioning)
    dense.heads[task].load_state_dict(model.heads[task].state_dict())
    return dense.eval(), single


def embedding_pooling(model: MultitaskModel) -> str:
    """The pooling of the first siamese task (what `Model.encode` uses), else mean."""
    siamese = [t for t in model.tasks.values() if is_siamese(t)]
    return siamese[0].head.pooling if siamese else "mean"


def write_hf_tokenizer(folder: Path, tokenizer: Tokenizer) -> None:
    """`vocab.txt` and `tokenizer_config.json` beside `tokenizer.json`, as BERT folders have."""
    vocab = tokenizer.backend.get_vocab()
    (folder / "vocab.txt").write_text("".join(f"{t}\n" for t in sorted(vocab, key=vocab.get)),
                                      encoding="utf-8")
    normalizer = json.loads(tokenizer.backend.to_str()).get("normalizer") or {}
    special = {f"{name}_token": f"[{name.upper()}]" for name in ("unk", "sep", "pad", "cls",
                                                                   "mask")}
    save_json(folder / "tokenizer_config.json", {
        "tokenizer_class": "BertTokenizer",
        "do_lower_case": bool(normalizer.get("lowercase", True)),
        "model_max_length": tokenizer.max_length,
        **{k: v for k, v in special.items() if v in vocab}})


def write_sentence_transformers(folder: Path, model: MultitaskModel, tokenizer: Tokenizer,
                                pooling: str) -> None:
    """The module files of a sentence-transformers folder: Transformer at the root (the
    BERT folder), then Pooling; the layout sentence-transformers 2.x+ writes and reads."""
    save_json(folder / "modules.json", [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling",
         "type": "sentence_transformers.models.Pooling"}])
    save_json(folder / "sentence_bert_config.json",
              {"max_seq_length": tokenizer.max_length, "do_lower_case": False})
    save_json(folder / "config_sentence_transformers.json", {"similarity_fn_name": "cosine"})
    (folder / "1_Pooling").mkdir()
    save_json(folder / "1_Pooling" / "config.json", {
        "word_embedding_dimension": model.encoder.config.hidden_size,
        **{mode: name == pooling for name, mode in ST_POOLING.items()},
        "pooling_mode_max_tokens": False, "pooling_mode_mean_sqrt_len_tokens": False})


def _export_onnx(model: MultitaskModel, tokenizer: Tokenizer, config: ExperimentConfig,
                 metrics: dict, out: Path, quantize: str | None, task: str | None) -> Exported:
    from mtbert.inference import export_onnx

    names = [task] if task else list(model.tasks)
    differences = {}

    def write(tmp: Path) -> None:
        for name in names:
            path = export_onnx(model, name, tmp / f"{name}.onnx", quantize=bool(quantize))
            differences[name] = onnx_difference(model, tokenizer, name, path)
        write_common(tmp, tokenizer, config, metrics)
        save_json(tmp / FORMAT_FILE, format_record(
            "onnx", quantize=quantize, graphs={name: f"{name}.onnx" for name in names}))
        (tmp / "README.md").write_text(model_card(config, metrics, "onnx", out.name, quantize),
                                       encoding="utf-8")

    return Exported(write_checkpoint(out, write), differences)


def onnx_difference(model: MultitaskModel, tokenizer: Tokenizer, task: str, path: Path) -> float:
    """Max |ONNX - PyTorch| head output on `CHECK_TEXTS` (as single texts or pairs)."""
    from mtbert.inference import OnnxPredictor

    config = model.tasks[task]
    texts = CHECK_TEXTS
    inputs = ([(a, b) for a, b in zip(texts, texts[1:] + texts[:1])] if config.is_pair
              else [(t,) for t in texts])
    split = encode_split([Example(str(i), x, None) for i, x in enumerate(inputs)], tokenizer,
                         is_siamese(config))
    batch = collate(split, np.arange(len(split)), tokenizer.pad_id)
    with torch.inference_mode():
        expected = model.eval()(task, batch).predictions.float().numpy()
    return float(np.abs(OnnxPredictor(path, config).outputs(batch) - expected).max())


# ---------------------------------------------------------------- the model card

LOADING = {
    "mtbert": '''```python
import mtbert

model = mtbert.load("{folder}")
{examples}
```''',
    "hf": '''```python
from transformers import AutoModel, AutoTokenizer

encoder = AutoModel.from_pretrained("{folder}")  # the fine-tuned encoder, without the heads
tokenizer = AutoTokenizer.from_pretrained("{folder}")
```

The task heads are in `mtbert_heads.safetensors`; `mtbert.load` applies them.''',
    "sentence-transformers": '''```python
from sentence_transformers import SentenceTransformer

model = SentenceTransformer("{folder}")
embeddings = model.encode(["a gripping film", "a dull film"])  # = mtbert's model.encode
```''',
    "onnx": '''```python
from mtbert.inference import OnnxPredictor
from mtbert.config import load_config

config = load_config("{folder}/experiment.yaml")
predictor = OnnxPredictor("{folder}/TASK.onnx", config.task("TASK"))
```

Inputs are named like mtbert's `Batch` fields (`input_ids`, `attention_mask`,
`token_type_ids`, and `pair_index` for siamese heads); the output `predictions` is the
head's raw output (logits or scores).''',
}
PIPELINE_TAG = {"hf": "feature-extraction", "sentence-transformers": "sentence-similarity",
                "onnx": "text-classification"}
LIBRARY = {"hf": "transformers (the encoder)", "sentence-transformers": "sentence-transformers",
           "onnx": "ONNX Runtime"}


def model_card(config: ExperimentConfig, metrics: dict, fmt: str, folder: str,
               quantize: str | None = None) -> str:
    """README.md of an export: YAML front matter (model-index from `metrics`), tasks and
    labels, training recipe, intended use and limits, how to load it from `folder`."""
    default_backbone = config.model.backbone.lower() in (DEFAULT_BACKBONE, "default")
    local_backbone = Path(config.model.backbone).expanduser().exists()
    dev = metrics.get("dev", {})
    counts = {task: f"{n['scored']} of {n['of']}" for task, n
              in metrics.get("dev_examples", {}).items()}
    sampled = {task: counts[task] for task, n in metrics.get("dev_examples", {}).items()
               if n["scored"] < n["of"]}
    front = {
        "library_name": {"hf": "transformers"}.get(fmt, fmt),
        "pipeline_tag": PIPELINE_TAG[fmt],
        "license": "apache-2.0" if default_backbone else "other",
        **({} if local_backbone else {
            "base_model": DEFAULT_BACKBONE_HUB_ID if default_backbone else config.model.backbone}),
        "datasets": [t.preset or t.name for t in config.tasks],
        "tags": ["mtbert", "multitask", "bert", fmt] + (["int8"] if quantize else []),
        "model-index": [{"name": config.name, "results": [
            {"task": {"type": _task_type(t), "name": t.name},
             "dataset": {"name": t.preset or t.name, "type": t.preset or t.name,
                         "split": "dev"},
             "metrics": _card_metrics(t, dev, sampled)}
            for t in config.tasks if t.name in dev]}],
    }
    train, model = config.train, config.model
    steps = f", capped at {train.max_steps} steps" if train.max_steps else ""
    conditioning = f", task conditioning `{model.conditioning}`" if model.conditioning else ""
    recipe = [
        f"- backbone `{model.backbone}`{' (a local folder)' if local_backbone else ''}, "
        f"inputs truncated to {model.max_length} tokens{conditioning}",
        f"- {train.epochs:g} epochs{steps}, batch {train.batch_size}, AdamW lr {train.lr:g} "
        f"(heads {train.head_lr or train.lr:g}), weight decay {train.weight_decay:g}, "
        f"warmup {train.warmup_ratio:.0%} then linear decay",
        f"- task sampler `{train.sampler}`, loss weighting `{train.weighting}`, gradient "
        f"combiner `{train.combiner}`, seed {train.seed}",
        *(f"- {t.name}: head `{t.head.type}` ({t.head.pooling} pooling), loss "
          f"`{loss_name(t)}`" + (", plus MNRL" if t.mnrl else "")
          for t in config.tasks)]
    if sampled:
        scored_on = (" on the fixed dev sample that training selected the model by, not on "
                     "the whole dev sets (" + ", ".join(f"{task} {n}" for task, n in
                                                        counts.items()) + " examples)")
    elif "dev_examples" in metrics or not train.max_eval_examples:
        scored_on = " on the whole dev sets"
    else:  # written before metrics.json said what was scored
        scored_on = (f" on at most {train.max_eval_examples} examples of each dev set, not "
                     "necessarily the whole dev sets")
    caveat = _QUORA_CAVEAT if default_backbone and any(
        t.preset == "quora" for t in config.tasks) else ""
    examples = "\n".join(_example_call(config.task(t.name)) for t in config.tasks)
    sections = [
        "---\n" + yaml.safe_dump(front, sort_keys=False) + "---",
        f"# {config.name}: an mtbert multitask model",
        f"One BERT encoder fine-tuned with mtbert on {len(config.tasks)} tasks at once, one "
        f"head per task; exported as `{fmt}`" + (f" ({quantize})" if quantize else "") + ".",
        "## Tasks and labels\n\n| task | input | output | labels | head |\n"
        "|---|---|---|---|---|\n" + "\n".join(_task_row(t) for t in config.tasks),
        f"## Evaluation\n\nDev scores of the saved model at step {metrics.get('step', '?')}"
        f"{scored_on} (`metrics.json`): "
        + (", ".join(f"{k} {v:.4f}" for k, v in dev.items()) or "none")
        + ". A task with several metrics scores their mean. Overall is the mean of the task "
        + ("scores as they are (the GLUE score)." if config.overall_score == "mean" else
           "scores, correlation-like ones (r) counted as (r + 1) / 2."),
        "## Training recipe\n\n" + "\n".join(recipe),
        "## Intended use and limits\n\nResearch and teaching: sentence-level sentiment, "
        "paraphrase and similarity in English, on text like the training data (movie reviews, "
        "Quora questions, news and caption sentences). Not for decisions about people. "
        f"Inputs longer than {model.max_length} tokens are truncated. Each dataset keeps its "
        "own terms of use." + caveat,
        "## How to load it\n\n" + ("" if fmt == "onnx" else "With mtbert (all tasks):\n\n"
                                    + LOADING["mtbert"].format(folder=folder, examples=examples)
                                    + "\n\n")
        + f"With {LIBRARY[fmt]}:\n\n" + LOADING[fmt].format(folder=folder),
    ]
    return "\n\n".join(sections) + "\n"


_QUORA_CAVEAT = (
    "\n\n**Quora caveat**: the backbone, all-MiniLM-L6-v2, was pre-trained on paraphrase data "
    "that includes Quora duplicate questions (QQP), so the Quora score is not a clean measure "
    "of what multitask fine-tuning added.")


def _card_metrics(task: TaskConfig, dev: dict, sampled: dict[str, int]) -> list[dict]:
    """The task's dev metrics as model-index entries: its metric, or each of its several,
    named with the dev sample's size when it was not the whole dev set."""
    keys = [task.name] if len(task.metrics) == 1 else [f"{task.name}/{m}" for m in task.metrics]
    of = f" ({sampled[task.name]} examples)" if task.name in sampled else ""
    return [{"type": metric, "value": dev[key], "name": f"dev {metric}{of}"}
            for key, metric in zip(keys, task.metrics) if key in dev]


def _task_type(task: TaskConfig) -> str:
    return "sentence-similarity" if task.kind == "regression" else "text-classification"


def _task_row(task: TaskConfig) -> str:
    info = task_info(task)
    output = (f"score in [{info.label_range[0]:g}, {info.label_range[1]:g}]"
              if info.kind == "regression" else f"{len(info.labels)} classes")
    inputs = f"pair ({', '.join(info.text_columns)})" if info.pair else "single text"
    labels = ", ".join(info.labels) if info.labels else "-"
    return f"| {task.name} | {inputs} | {output} | {labels} | {task.head.type} |"


def _example_call(task: TaskConfig) -> str:
    if task.is_pair:
        return f'model.predict("{task.name}", [("first sentence", "second sentence")])'
    return f'model.predict("{task.name}", ["a sentence"])'
