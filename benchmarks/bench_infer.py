"""Inference throughput: HF `BertModel` as commonly run and on length-sorted batches vs mtbert
fp32 / bf16 / int8 / ONNX Runtime, same sentences; the gain split into its parts.

    python benchmarks/bench_infer.py [--batch-size 128] [--repeats 5] [--batches 8]
        [--threads N] [--backbone DIR] [--data-dir DIR] [--no-memory] [--no-onnx]
        [--keep-fp32 MODULE ...] [--smoke]
    python benchmarks/bench_infer.py --accuracy RUN_DIR [--max-examples 2000] [--data-dir DIR]
        [--keep-fp32 MODULE ...]
    python benchmarks/bench_infer.py --predict-cli RUN_DIR [--repeats 2] [--data-dir DIR]

Speed: every contender maps the same shuffled Quora dev sentences (both columns) to the
probabilities of one linear head on mean-pooled token states, with autograd off;
tokenization is timed for all. Each repeat gives all contenders the same fresh chunk of
`--batches` x `--batch-size` sentences, in alternating order, after one untimed batch each.

- `hf`, HF as commonly run: `BertTokenizerFast(..., padding=True)` per batch of the shuffled
  chunk, in the chunk's order.
- `hf-sorted`, HF on mtbert's batch plan: the chunk tokenized at once by HF's tokenizer,
  the same `sorted_batches` as mtbert's, each padded to its longest row by `collate`
  (sentence-transformers' `encode` also sorts its input, by characters).
- `hf-bf16`, the same with HF's weights in bf16 (`from_pretrained(...,
  torch_dtype=torch.bfloat16)`, how transformers users run bf16): the peer of mtbert bf16.
- mtbert fp32: the chunk tokenized at once, `sorted_batches` by length, `collate` padding
  (`evaluation.predict_outputs`). Sorting is within the chunk: more batches, less padding.
- mtbert bf16: the same on `mtbert.inference.to_bf16(model)` (every weight bf16).
- mtbert int8: the same on `mtbert.inference.quantize_dynamic(model, --keep-fp32)`.
- mtbert ONNX fp32 / int8: `export_onnx(..., quantize=False/True)` run by ONNX Runtime on the
  same sorted batches (skipped when onnxruntime or onnx is missing).

Reports sentences/s, real tokens/s, the median paired ratios to both HF rows, and peak memory
(a child process per contender tokenizes and encodes one chunk; see bench_train.py for how RSS
is read); mtbert fp32's gain over HF as commonly run split into the batch plan (`hf-sorted` /
`hf`) and the encoder (`fp32` / `hf-sorted`: real tokens only, mtbert's kernels), as in
`bench_train.decomposition`; and the GEMM-bound limit of fp32 and bf16 on this machine
(`bench_train.gemm_limit_lines`).

`--accuracy RUN_DIR` instead loads a trained run and prints each task's dev metric for fp32,
bf16, int8, ONNX and ONNX int8 with the differences (goal: |difference| < 0.5 point).

`--predict-cli RUN_DIR` times `mtbert predict RUN --task quora --input quora-dev.csv` (the
function the CLI calls) against the fp32 path on the same 2 x pairs sentences with the run's
encoder, in one process (goal: within 10%). The CLI path also reads and writes files and runs
the siamese head; it encodes each distinct sentence of a chunk once.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from bench_train import (
    DEFAULT_DATA,
    MemoryProbe,
    common_arguments,
    decomposition,
    gemm_limit_lines,
    hf_split,
    markdown_table,
    memory_probes,
    paired_ratios,
    sample_texts,
    set_threads,
)

from mtbert.config import HeadConfig, TaskConfig
from mtbert.data.batching import EncodedSplit, TokenRows, collate, encode_split, sorted_batches
from mtbert.data.readers import read_examples
from mtbert.data.tasks import read_split
from mtbert.evaluation import metric, predict, predict_outputs
from mtbert.inference import OnnxPredictor, export_onnx, quantize_dynamic, to_bf16
from mtbert.model.bert import BertModel, mean_pool
from mtbert.model.heads import build_head, is_siamese
from mtbert.model.loading import load_bert, resolve_checkpoint
from mtbert.model.multitask import MultitaskModel
from mtbert.tokenizer import Tokenizer

TASK = "sentence"
NAMES = {"hf": "HF, as commonly run (batches in the chunk's order, padding=True)",
         "hf-sorted": "HF, same sorted batches, chunk tokenized at once",
         "hf-bf16": "HF, same sorted batches, weights bf16",
         "fp32": "mtbert fp32 (sorted, dynamic padding)",
         "bf16": "mtbert bf16 (weights bf16)",
         "int8": "mtbert int8 (torch dynamic quantization)", "onnx": "mtbert ONNX Runtime fp32",
         "onnx-int8": "mtbert ONNX Runtime int8"}


def onnx_available() -> bool:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


SENTENCE = TaskConfig(name=TASK, num_classes=2, head=HeadConfig(pooling="mean", dropout=0.0))


def sentence_head(hidden_size: int) -> torch.nn.Module:
    """The linear head every contender uses (seeded: the same in every process)."""
    torch.manual_seed(0)
    return build_head(SENTENCE, hidden_size).eval()


def sentence_model(folder: Path) -> MultitaskModel:
    """The backbone with `sentence_head()` on mean-pooled token states."""
    return with_sentence_head(load_bert(folder)[0])


def with_sentence_head(encoder: BertModel) -> MultitaskModel:
    model = MultitaskModel(encoder, [SENTENCE])
    model.heads[TASK] = sentence_head(encoder.config.hidden_size)
    return model.eval()


class Mtbert:
    """Tokenize the chunk at once, then run length-sorted batches (in PyTorch or ORT)."""

    def __init__(self, tokenizer: Tokenizer, batch_size: int, model: MultitaskModel,
                 onnx_file: Path | None = None):
        self.tokenizer, self.batch_size, self.model = tokenizer, batch_size, model
        self.onnx = None if onnx_file is None else OnnxPredictor(onnx_file, SENTENCE)

    def __call__(self, texts: list[str]) -> np.ndarray:
        ids, types = self.tokenizer.encode(texts)
        split = EncodedSplit(list(map(str, range(len(texts)))), None,
                             TokenRows.from_lists(ids, types), None)
        pad = self.tokenizer.pad_id
        if self.onnx is None:
            return predict_outputs(self.model, TASK, split, self.batch_size, pad)
        out = np.empty((len(texts), SENTENCE.num_classes), dtype=np.float32)
        for rows in sorted_batches(split.lengths(), self.batch_size):
            logits = torch.from_numpy(self.onnx.outputs(collate(split, rows, pad)))
            out[rows] = logits.softmax(-1).numpy()
        return out


class HuggingFace:
    """`transformers.BertModel`, mean-pooled, and the head. Not `sort`: a typical transformers
    user, each batch tokenized with padding=True in the chunk's order. `sort`: the chunk
    tokenized at once, then mtbert's length-sorted batches padded by `collate`."""

    def __init__(self, folder: Path, batch_size: int, max_length: int, sort: bool = False,
                 dtype: torch.dtype = torch.float32):
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
        self.model = transformers.BertModel.from_pretrained(folder, torch_dtype=dtype).eval()
        self.tokenizer = transformers.BertTokenizerFast.from_pretrained(folder)
        self.head = sentence_head(self.model.config.hidden_size)
        self.batch_size, self.max_length, self.sort = batch_size, max_length, sort

    @torch.inference_mode()
    def probabilities(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        vectors = mean_pool(self.model(**inputs).last_hidden_state, inputs["attention_mask"])
        return self.head(vectors.float(), None).predictions.softmax(-1)

    def __call__(self, texts: list[str]) -> np.ndarray:
        if self.sort:
            split = hf_split(self.tokenizer, texts, self.max_length)
            out = np.empty((len(texts), SENTENCE.num_classes), dtype=np.float32)
            for rows in sorted_batches(split.lengths(), self.batch_size):
                batch = collate(split, rows, self.tokenizer.pad_token_id)
                out[rows] = self.probabilities({"input_ids": batch.input_ids,
                                                "attention_mask": batch.attention_mask,
                                                "token_type_ids": batch.token_type_ids}).numpy()
            return out
        outputs = []
        for start in range(0, len(texts), self.batch_size):
            inputs = self.tokenizer(texts[start:start + self.batch_size], padding=True,
                                    truncation=True, max_length=self.max_length,
                                    return_tensors="pt")
            outputs.append(self.probabilities(dict(inputs)))
        return torch.cat(outputs).numpy()


def build(name: str, folder: Path, args, onnx_dir: Path | None):
    """One contender: `hf`, `hf-sorted`, `hf-bf16`, `fp32`, `bf16`, `int8`, `onnx` or
    `onnx-int8` (reads ONNX_DIR/NAME.onnx)."""
    if name.startswith("hf"):
        return HuggingFace(folder, args.batch_size, args.max_length, sort=name != "hf",
                           dtype=torch.bfloat16 if name == "hf-bf16" else torch.float32)
    model = sentence_model(folder)
    if name == "bf16":
        model = to_bf16(model)
    if name == "int8":
        model = quantize_dynamic(model, args.keep_fp32)
    tokenizer = Tokenizer.from_folder(folder, args.max_length)
    onnx_file = onnx_dir / f"{name}.onnx" if name.startswith("onnx") else None
    return Mtbert(tokenizer, args.batch_size, model, onnx_file)


def speed(args) -> None:
    folder = resolve_checkpoint(args.backbone)
    chunk = args.batches * args.batch_size
    texts = sample_texts("quora", args.data_dir or DEFAULT_DATA,
                         (args.repeats + 1) * chunk, args.seed)[0]
    use_onnx = args.onnx and onnx_available()
    names = ["hf", "hf-sorted", "hf-bf16", "fp32", "bf16", "int8"]
    names += ["onnx", "onnx-int8"] if use_onnx else []
    if args.memory_probe:
        contender = build(args.memory_probe, folder, args, args.onnx_dir)
        probe = MemoryProbe()
        contender(texts[:chunk])
        return probe.report()
    with tempfile.TemporaryDirectory() as onnx_dir:
        onnx_dir = Path(onnx_dir)
        if use_onnx:
            start = time.perf_counter()
            for quantize in (False, True):
                export_onnx(sentence_model(folder), TASK,
                            onnx_dir / ("onnx-int8.onnx" if quantize else "onnx.onnx"), quantize)
            export_s = time.perf_counter() - start
        contenders = {name: build(name, folder, args, onnx_dir) for name in names}
        tokenizer = contenders["fp32"].tokenizer
        real_tokens = [sum(map(len, tokenizer.encode(texts[i * chunk:(i + 1) * chunk])[0]))
                       for i in range(args.repeats + 1)]
        reference = {name: run(texts[:args.batch_size]) for name, run in contenders.items()}
        results = {name: [] for name in names}
        for repeat in range(args.repeats):
            part = texts[(repeat + 1) * chunk:(repeat + 2) * chunk]
            for name in names if repeat % 2 == 0 else names[::-1]:
                start = time.perf_counter()
                contenders[name](part)
                seconds = time.perf_counter() - start
                results[name].append({"sentences/s": len(part) / seconds,
                                      "tokens/s": real_tokens[repeat + 1] / seconds})
        memory = {} if args.no_memory else memory_probes(names, ["--onnx-dir", str(onnx_dir)])

    print(f"inference: Quora dev sentences, batch {args.batch_size}, {args.repeats} repeats x "
          f"{chunk} sentences after 1 warm-up batch, threads {torch.get_num_threads()}")
    print(f"backbone: {folder}")
    if use_onnx:
        print(f"ONNX export (fp32 and int8) took {export_s:.1f} s (not timed)")
    elif args.onnx:
        print("ONNX skipped: onnxruntime or onnx is not installed")
    for name in names[1:]:
        gap = np.abs(reference[name] - reference["hf"]).max()
        print(f"max |{name} - HF| head probabilities on one batch: {gap:.1e}")
    rows = []
    for name in names:
        probe = memory.get(name)
        rows.append([NAMES[name], name,
                     f"{statistics.median(r['sentences/s'] for r in results[name]):.1f}",
                     f"{statistics.median(r['tokens/s'] for r in results[name]):.0f}",
                     *(f"{statistics.median(paired_ratios(results, name, hf, 'sentences/s')):.2f}x"
                       for hf in ("hf", "hf-sorted")),
                     f"{probe['peak_mb']:.0f}" if probe else "-",
                     f"{probe['growth_mb']:.0f}" if probe else "-"])
    print()
    print(markdown_table(["contender", "name", "sentences/s", "real tokens/s",
                          "vs hf (median ratio)", "vs hf-sorted (median ratio)", "peak RSS MiB",
                          "encoding RSS MiB"], rows))
    print(f"\nratios are medians of {args.repeats} paired repeats; goal: fp32 >= 2x, "
          "int8 / ONNX >= 4x HF\n")
    print("mtbert fp32's gain over HF as commonly run, step by step:\n")
    print(decomposition(results, [
        ("hf", ""), ("hf-sorted", "batch plan: length-sorted batches, chunk tokenized at once"),
        ("fp32", "encoder: real tokens only + mtbert's kernels")], "sentences/s") + "\n")
    same_precision = paired_ratios(results, "bf16", "hf-bf16", "sentences/s")
    print(f"mtbert bf16 / HF bf16 on the same sorted batches: "
          f"{statistics.median(same_precision):.2f}x sentences/s (median of paired repeats; "
          f"per repeat {', '.join(f'{r:.2f}' for r in same_precision)})\n")
    speeds = {name: statistics.median(r["tokens/s"] for r in results[name])
              for name in ("fp32", "bf16")}
    length = sum(real_tokens[1:]) / (args.repeats * chunk)
    print("\n".join(gemm_limit_lines(contenders["fp32"].model.encoder.config, length, False,
                                     speeds)))


def accuracy(args) -> None:
    """Dev metric of each task of a trained run: fp32 vs bf16, int8 and ONNX (fp32 and int8),
    and each variant's largest difference from fp32."""
    from mtbert.model_folder import load_model

    model, tokenizer, config = load_model(args.accuracy)
    data_dir = args.data_dir or config.data_dir
    fast = {"bf16": to_bf16(model), "int8": quantize_dynamic(model, args.keep_fp32)}
    variants = [*fast] + (["onnx", "onnx-int8"] if args.onnx and onnx_available() else [])
    rows, worst = [], dict.fromkeys(variants, 0.0)
    with tempfile.TemporaryDirectory() as tmp:
        for name, task in model.tasks.items():
            examples = read_split(task, "dev", data_dir)
            if not examples:
                continue
            if len(examples) > args.max_examples:
                keep = np.random.default_rng(args.seed).permutation(len(examples))
                examples = [examples[i] for i in np.sort(keep[:args.max_examples])]
            split = encode_split(examples, tokenizer, is_siamese(task))
            labels, pad = split.labels.numpy(), tokenizer.pad_id
            fp32 = metric(task, predict(model, name, split, args.batch_size, pad), labels)
            row = [name, f"{task.metric} (n={len(split)})", f"{100 * fp32:.2f}"]
            for variant in variants:
                if variant in fast:
                    predictions = predict(fast[variant], name, split, args.batch_size, pad)
                else:
                    path = export_onnx(model, name, Path(tmp) / f"{name}-{variant}.onnx",
                                       quantize=variant == "onnx-int8")
                    predictions = OnnxPredictor(path, task).predict(split, args.batch_size, pad)
                value = metric(task, predictions, labels)
                row += [f"{100 * value:.2f}", f"{100 * (value - fp32):+.2f}"]
                worst[variant] = max(worst[variant], abs(value - fp32))
            rows.append(row)
    header = ["task", "metric", "fp32"]
    header += [column for v in variants for column in (v, f"{v} - fp32")]
    print(f"dev metrics (x100) of {args.accuracy}, at most {args.max_examples} examples a task"
          + (f"; int8 keeps {' '.join(args.keep_fp32)} fp32" if args.keep_fp32 else "")
          + ("" if len(variants) > len(fast)
             else "; ONNX skipped (not installed, or --no-onnx)"))
    print(markdown_table(header, rows))
    print("\nlargest |difference| from fp32 (goal: under 0.5 point):")
    for variant, points in worst.items():
        print(f"  {variant}: {100 * points:.2f} points "
              f"({'ok' if 100 * points < 0.5 else 'ABOVE the goal'})")


def predict_cli(args) -> None:
    """`mtbert predict RUN --task quora --input quora-dev.csv` (`Model.predict_file`, the
    function the CLI calls: reading, chunks, tokenizing, the run's siamese head, writing JSON
    lines) against the fp32 path above on the same sentences, in this process."""
    from mtbert.api import load

    model = load(args.predict_cli, batch_size=args.batch_size)
    path = (args.data_dir or DEFAULT_DATA) / "quora-dev.csv"
    task = model.model.tasks["quora"]
    examples = read_examples(path, task.text_columns, None, id_column=task.id_column).examples
    sentences = [text for example in examples for text in example.texts]
    fp32 = Mtbert(model.tokenizer, args.batch_size, with_sentence_head(model.model.encoder))
    runs = {"cli": lambda out: model.predict_file("quora", path, out),
            "fp32": lambda out: fp32(sentences)}
    speeds: dict[str, list[float]] = {name: [] for name in runs}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "predictions.jsonl"
        model.predict("quora", [example.texts for example in examples[:args.batch_size]])
        fp32(sentences[:args.batch_size])  # warm-up
        for repeat in range(args.repeats):
            for name in list(runs) if repeat % 2 == 0 else list(runs)[::-1]:
                start = time.perf_counter()
                runs[name](out)
                speeds[name].append(len(sentences) / (time.perf_counter() - start))
    cli, lib = statistics.median(speeds["cli"]), statistics.median(speeds["fp32"])
    print(f"{path}: {len(examples)} pairs = {len(sentences)} sentences, batch "
          f"{args.batch_size}, {args.repeats} repeats (alternating order), threads "
          f"{torch.get_num_threads()}, model {args.predict_cli}")
    print(markdown_table(["path", "sentences/s (median)", "each repeat"], [
        ["mtbert predict (Model.predict_file: read, quora siamese head, write JSONL)",
         f"{cli:.1f}", " ".join(f"{v:.1f}" for v in speeds["cli"])],
        [NAMES["fp32"] + ", same encoder, linear head", f"{lib:.1f}",
         " ".join(f"{v:.1f}" for v in speeds["fp32"])]]))
    print(f"\nmtbert predict / fp32 path: {cli / lib:.3f} (goal: >= 0.90)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common_arguments(parser)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batches", type=int, default=8, help="batches per repeat")
    parser.add_argument("--no-onnx", dest="onnx", action="store_false")
    parser.add_argument("--accuracy", type=Path, default=None, metavar="RUN_DIR")
    parser.add_argument("--max-examples", type=int, default=2000, help="per task (--accuracy)")
    parser.add_argument("--keep-fp32", nargs="*", default=[], metavar="MODULE",
                        help="encoder modules the torch int8 model keeps fp32, e.g. layers.0")
    parser.add_argument("--predict-cli", type=Path, default=None, metavar="RUN_DIR",
                        help="time `mtbert predict RUN --task quora` on quora-dev against the "
                             "fp32 path (needs a run with a quora task)")
    parser.add_argument("--onnx-dir", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.smoke:
        args.batch_size, args.repeats, args.batches = 8, 2, 1
    set_threads(args.threads)
    if args.predict_cli:
        predict_cli(args)
    else:
        accuracy(args) if args.accuracy else speed(args)


if __name__ == "__main__":
    main()
