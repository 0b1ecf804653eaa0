"""Data at scale: cold tokenization rows/s, warm time to the first step and peak resident memory
of a synthetic single-sentence JSONL task: mtbert's token cache, the in-memory path it
replaced, and Hugging Face `datasets` (`load_dataset("json")` + `map(batched=True,
num_proc=cores)`) on the same file.

    python benchmarks/bench_data.py --rows 100000 [1000000 10000000] [--work DIR]
        [--memory-up-to 1000000] [--backbone DIR] [--max-length 128] [--smoke]

Every measurement runs in a fresh process, so its peak resident memory (`ru_maxrss`; with
`datasets`' worker processes, the largest of the parent and its workers) is its own:
- in memory: `read_examples` + `encode_split` into Python lists (the path before the cache),
  skipped above `--memory-up-to` rows (it needs ~6 KB a row);
- cache cold: `load_split` into an empty cache (read, tokenize, write, map);
- cache warm: `Trainer(config)` to the end of its first `train_step()` (a classifier on the
  backbone, batch 32), the entry already built: model loading, mapping, the batch plan;
- datasets cold: `load_dataset` + `map` into an empty cache folder;
- datasets warm: the same calls (cache hits) to the first padded batch of 32 (no model).
Synthetic rows: 8 to 24 words drawn from the backbone's whole-word vocabulary, a 0/1 label.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from bench_train import markdown_table

KINDS = ("memory", "cache-cold", "cache-warm", "datasets-cold", "datasets-warm")


def write_rows(path: Path, rows: int, vocab: Path, seed: int = 0) -> None:
    words = [w for w in vocab.read_text(encoding="utf-8").split() if w.isalpha()]
    rng = np.random.default_rng(seed)
    with open(path, "w", encoding="utf-8") as out:
        for start in range(0, rows, 100_000):
            count = min(100_000, rows - start)
            lengths = rng.integers(8, 25, count)
            picks = rng.integers(0, len(words), int(lengths.sum()))
            labels = rng.integers(0, 2, count)
            ends = np.cumsum(lengths)
            out.writelines(
                json.dumps({"id": f"r{start + i}", "sentence": " ".join(
                    words[w] for w in picks[end - n:end]), "label": int(label)}) + "\n"
                for i, (n, end, label) in enumerate(zip(lengths, ends, labels)))


def experiment(data: Path, backbone: str, cache: Path, max_length: int):
    from mtbert.config import load_config

    task = ("{name: synth, text_columns: [sentence], label_column: label, num_classes: 2, "
            f"train_file: '{data}', head: {{type: classifier, pooling: mean}}}}")
    return load_config(None, [f"tasks=[{task}]", f"model.backbone={backbone}",
                              f"cache_dir={cache}", f"model.max_length={max_length}",
                              "train.precision=fp32",
                              "train.batch_size=32", "train.max_steps=1"])


def peak_mb() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, workers) / 1024


def measure(kind: str, data: Path, backbone: str, work: Path, max_length: int) -> dict:
    """One measurement, in this process: seconds and peak resident MB."""
    from mtbert.model.loading import resolve_checkpoint

    folder = resolve_checkpoint(backbone)
    config = experiment(data, backbone, work / "mtbert-cache", max_length)
    start = time.perf_counter()
    if kind == "memory":
        from mtbert.data.batching import encode_split
        from mtbert.data.tasks import read_split
        from mtbert.tokenizer import Tokenizer

        tokenizer = Tokenizer.from_folder(folder, config.model.max_length)
        split = encode_split(read_split(config.tasks[0], "train", config.data_dir), tokenizer,
                             siamese=False)
    elif kind == "cache-cold":
        from mtbert.data.tasks import load_split
        from mtbert.tokenizer import Tokenizer

        tokenizer = Tokenizer.from_folder(folder, config.model.max_length)
        split = load_split(config.tasks[0], "train", config, tokenizer, siamese=False)
    elif kind == "cache-warm":
        import tempfile

        from mtbert.cpu import configure_process
        from mtbert.training import Trainer

        configure_process()
        with tempfile.TemporaryDirectory() as run_dir:
            trainer = Trainer(config, run_dir)
            trainer.train_step()
        split = trainer.data["synth"].train
    else:
        from datasets import load_dataset
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(folder)
        dataset = load_dataset("json", data_files=str(data), split="train",
                               cache_dir=str(work / "hf-cache"))
        dataset = dataset.map(
            lambda batch: tokenizer(batch["sentence"], truncation=True,
                                    max_length=config.model.max_length),
            batched=True, num_proc=os.cpu_count(), remove_columns=["sentence", "id"])
        if kind == "datasets-warm":
            tokenizer.pad([dataset[i] for i in range(32)], return_tensors="pt")
        split = dataset
    return {"seconds": time.perf_counter() - start, "rows": len(split), "peak_mb": peak_mb()}


def run_measure(kind: str, data: Path, args: argparse.Namespace, work: Path) -> dict:
    done = subprocess.run([sys.executable, __file__, "--measure", kind, "--data", str(data),
                           "--backbone", args.backbone, "--work", str(work),
                           "--max-length", str(args.max_length)],
                          capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{kind} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def rows_of(rows: int, megabytes: float, found: dict[str, dict]) -> list[list[str]]:
    """The table's rows for one file size: a row per path measured."""

    def cell(kind: str, key: str, digits: int = 1) -> str:
        value = found.get(kind, {}).get(key)
        return "-" if value is None else f"{value:,.{digits}f}"

    def rate(kind: str) -> str:
        return "-" if kind not in found else f"{rows / found[kind]['seconds']:,.0f}"

    table = [["mtbert in memory (before)", rate("memory"), cell("memory", "peak_mb", 0), "-",
              "-"],
             ["mtbert token cache", rate("cache-cold"), cell("cache-cold", "peak_mb", 0),
              cell("cache-warm", "seconds"), cell("cache-warm", "peak_mb", 0)]]
    if "datasets-cold" in found:
        table.append([f"datasets.map (num_proc={os.cpu_count()})", rate("datasets-cold"),
                      cell("datasets-cold", "peak_mb", 0), cell("datasets-warm", "seconds"),
                      cell("datasets-warm", "peak_mb", 0)])
    return [[f"{rows:,} ({megabytes:,.0f} MB)", *table[0]], *(["", *r] for r in table[1:])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[100_000])
    parser.add_argument("--work", type=Path, default=Path("/tmp/mtbert-bench-data"),
                        help="files and caches (removed and rewritten)")
    parser.add_argument("--memory-up-to", type=int, default=1_000_000,
                        help="largest file the in-memory path is run on")
    parser.add_argument("--backbone", default="all-minilm-l6-v2")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--smoke", action="store_true", help="2,000 rows, no datasets")
    parser.add_argument("--measure", choices=KINDS, help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.data, args.backbone, args.work,
                                 args.max_length)))
        return
    from mtbert.model.loading import resolve_checkpoint

    try:
        import datasets  # noqa: F401
        with_datasets = not args.smoke
    except ImportError:
        with_datasets = False
    sizes = [2_000] if args.smoke else args.rows
    vocab = resolve_checkpoint(args.backbone) / "vocab.txt"
    table = []
    for rows in sizes:
        work = args.work / str(rows)
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        data = work / "rows.jsonl"
        write_rows(data, rows, vocab)
        kinds = [k for k in KINDS if (with_datasets or not k.startswith("datasets"))
                 and (k != "memory" or rows <= args.memory_up_to)]
        found = {kind: run_measure(kind, data, args, work) for kind in kinds}
        assert all(r["rows"] == rows for r in found.values()), found
        table += rows_of(rows, os.path.getsize(data) / 2**20, found)
    command = "python benchmarks/bench_data.py " + " ".join(sys.argv[1:])
    print(f"`{command}` ({os.cpu_count()} cores, backbone {args.backbone}; warm: mtbert to the "
          "end of its first training step, datasets to its first padded batch)\n")
    print(markdown_table(["rows (file)", "path", "cold rows/s", "cold peak MB",
                          "warm s to first step", "warm peak MB"], table))


if __name__ == "__main__":
    main()
