"""Memory bounded by --cache-gb, not by the cohort (issue 13): a float16 cohort 4x larger than the cache
trains with the cache adding no more than its budget to the peak RSS, beside the same run with no cache
and with an unbounded one. Each setting runs in its own process; prints the peak RSS rise over the
process after its imports (the training's own working set: a float32 batch, activations, the baseline,
the plots), the cache's share of it (the rise minus the rise without a cache) and the time.

    python benchmarks/cache_budget.py [--bags 32] [--instances 20000] [--dim 512] [--out /tmp/cache_budget]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(args) -> None:
    import torch  # noqa: F401  (imports are part of the baseline, not of the cache)

    from slidemil.train.config import TrainConfig
    from slidemil.train.cv import run_cv

    base = rss_mb()
    t0 = time.perf_counter()
    cfg = TrainConfig(features=str(args.out / "features"), labels=str(args.out / "labels.csv"),
                      out=str(args.out / f"run_{args.setting}"), folds=2, epochs=2, min_epochs=1, bootstrap=10,
                      quiet=True, cache_features=args.setting != "none",
                      cache_gb={"budget": args.budget_gb, "unbounded": 1e3, "none": None}[args.setting])
    run_cv(cfg)
    print(json.dumps({"setting": args.setting, "rise_mb": rss_mb() - base, "seconds": time.perf_counter() - t0}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bags", type=int, default=32)
    ap.add_argument("--instances", type=int, default=20000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--out", type=Path, default=Path("/tmp/cache_budget"))
    ap.add_argument("--setting", default=None)
    ap.add_argument("--budget-gb", type=float, default=None)
    args = ap.parse_args()
    if args.setting:
        return child(args)
    import pandas as pd

    from slidemil.data.synthetic import make_bag
    from slidemil.features.store import write_features
    from slidemil.utils.io import write_csv

    cohort_bytes = args.bags * args.instances * args.dim * 2
    if not (args.out / "labels.csv").is_file():
        rng = np.random.default_rng(0)
        proto = rng.normal(size=(1, args.dim)) * 0.5
        rows = []
        for i in range(args.bags):
            x, _ = make_bag(rng, i % 2, proto, args.instances, 0.1)
            write_features(args.out / "features" / f"s{i}.h5", x, np.zeros((args.instances, 2), int), {"encoder": "x"},
                           dtype="float16")
            rows.append({"slide_id": f"s{i}", "case_id": f"p{i}", "label": "pos" if i % 2 else "neg"})
        write_csv(args.out / "labels.csv", pd.DataFrame(rows))
    budget_gb = cohort_bytes / 4 / 1e9
    print(f"cohort: {args.bags} bags x {args.instances} x {args.dim} float16 = {cohort_bytes / 1e6:.0f} MB; "
          f"cache budget {budget_gb * 1e3:.0f} MB (a quarter of it); one bag {args.instances * args.dim * 2 / 1e6:.0f} MB "
          f"(float16), {args.instances * args.dim * 4 / 1e6:.0f} MB as float32 in a batch")
    rises = {}
    for setting in ("none", "budget", "unbounded"):
        res = subprocess.run([sys.executable, __file__, "--out", str(args.out), "--setting", setting, "--budget-gb",
                              str(budget_gb)], capture_output=True, text=True, check=True)
        r = json.loads(res.stdout.strip().splitlines()[-1])
        rises[setting] = r["rise_mb"]
        share = r["rise_mb"] - rises["none"]
        cache = f"   cache's share (rise - rise without cache) {share:5.0f} MB" if setting != "none" else ""
        print(f"{setting:>10}: peak RSS rise {r['rise_mb']:6.0f} MB  {r['seconds']:6.1f} s (2 folds x 2 epochs){cache}")


if __name__ == "__main__":
    main()
