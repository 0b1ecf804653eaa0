"""Training throughput: mtbert in fp32 and bf16 vs `transformers.BertModel` as commonly run
and with mtbert's batch plan, same weights and sentences; the gain split into its parts.

    python benchmarks/bench_train.py [--batch-size 32] [--repeats 5] [--steps 10] [--warmup 2]
        [--naive] [--optimizer own|torch] [--threads N] [--backbone DIR] [--data-dir DIR]
        [--no-memory] [--smoke]

Every contender loads the same checkpoint (the embedded all-MiniLM-L6-v2 by default) and
trains on the same shuffled SST train sentences: forward, a linear head on the pooled [CLS]
vector, cross-entropy, backward, AdamW step, dropout on. They run in one process in
alternating blocks of `--steps` steps (the order flips every repeat), after `--warmup` untimed
steps each. Each contender differs from the one before it in one thing:

- `hf`, HF as commonly run: `BertTokenizerFast(..., padding=True)` on every random batch of
  the sentences (the tokenizer call is timed), `torch.optim.AdamW`; `--naive` adds HF with
  `padding="max_length"` (128).
- `hf-plan`, HF with mtbert's batch plan: the sentences tokenized once up front by HF's
  tokenizer (not timed), the very row lists of mtbert's `bucketed_batches` (shuffled length
  buckets: what `Trainer(group_by_length=True)` gives), each batch padded to its longest row
  by `collate` (as `DataCollatorWithPadding` does), `torch.optim.AdamW`.
- `hf-plan-adamw`: the same with `mtbert.optim.AdamW` (only with `--optimizer own`).
- `mtbert` (fp32): its own tokenizer up front (time printed, not counted), the same batches,
  the same optimizer; its encoder computes real tokens only.
- `mtbert-bf16`: the same under bf16 autocast (`train.precision: bf16`), weights and
  optimizer fp32.
- `hf-plan-bf16`: the HF contender just before `mtbert` (same batch plan, pre-tokenized,
  same optimizer) under the same bf16 autocast, as `Trainer(bf16=True)` trains on CPUs: the
  peer of `mtbert-bf16`.
- `--optimizer own` (default): mtbert steps `mtbert.optim.AdamW`; `--optimizer torch`: mtbert
  too steps `torch.optim.AdamW`, and `hf-plan-adamw` is left out. HF as commonly run always
  steps `torch.optim.AdamW`.

Throughput counts real (non-pad) tokens. Ratios are medians over repeats of paired ratios
(two contenders in the same repeat). The decomposition multiplies the median ratio of each
contender to the one before it, from HF as commonly run to mtbert fp32: a product of
medians, so it equals the median overall ratio only approximately. The GEMM-bound limit is
this machine's measured matmul FLOP/s over the matrix-product FLOPs per token
(`matmul_flops_per_token`). Peak memory is measured apart, in a child process per
contender (mtbert's never imports transformers) that runs three steps on the batch of the
longest sentences. Peak RSS is the child's high-water mark (Linux VmHWM, loading included);
training RSS is how far the resident set rose above its size just before the first step
(activations, gradients, optimizer state): VmHWM after the mark is reset through
`/proc/self/clear_refs`. Off Linux both fall back to `resource.getrusage(...).ru_maxrss`.
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mtbert.config import TaskConfig
from mtbert.data.batching import EncodedSplit, TokenRows, bucketed_batches, collate
from mtbert.data.tasks import read_split
from mtbert.model.bert import BertConfig
from mtbert.model.loading import load_bert, resolve_checkpoint
from mtbert.optim import AdamW
from mtbert.precision import autocast
from mtbert.presets import PRESETS
from mtbert.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data"


# ---------------------------------------------------------------- helpers shared with bench_infer


def common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backbone", default="all-minilm-l6-v2",
                        help="checkpoint folder or name (default: the embedded MiniLM)")
    parser.add_argument("--data-dir", type=Path, default=None,
                        help=f"task data folder (default: {DEFAULT_DATA})")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-memory", action="store_true", help="skip the memory probes")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, for tests")
    parser.add_argument("--memory-probe", default=None, help=argparse.SUPPRESS)


def sample_texts(task: str, data_dir: Path, count: int, seed: int) -> tuple[list[str], list]:
    """`count` shuffled texts (every text column) of the task's train or dev split, with the
    example labels (tiled when the split is smaller)."""
    config = TaskConfig(name=task, **PRESETS[task])
    split = "train" if task == "sst" else "dev"
    examples = read_split(config, split, data_dir)
    texts = [(text, e.label) for e in examples for text in e.texts]
    order = np.random.default_rng(seed).permutation(len(texts))
    order = np.resize(order, count)  # repeats the permutation if the split is too small
    return [texts[i][0] for i in order], [texts[i][1] for i in order]


def rss_mb(field: str) -> float:
    """`VmRSS` (now) or `VmHWM` (peak) of this process, MiB, from Linux's /proc/self/status;
    elsewhere the peak `ru_maxrss`. (On Linux `ru_maxrss` is no good for a child process: it
    carries over the parent's peak across fork and exec.)"""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB elsewhere
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


class MemoryProbe:
    """Created just before the measured steps; `report()` prints the probe's JSON line."""

    def __init__(self):
        self.loading_peak = rss_mb("VmHWM")
        try:  # reset the peak mark to the current RSS
            Path("/proc/self/clear_refs").write_text("5")
            self.baseline = rss_mb("VmRSS")
        except OSError:  # no reset: growth is how far the peak itself rises
            self.baseline = self.loading_peak

    def report(self) -> None:
        peak = rss_mb("VmHWM")
        print(json.dumps({"peak_mb": max(peak, self.loading_peak),
                          "growth_mb": peak - self.baseline}))


def memory_probes(names: list[str], extra: list[str] = ()) -> dict[str, dict]:
    """Run this script once per contender with `--memory-probe NAME`; parse its JSON line."""
    results = {}
    for name in names:
        command = [sys.executable, sys.argv[0], *sys.argv[1:], *extra, "--memory-probe", name]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"memory probe {name} failed:\n{done.stderr[-3000:]}")
        results[name] = json.loads(done.stdout.strip().splitlines()[-1])
    return results


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join([*lines, *("| " + " | ".join(row) + " |" for row in rows)])


def set_threads(threads: int | None) -> None:
    if threads:
        torch.set_num_threads(threads)


def training_sample(args) -> tuple[Path, list[str], list]:
    """What a training benchmark sets up first: threads, seed, the backbone folder, and the
    SST train sentences its warm-up and timed steps need."""
    set_threads(args.threads)
    torch.manual_seed(args.seed)
    batches_needed = args.warmup + args.repeats * args.steps
    texts, labels = sample_texts("sst", args.data_dir or DEFAULT_DATA,
                                 batches_needed * args.batch_size, args.seed)
    return resolve_checkpoint(args.backbone), texts, labels


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def matmul_flops(config: BertConfig, dtype: str, rows: int = 4096, seconds: float = 1.0
                 ) -> float:
    """Measured FLOP/s of a (rows x hidden) @ (hidden x intermediate) product in `dtype`, the
    shape class of the encoder's feed-forward layers: how fast this machine multiplies
    matrices, the ceiling of any step made of matrix products."""
    a = torch.randn(rows, config.hidden_size, dtype=DTYPES[dtype])
    b = torch.randn(config.hidden_size, config.intermediate_size, dtype=DTYPES[dtype])
    for _ in range(3):
        a @ b
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    return count * 2 * rows * config.hidden_size * config.intermediate_size / (
        time.perf_counter() - start)


def matmul_flops_per_token(config: BertConfig, length: float, training: bool) -> float:
    """Matrix-product FLOPs the encoder spends per token: 2 per weight of the layers' linear
    maps, plus attention's 4 x length x hidden per layer (Q K^T and weights x V over a
    sequence of `length` tokens); training triples it (the backward pass computes the
    gradients of inputs and of weights). Embeddings and heads are left out (no products, or
    negligible)."""
    hidden, layers = config.hidden_size, config.num_hidden_layers
    weights = 4 * hidden * hidden + 2 * hidden * config.intermediate_size  # Q, K, V, O, FFN
    forward = layers * (2 * weights + 4 * length * hidden)
    return 3 * forward if training else forward


def gemm_limit_lines(config: BertConfig, length: float, training: bool,
                     tokens_per_s: dict[str, float]) -> list[str]:
    """For each dtype of `tokens_per_s`: the matrix-product limit of this machine in tokens/s
    (measured matmul FLOP/s / FLOPs per token) and the share of it reached."""
    per_token = matmul_flops_per_token(config, length, training)
    lines = [f"GEMM-bound limit: {per_token / 1e6:.1f} MFLOP of matrix products per token "
             f"(mean sequence length {length:.1f}, {'training' if training else 'inference'})"]
    for dtype, reached in tokens_per_s.items():
        flops = matmul_flops(config, dtype)
        limit = flops / per_token
        lines.append(f"  {dtype}: matmul {flops / 1e9:.0f} GFLOP/s -> limit {limit:.0f} "
                     f"tokens/s; reached {reached:.0f} = {reached / limit:.0%} of it")
    return lines


# ---------------------------------------------------------------- the two training loops


class MtbertTraining:
    """mtbert's own path: pre-tokenized split, length-bucketed batches, dynamic padding."""

    def __init__(self, folder: Path, texts: list[str], labels: list, args, head: nn.Module,
                 precision: str = "fp32"):
        self.encoder = load_bert(folder)[0].train()
        self.precision = precision
        tokenizer = Tokenizer.from_folder(folder, args.max_length)
        self.pad_id = tokenizer.pad_id
        start = time.perf_counter()
        ids, types = tokenizer.encode(texts)
        self.tokenize_s = time.perf_counter() - start
        self.split = EncodedSplit([str(i) for i in range(len(texts))],
                                  torch.tensor(labels, dtype=torch.float32),
                                  TokenRows.from_lists(ids, types), None)
        self.head = copy.deepcopy(head)
        params = [*self.encoder.parameters(), *self.head.parameters()]
        optimizer = AdamW if args.optimizer == "own" else torch.optim.AdamW
        self.optimizer = optimizer(params, lr=args.lr, weight_decay=0.01)

    def plan(self, batch_size: int, seed: int) -> list[np.ndarray]:
        return bucketed_batches(self.split.lengths(), batch_size, np.random.default_rng(seed))

    def step(self, rows: np.ndarray) -> tuple[int, int]:
        batch = collate(self.split, rows, self.pad_id)
        with autocast(torch.device("cpu"), self.precision):
            _, pooled = self.encoder(batch.input_ids, batch.attention_mask, batch.token_type_ids)
            logits = self.head(pooled)
        loss = F.cross_entropy(logits.float(), batch.labels.long())
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return batch.real_tokens(), batch.input_ids.numel()


def hf_split(tokenizer, texts: list[str], max_length: int) -> EncodedSplit:
    """`texts` tokenized at once by a `transformers` tokenizer, truncated, unpadded: batches
    of it are padded to their longest row by `collate` (labels stay with the caller)."""
    encoded = tokenizer(texts, truncation=True, max_length=max_length)
    return EncodedSplit([str(i) for i in range(len(texts))], None,
                        TokenRows.from_lists(encoded["input_ids"], encoded["token_type_ids"]),
                        None)


class HfTraining:
    """`transformers.BertModel` and the linear head on its [CLS] pooler. Not `pretokenized`:
    what a typical transformers user writes, each batch tokenized and padded (`padding`) in
    the loop. `pretokenized`: the sentences tokenized once up front (not timed), each batch
    padded to its longest row by `collate`, as `Trainer(group_by_length=True)` with
    `DataCollatorWithPadding` feeds them."""

    def __init__(self, folder: Path, texts: list[str], labels: list, args, head: nn.Module,
                 padding: str | bool = True, pretokenized: bool = False,
                 optimizer: type[torch.optim.Optimizer] = torch.optim.AdamW,
                 precision: str = "fp32"):
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
        self.model = transformers.BertModel.from_pretrained(folder).train()
        self.tokenizer = transformers.BertTokenizerFast.from_pretrained(folder)
        self.texts, self.labels = texts, torch.tensor(labels).long()
        self.padding, self.max_length = padding, args.max_length
        self.split = hf_split(self.tokenizer, texts, args.max_length) if pretokenized else None
        self.head = copy.deepcopy(head)
        params = [*self.model.parameters(), *self.head.parameters()]
        self.optimizer = optimizer(params, lr=args.lr, weight_decay=0.01)
        self.precision = precision

    def inputs(self, rows: np.ndarray) -> dict[str, torch.Tensor]:
        if self.split is None:
            return dict(self.tokenizer([self.texts[i] for i in rows], padding=self.padding,
                                       truncation=True, max_length=self.max_length,
                                       return_tensors="pt"))
        batch = collate(self.split, rows, self.tokenizer.pad_token_id)
        return {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask,
                "token_type_ids": batch.token_type_ids}

    def step(self, rows: np.ndarray) -> tuple[int, int]:
        inputs = self.inputs(rows)
        with autocast(torch.device("cpu"), self.precision):
            pooled = self.model(**inputs).pooler_output
            logits = self.head(pooled)
        loss = F.cross_entropy(logits.float(), self.labels[torch.from_numpy(rows)])
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return int(inputs["attention_mask"].sum()), inputs["input_ids"].numel()


@torch.no_grad()
def pooled_gap(ours: MtbertTraining, theirs: HfTraining, rows: np.ndarray) -> float:
    """Max |pooled mtbert - pooled HF| on one batch in eval mode: are the weights the same?"""
    inputs = theirs.inputs(rows)
    ours.encoder.eval(), theirs.model.eval()
    gap = (ours.encoder(inputs["input_ids"], inputs["attention_mask"],
                        inputs["token_type_ids"])[1] - theirs.model(**inputs).pooler_output)
    ours.encoder.train(), theirs.model.train()
    return gap.abs().max().item()


def timed_block(trainer, batches: list[np.ndarray]) -> dict[str, float]:
    real = padded = sentences = 0
    start = time.perf_counter()
    for rows in batches:
        r, p = trainer.step(rows)
        real, padded, sentences = real + r, padded + p, sentences + len(rows)
    seconds = time.perf_counter() - start
    return {"tokens/s": real / seconds, "sentences/s": sentences / seconds,
            "padding": 1 - real / padded}


# ---------------------------------------------------------------- paired ratios, shared


def paired_ratios(results: dict[str, list[dict]], a: str, b: str, key: str) -> list[float]:
    """a / b in each repeat (the two ran in the same repeat, on the same or a same-sized
    share of the sentences)."""
    return [x[key] / y[key] for x, y in zip(results[a], results[b])]


def ratio_cells(ratios: list[float]) -> list[str]:
    return [f"{statistics.median(ratios):.2f}x", ", ".join(f"{r:.2f}" for r in ratios)]


def decomposition(results: dict[str, list[dict]], chain: list[tuple[str, str]],
                  key: str) -> str:
    """The gain of the chain's last contender over its first, split into steps: each step is
    the median paired ratio of a contender to the one before it, which differs in one thing
    (`chain`: (contender, what it changes), the first the baseline). The product of the
    steps' medians is printed beside the median of the overall paired ratios: they agree
    only approximately."""
    rows, product = [], 1.0
    for step, ((before, _), (after, change)) in enumerate(zip(chain, chain[1:])):
        ratios = paired_ratios(results, after, before, key)
        product *= statistics.median(ratios)
        rows.append([f"({chr(ord('a') + step)}) {change}", f"{after} / {before}",
                     *ratio_cells(ratios)])
    first, last = chain[0][0], chain[-1][0]
    rows.append(["product of the steps' medians", "", f"{product:.2f}x", ""])
    rows.append(["overall", f"{last} / {first}",
                 *ratio_cells(paired_ratios(results, last, first, key))])
    return markdown_table(["step", "ratio", "median paired ratio", "per repeat"], rows)


# ---------------------------------------------------------------- main


def contenders(args) -> dict[str, str]:
    """Name -> row label; mtbert fp32 and the HF contenders before it form the chain of the
    decomposition, each differing from the one before in one thing."""
    own = args.optimizer == "own"
    names = {"hf": "HF, as commonly run (random batches tokenized in the loop, padding=True, "
                   "torch AdamW)",
             "hf-plan": "HF, same batch plan, pre-tokenized (torch AdamW)"}
    if own:
        names["hf-plan-adamw"] = "HF, same batch plan, pre-tokenized, mtbert's AdamW"
    names["mtbert"] = ("mtbert fp32 (same batch plan, pre-tokenized, "
                       f"{'mtbert' if own else 'torch'} AdamW)")
    names["mtbert-bf16"] = "mtbert bf16 autocast (same batches)"
    names["hf-plan-bf16"] = (f"HF, same batch plan, pre-tokenized, "
                             f"{'mtbert' if own else 'torch'} AdamW, bf16 autocast")
    if args.naive:
        names["hf-max-length"] = (f"HF, as commonly run with padding=max_length "
                                  f"{args.max_length}")
    return names


def chain_end_hf(names: dict[str, str]) -> str:
    """The HF contender just before mtbert fp32: same batch plan, same optimizer."""
    return "hf-plan-adamw" if "hf-plan-adamw" in names else "hf-plan"


def build(name: str, folder: Path, texts: list[str], labels: list, args, head: nn.Module):
    if name.startswith("mtbert"):
        return MtbertTraining(folder, texts, labels, args, head,
                              "bf16" if name == "mtbert-bf16" else "fp32")
    own_optimizer = name == "hf-plan-adamw" or (name == "hf-plan-bf16"
                                                and args.optimizer == "own")
    return HfTraining(folder, texts, labels, args, head,
                      padding="max_length" if name == "hf-max-length" else True,
                      pretokenized=name.startswith("hf-plan"),
                      optimizer=AdamW if own_optimizer else torch.optim.AdamW,
                      precision="bf16" if name.endswith("-bf16") else "fp32")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common_arguments(parser)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per repeat")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument("--optimizer", choices=["own", "torch"], default="own")
    parser.add_argument("--naive", action="store_true",
                        help="also time HF with padding='max_length'")
    args = parser.parse_args()
    if args.smoke:
        args.batch_size, args.repeats, args.steps, args.warmup = 8, 2, 1, 1
    folder, texts, labels = training_sample(args)
    hidden = json.loads((folder / "config.json").read_text())["hidden_size"]
    head = nn.Linear(hidden, 5)

    names = contenders(args)
    if args.memory_probe:
        lengths = [len(ids) for ids in Tokenizer.from_folder(folder, args.max_length)
                   .encode(texts)[0]]
        longest = np.argsort(lengths, kind="stable")[-args.batch_size:]
        trainer = build(args.memory_probe, folder, texts, labels, args, head)
        probe = MemoryProbe()
        for _ in range(3):
            trainer.step(longest)
        return probe.report()

    trainers = {name: build(name, folder, texts, labels, args, head) for name in names}
    mtbert, hf = trainers["mtbert"], trainers["hf"]
    ours_plan = mtbert.plan(args.batch_size, args.seed)
    theirs_plan = np.array_split(np.arange(len(texts)), args.warmup + args.repeats * args.steps)
    plans = {name: theirs_plan if name in ("hf", "hf-max-length") else ours_plan
             for name in trainers}

    gap = pooled_gap(mtbert, hf, theirs_plan[0])
    theirs, ours = trainers["hf-plan"].split.tokens, mtbert.split.tokens
    same_ids = np.array_equal(theirs.lengths, ours.lengths) and all(
        np.array_equal(theirs.row(r)[0], ours.row(r)[0]) for r in range(len(ours)))
    for name, trainer in trainers.items():
        timed_block(trainer, plans[name][:args.warmup])
    results = {name: [] for name in trainers}
    for repeat in range(args.repeats):
        order = list(trainers) if repeat % 2 == 0 else list(trainers)[::-1]
        start = args.warmup + repeat * args.steps
        for name in order:
            block = plans[name][start:start + args.steps]
            results[name].append(timed_block(trainers[name], block))
    memory = {} if args.no_memory else memory_probes(list(names))

    rows = []
    for name, runs in results.items():
        cells = [f"{statistics.median(r[key] for r in runs):.1f}"
                 for key in ("tokens/s", "sentences/s")]
        cells.append(f"{statistics.median(r['padding'] for r in runs):.0%}")
        probe = memory.get(name)
        cells += [f"{probe['peak_mb']:.0f}", f"{probe['growth_mb']:.0f}"] if probe else ["-", "-"]
        rows.append([names[name], name, *cells])
    print(f"training: SST train, batch {args.batch_size}, {args.repeats} repeats x "
          f"{args.steps} steps after {args.warmup} warm-up steps, "
          f"threads {torch.get_num_threads()}")
    print(f"backbone: {folder}\nHF attention: {hf.model.config._attn_implementation}")
    print(f"same weights: max |pooled mtbert - pooled HF| = {gap:.1e} on one batch (eval mode)")
    print(f"same token ids from HF's tokenizer and mtbert's: {'yes' if same_ids else 'NO'}")
    print(f"mtbert tokenized {len(texts)} sentences up front in {mtbert.tokenize_s:.2f} s "
          "(not in its timing)\n")
    print(markdown_table(["contender", "name", "real tokens/s", "sentences/s", "padding",
                          "peak RSS MiB", "training RSS MiB"], rows))
    print(f"\nratios of real tokens/s, median of {args.repeats} paired repeats:\n")
    print(markdown_table(["ratio", "median", "per repeat"], [
        [f"mtbert / {name}", *ratio_cells(paired_ratios(results, "mtbert", name, "tokens/s"))]
        for name in names if name.startswith("hf") and not name.endswith("-bf16")]
        + [[f"{a} / {b}", *ratio_cells(paired_ratios(results, a, b, "tokens/s"))]
           for a, b in (("mtbert-bf16", "mtbert"), ("mtbert-bf16", "hf-plan-bf16"),
                        ("hf-plan-bf16", chain_end_hf(names)))]))
    chain = [("hf", ""), ("hf-plan", "batch plan + pre-tokenization")]
    if chain_end_hf(names) == "hf-plan-adamw":
        chain.append(("hf-plan-adamw", "optimizer: mtbert's AdamW for torch's"))
    chain.append(("mtbert", "encoder: real tokens only + mtbert's kernels"))
    print("\nmtbert fp32's gain over HF as commonly run, step by step (bf16 apart, above):\n")
    print(decomposition(results, chain, "tokens/s") + "\n")
    speeds = {precision: statistics.median(r["tokens/s"] for r in results[name])
              for precision, name in (("fp32", "mtbert"), ("bf16", "mtbert-bf16"))}
    print("\n".join(gemm_limit_lines(mtbert.encoder.config,
                                     float(mtbert.split.lengths().mean()), True, speeds)))


if __name__ == "__main__":
    main()
