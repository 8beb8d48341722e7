"""Chunked scoring of very large bags (`--max-instances-infer`, issue 13): ABMIL on one bag of N instances,
whole vs chunk by chunk, each in its own process; prints the peak RSS rise of the forward pass over the
process with the bag already in memory, the time, and the largest output difference.

    python benchmarks/stream_infer.py [--instances 200000] [--dim 1024] [--chunk 16384]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(args) -> None:
    import torch

    import slidemil.models as models

    torch.manual_seed(0)
    model = models.create("abmil", args.dim, 2).eval()
    x = torch.randn(args.instances, args.dim)
    base = rss_mb()
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.forward_stream(x.split(args.chunk)) if args.mode == "chunked" else model(x[None])
    print(json.dumps({"mode": args.mode, "rise_mb": rss_mb() - base, "seconds": time.perf_counter() - t0,
                      "logits": out.logits[0].tolist()}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--instances", type=int, default=200_000)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--chunk", type=int, default=16384)
    ap.add_argument("--mode", default=None)
    args = ap.parse_args()
    if args.mode:
        return child(args)
    rows = {}
    for mode in ("whole", "chunked"):
        out = subprocess.run([sys.executable, __file__, "--mode", mode, *sys.argv[1:]], capture_output=True, text=True,
                             check=True)
        rows[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"ABMIL, one bag of {args.instances} x {args.dim} float32 ({args.instances * args.dim * 4 / 1e6:.0f} MB), "
          f"chunk {args.chunk}")
    for mode, r in rows.items():
        print(f"{mode:8s} forward peak RSS rise {r['rise_mb']:7.0f} MB  {r['seconds']:6.2f} s")
    diff = max(abs(a - b) for a, b in zip(rows["whole"]["logits"], rows["chunked"]["logits"]))
    print(f"memory ratio whole/chunked {rows['whole']['rise_mb'] / max(rows['chunked']['rise_mb'], 1):.1f}x, "
          f"largest logit difference {diff:.2e}")


if __name__ == "__main__":
    main()
