"""Training speed of ABMIL and TransMIL on synthetic bags (D = 1024), measured side by side with the
compute floor of the same run: the torch matmul rate and the bag's first linear layer forward + backward.

    python benchmarks/train_speed.py [--sizes 1000 10000 50000] [--repeats 5] [--models abmil transmil]

Prints a markdown table; paste it into docs/benchmarks.md. One "step" is one bag through forward,
the model's loss, backward and an AdamW update, as the trainer does it (batch size 1).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from slidemil import models


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def matmul_gflops(n: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    return 2 * n**3 / timed(lambda: a @ b, repeats) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 50000])
    ap.add_argument("--models", nargs="+", default=["abmil", "transmil"])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dim", type=int, default=1024)
    args = ap.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    print(f"matmul rate (2048^3 fp32): {matmul_gflops():.0f} GFLOP/s\n")
    print("| model | N | s / step | s / epoch of 100 bags | floor: first linear fwd+bwd (s) | step / floor |")
    print("|---|---|---|---|---|---|")
    target = torch.tensor([1])
    for n in args.sizes:
        x = torch.randn(1, n, args.dim)
        first = torch.nn.Linear(args.dim, 512)

        def floor():
            first.zero_grad()
            first(x).sum().backward()

        t_floor = timed(floor, args.repeats)
        for name in args.models:
            model = models.create(name, args.dim, 2).train()
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

            def step():
                opt.zero_grad(set_to_none=True)
                out = model(x)
                model.loss(out, target, F.cross_entropy).backward()
                opt.step()

            reps = args.repeats if name != "transmil" or n <= 10000 else max(1, args.repeats // 2)
            t = timed(step, reps)
            print(f"| {name} | {n:,} | {t:.4f} | {100 * t:.1f} | {t_floor:.4f} | {t / t_floor:.2f} |", flush=True)


if __name__ == "__main__":
    main()
