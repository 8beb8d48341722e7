"""What the default input transform costs per training step: ABMIL's step (forward, loss, backward, AdamW)
on one bag with the bag standardised per dimension (`--standardize auto|on`) and with the shrunk whitening
(`shrunk`, the default: one D x D product per instance), side by side in one run.

    python benchmarks/standardize_cost.py [--sizes 1000 10000] [--dim 1024] [--repeats 5]

Prints a markdown table (ratio = shrunk step / per-dimension step); docs/protocol.md quotes it.
"""

from __future__ import annotations

import argparse
import platform

import torch
import torch.nn.functional as F

from slidemil import models
from slidemil.models.standardize import Scaling
from train_speed import timed  # benchmarks/ is on the path when this script runs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000])
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.manual_seed(0)
    strong = torch.randn(8, args.dim) * 2
    bags = [torch.randn(2000, args.dim) + torch.randn(2000, 8) @ strong for _ in range(8)]
    fitted = Scaling.fit(bags, covariance=True, n_bags=len(bags))
    transforms = {"per dimension": fitted, "shrunk (default)": fitted.shrunk()}
    model = models.create("abmil", in_dim=args.dim, n_outputs=2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    y = torch.tensor([1])
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"D {args.dim}\n")
    print("| instances | per-dimension step (s) | shrunk step (s) | ratio |\n|---|---|---|---|")
    for n in args.sizes:
        raw = torch.randn(n, args.dim) + torch.randn(n, 8) @ strong
        times = {}
        for name, transform in transforms.items():
            def step():
                out = model(transform(raw)[None])
                loss = model.loss(out, y, F.cross_entropy)
                opt.zero_grad()
                loss.backward()
                opt.step()
            times[name] = timed(step, args.repeats)
        a, b = times["per dimension"], times["shrunk (default)"]
        print(f"| {n} | {a:.4f} | {b:.4f} | {b / a:.2f} |")


if __name__ == "__main__":
    main()
