"""GPU training throughput and model FLOPs utilisation of mtbert's encoder at bert-base size.

    python benchmarks/bench_gpu.py [--batch-size 32] [--seq-len 128] [--steps 30] [--warmup 10]
        [--peak-tflops 989] [--compile] [--smoke]

A randomly initialised `BertConfig()` model (bert-base: 12 layers, H=768) plus a linear head
on the pooled [CLS] vector trains on random token ids (no padding) under bf16 autocast:
forward, cross-entropy, backward, `mtbert.optim.AdamW` step. Reports tokens/s and
MFU = (6 * non-embedding parameters + 12 * layers * hidden * seq_len) FLOPs per token
* tokens/s / peak bf16 FLOP/s (`--peak-tflops`, default 989: H100 SXM dense bf16).
Exits 0 with a message when CUDA is not available.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

from mtbert.model.bert import BertConfig, BertModel
from mtbert.optim import AdamW


def flops_per_token(model: BertModel, seq_len: int) -> tuple[float, int]:
    """Training FLOPs per token (forward + backward) and the non-embedding parameter count."""
    embedding = sum(p.numel() for p in model.embeddings.parameters())
    params = model.num_parameters() - embedding
    config = model.config
    attention = 12 * config.num_hidden_layers * config.hidden_size * seq_len  # QK^T and AV
    return 6 * params + attention, params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--peak-tflops", type=float, default=989.0,
                        help="the device's dense bf16 peak (H100 SXM: 989, H200: 989, A100: 312)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the encoder")
    parser.add_argument("--smoke", action="store_true", help="3 steps after 1 warm-up step")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_gpu: CUDA is not available on this machine; nothing to measure.")
        return
    if args.smoke:
        args.steps, args.warmup = 3, 1

    device = torch.device("cuda")
    torch.manual_seed(0)
    config = BertConfig()
    encoder = BertModel(config).to(device).train()
    head = nn.Linear(config.hidden_size, 2).to(device)
    optimizer = AdamW([*encoder.parameters(), *head.parameters()], lr=1e-4, weight_decay=0.01)
    forward = torch.compile(encoder) if args.compile else encoder
    shape = (args.batch_size, args.seq_len)
    input_ids = torch.randint(1000, config.vocab_size, shape, device=device)
    attention_mask = torch.ones(shape, dtype=torch.long, device=device)
    token_type_ids = torch.zeros(shape, dtype=torch.long, device=device)
    labels = torch.randint(0, 2, (args.batch_size,), device=device)

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            _, pooled = forward(input_ids, attention_mask, token_type_ids)
            loss = F.cross_entropy(head(pooled).float(), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start

    tokens_per_s = args.batch_size * args.seq_len * args.steps / seconds
    per_token, params = flops_per_token(encoder, args.seq_len)
    achieved = per_token * tokens_per_s
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"bf16 autocast, compile: {args.compile}")
    print(f"model: bert-base shape, {encoder.num_parameters() / 1e6:.1f} M parameters "
          f"({params / 1e6:.1f} M non-embedding), batch {args.batch_size} x {args.seq_len}, "
          f"{args.steps} steps after {args.warmup} warm-up\n")
    rows = [("step time", f"{1e3 * seconds / args.steps:.1f} ms"),
            ("tokens/s", f"{tokens_per_s:,.0f}"),
            ("FLOPs per token", f"{per_token / 1e9:.3f} G"),
            ("achieved", f"{achieved / 1e12:.1f} TFLOP/s"),
            ("MFU", f"{achieved / (args.peak_tflops * 1e12):.1%} of {args.peak_tflops:g} TFLOP/s"),
            ("peak GPU memory", f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")]
    print("| quantity | value |\n|---|---|")
    print("\n".join(f"| {name} | {value} |" for name, value in rows))


if __name__ == "__main__":
    main()
