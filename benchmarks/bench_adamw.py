"""Step time of mtbert's AdamW vs torch.optim.AdamW(foreach=True) on MiniLM-sized parameters.

    python benchmarks/bench_adamw.py [--repeats 7] [--steps 20]

Prints the median time per step of each and the ratio ours/PyTorch (goal: <= 1.2).
"""

import argparse
import statistics
import time

import torch

from mtbert.model.bert import BertConfig, BertModel
from mtbert.optim import AdamW


def minilm_parameters() -> list[torch.Tensor]:
    config = BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                        intermediate_size=1536)
    params = [p.detach().clone().requires_grad_() for p in BertModel(config).parameters()]
    for p in params:
        p.grad = torch.randn_like(p)
    return params


def time_steps(optimizer: torch.optim.Optimizer, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        optimizer.step()
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    torch.manual_seed(0)
    kwargs = dict(lr=1e-4, weight_decay=0.01)
    ours = AdamW(minilm_parameters(), **kwargs)
    theirs = torch.optim.AdamW(minilm_parameters(), foreach=True, **kwargs)
    count = sum(p.numel() for p in ours.param_groups[0]["params"])
    time_steps(ours, 3), time_steps(theirs, 3)  # warm up: allocate state
    ours_times, theirs_times = [], []
    for _ in range(args.repeats):  # alternate so both see the same machine state
        ours_times.append(time_steps(ours, args.steps))
        theirs_times.append(time_steps(theirs, args.steps))
    ours_ms, theirs_ms = statistics.median(ours_times) * 1e3, statistics.median(theirs_times) * 1e3
    print(f"parameters: {count / 1e6:.1f} M, threads: {torch.get_num_threads()}")
    print(f"mtbert AdamW:              {ours_ms:8.2f} ms/step")
    print(f"torch AdamW (foreach):     {theirs_ms:8.2f} ms/step")
    print(f"ratio mtbert / torch:      {ours_ms / theirs_ms:8.2f}  (goal <= 1.2)")


if __name__ == "__main__":
    main()
