"""Training and inference tokens/s of mixture-of-experts encoders vs the dense one, side by side.

    python benchmarks/bench_moe.py [--experts 4] [--every 2] [--batch-size 32] [--repeats 5]
        [--steps 10] [--warmup 2] [--threads N] [--backbone DIR] [--data-dir DIR] [--smoke]

Three contenders load the same checkpoint (the embedded all-MiniLM-L6-v2 by default): the
dense encoder, and copies upcycled to `--experts` experts in every `--every`-th layer with
token routing, top-1 and top-2 (`mtbert.model.moe`: noisy gating, capacity factor 1.25, the
balancing and z-losses added to the loss). Each trains on the same batches of shuffled SST
train sentences (tokenized once, `bucketed_batches`, dynamic padding): forward, a linear head
on the pooled [CLS] vector, cross-entropy, backward, `mtbert.optim.AdamW` step, dropout on.
They run in one process in alternating blocks of `--steps` steps (the order flips every
repeat) after `--warmup` untimed steps each; every block of a repeat gets the same batches.
Inference: the same batches, eval mode, no autograd, timed in the same alternation.

Throughput counts real (non-pad) tokens. Ratios are medians over repeats of the paired ratio
MoE / dense. Parameters: total, and active per token (the experts a token does not reach are
left out).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from bench_train import (
    MtbertTraining,
    common_arguments,
    markdown_table,
    training_sample,
)
from torch import nn

from mtbert.auxiliary import SideOutputs, total
from mtbert.config import MoEConfig
from mtbert.data.batching import collate
from mtbert.model.moe import experts_of, upcycle
from mtbert.optim import AdamW


class Contender(MtbertTraining):
    """mtbert's training path; with `moe`, the encoder upcycled and its auxiliary losses in
    the loss."""

    def __init__(self, folder: Path, texts: list[str], labels: list, args, head: nn.Module,
                 moe: MoEConfig | None):
        super().__init__(folder, texts, labels, args, head)
        self.experts = []
        if moe is not None:
            upcycle(self.encoder, moe, ["sst"])
            self.experts = experts_of(self.encoder)
            params = [*self.encoder.parameters(), *self.head.parameters()]
            self.optimizer = AdamW(params, lr=args.lr, weight_decay=0.01)

    def step(self, rows: np.ndarray) -> tuple[int, int]:
        batch = collate(self.split, rows, self.pad_id)
        side = SideOutputs()  # the pass's auxiliary terms (the experts' balance and z-losses)
        _, pooled = self.encoder(batch.input_ids, batch.attention_mask, batch.token_type_ids,
                                 side=side)
        loss = F.cross_entropy(self.head(pooled), batch.labels.long())
        if side.auxiliary:
            loss = loss + total(side.auxiliary.values())
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return batch.real_tokens(), batch.input_ids.numel()

    @torch.no_grad()
    def infer(self, rows: np.ndarray) -> tuple[int, int]:
        batch = collate(self.split, rows, self.pad_id)
        self.encoder.eval()
        self.encoder(batch.input_ids, batch.attention_mask, batch.token_type_ids)
        self.encoder.train()
        return batch.real_tokens(), batch.input_ids.numel()

    def parameters(self) -> tuple[int, int]:
        """(total, active per token) encoder parameters."""
        total = sum(p.numel() for p in self.encoder.parameters())
        inactive = sum(p.numel() * (len(m.experts) - m.top_k) // len(m.experts)
                       for m in self.experts for p in m.experts.parameters())
        return total, total - inactive


def tokens_per_second(run, batches: list[np.ndarray]) -> float:
    real = 0
    start = time.perf_counter()
    for rows in batches:
        real += run(rows)[0]
    return real / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common_arguments(parser)
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--every", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per repeat")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--lr", type=float, default=2e-5)
    args = parser.parse_args()
    args.optimizer = "own"
    if args.smoke:
        args.batch_size, args.repeats, args.steps, args.warmup = 8, 2, 1, 1
    folder, texts, labels = training_sample(args)
    head = nn.Linear(json.loads((folder / "config.json").read_text())["hidden_size"], 5)
    configs = {"dense": None,
               "MoE top-1": MoEConfig(experts=args.experts, top_k=1, every=args.every),
               "MoE top-2": MoEConfig(experts=args.experts, top_k=2, every=args.every)}
    contenders = {name: Contender(folder, texts, labels, args, head, moe)
                  for name, moe in configs.items()}
    plan = contenders["dense"].plan(args.batch_size, args.seed)
    for contender in contenders.values():
        for rows in plan[:args.warmup]:
            contender.step(rows)
            contender.infer(rows)
    train = {name: [] for name in contenders}
    infer = {name: [] for name in contenders}
    for repeat in range(args.repeats):
        order = list(contenders) if repeat % 2 == 0 else list(contenders)[::-1]
        block = plan[args.warmup + repeat * args.steps:][:args.steps]
        for name in order:
            train[name].append(tokens_per_second(contenders[name].step, block))
        for name in order:
            infer[name].append(tokens_per_second(contenders[name].infer, block))

    def ratio(results: dict, name: str) -> float:
        return statistics.median(a / b for a, b in zip(results[name], results["dense"]))

    rows = []
    for name, contender in contenders.items():
        total, active = contender.parameters()
        rows.append([name, f"{total / 1e6:.1f} M", f"{active / 1e6:.1f} M",
                     f"{statistics.median(train[name]):.0f}", f"{ratio(train, name):.2f}x",
                     f"{statistics.median(infer[name]):.0f}", f"{ratio(infer, name):.2f}x"])
    print(f"SST train sentences, batch {args.batch_size}, {args.repeats} repeats x "
          f"{args.steps} steps after {args.warmup} warm-up steps, threads "
          f"{torch.get_num_threads()}; MoE: {args.experts} experts in every {args.every}. "
          f"layer, token routing\nbackbone: {folder}\n")
    print(markdown_table(["encoder", "parameters", "active per token", "training tokens/s",
                          "vs dense", "inference tokens/s", "vs dense"], rows))
    for name in ("MoE top-1", "MoE top-2"):
        print(f"\n{name} / dense training tokens/s per repeat: "
              + ", ".join(f"{a / b:.2f}" for a, b in zip(train[name], train["dense"])))


if __name__ == "__main__":
    main()
