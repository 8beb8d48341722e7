"""Every registered model: parameters, seconds per training step and peak memory at N = 1k, 10k, 50k
instances (D = 1024), each model in a fresh process (on a CPU each configuration, so RSS peaks do not mix).

    python benchmarks/models.py [--sizes 1000 10000 50000] [--models abmil transmil ...] [--timeout S]
                                [--device cuda]

A step is forward + the model's loss + backward + AdamW update on one bag; time is the median of 3
steps after a warm-up (one step when the warm-up took over 30 s); memory is the process's peak RSS
(what the 4 GB target is about) and, in brackets, its rise over the RSS before the first step (inputs
and model already allocated). Prints a markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time


def measure(name: str, n: int, dim: int, device: str = "cpu") -> dict:
    import torch
    import torch.nn.functional as F

    from slidemil import models

    torch.manual_seed(0)
    model = models.create(name, dim, 2)
    return measure_steps(model, lambda out, y: model.loss(out, y, F.cross_entropy), n, dim, device)


def measure_steps(model, loss_fn, n: int, dim: int, device: str = "cpu") -> dict:
    """Train `model` on one random bag [1, n, dim] with label 1 (loss_fn(model(x), y)): seconds per step
    and peak memory, as the module docstring says."""
    import resource

    import torch

    from slidemil.utils.device import autocast

    dev = torch.device(device)
    model = model.train().to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x, y = torch.randn(1, n, dim, device=dev), torch.tensor([1], device=dev)
    with open("/proc/self/status") as fh:
        rss = next(int(line.split()[1]) for line in fh if line.startswith("VmRSS")) / 1024

    def step():
        opt.zero_grad(set_to_none=True)
        with autocast(dev):                                   # bf16 on a GPU, as the trainer runs
            loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        if dev.type == "cuda":
            torch.cuda.synchronize()

    t0 = time.perf_counter()
    step()
    times, repeats = [], 3 if time.perf_counter() - t0 < 30 else 1
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result = {"params": sum(p.numel() for p in model.parameters()), "seconds": statistics.median(times),
              "peak_mb": peak, "rise_mb": peak - rss}
    if dev.type == "cuda":                                    # on a GPU the memory that matters is the device's
        result.update(peak_mb=torch.cuda.max_memory_allocated() / 2**20, rise_mb=float("nan"))
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 50000])
    ap.add_argument("--models", nargs="+", default=None)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per configuration before it is cut")
    ap.add_argument("--device", default="cpu", help="cpu | cuda (bf16 autocast; memory = peak CUDA allocation)")
    ap.add_argument("--one", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        for n in args.one[1:]:        # one JSON line per size, printed as soon as it is measured
            if args.device.startswith("cuda"):
                import torch

                torch.cuda.reset_peak_memory_stats()
            print(json.dumps(measure(args.one[0], int(n), args.dim, args.device)), flush=True)
        return
    from slidemil.models import available, info

    names = args.models or available()
    print("| model | params | complexity | " + " | ".join(f"N={n:,}: s/step, peak MB (rise)" for n in args.sizes) + " |")
    print("|---|---|---|" + "---|" * len(args.sizes))
    # on a GPU one process per model measures every size (the peak is the device's, reset per size), which
    # halves the start-ups; on a CPU one process per configuration keeps the RSS peaks apart
    per_model = args.device.startswith("cuda")
    for name in names:
        groups = [args.sizes] if per_model else [[n] for n in args.sizes]
        cells, params = [], 0
        for sizes in groups:
            cmd = [sys.executable, __file__, "--one", name, *map(str, sizes), "--dim", str(args.dim),
                   "--device", args.device]
            try:
                res = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
                why = "failed: " + (res.stderr.strip().splitlines() or ["?"])[-1][:60]
                out = res.stdout
            except subprocess.TimeoutExpired as exc:
                out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
                why = f"cut after {args.timeout} s (warm-up + one step)"
            rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
            for r in rows:
                params = r["params"]
                cells.append(f"{r['seconds']:.3f} s, {r['peak_mb']:.0f} ({r['rise_mb']:.0f})")
            cells += [why] * (len(sizes) - len(rows))      # the sizes a failure or the time limit left unmeasured
        print(f"| {name} | {params / 1e6:.2f}M | {info(name).complexity} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
