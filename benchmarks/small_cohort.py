"""The small-cohort protocol check (docs/protocol.md): every registered model with `slidemil train` defaults
on a planted-signal cohort of 36 patients, beside the run's own reference baseline (logistic regression on
mean-pooled features, same folds). Prints one row per model and seed: pooled AUROC, baseline AUROC, the
difference, epochs run and seconds.

    python benchmarks/small_cohort.py [--models abmil,transmil] [--seeds 0] [--out /tmp/small_cohort]
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import yaml

from slidemil.data.synthetic import make_feature_cohort
from slidemil.models.registry import MODELS
from slidemil.train.config import TrainConfig
from slidemil.train.cv import run_cv


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="all")
    ap.add_argument("--seeds", default="0", help="comma-separated cohort and split seeds")
    ap.add_argument("--patients", type=int, default=36)
    ap.add_argument("--out", type=Path, default=Path("/tmp/small_cohort"))
    ap.add_argument("--train", default="", help="extra TrainConfig fields as KEY=VALUE,KEY=VALUE")
    ap.add_argument("--model-args", default="", help="model arguments as KEY=VALUE,KEY=VALUE (YAML values)")
    ap.add_argument("--strategy-args", default="", help="strategy arguments as KEY=VALUE,KEY=VALUE (YAML values)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    names = MODELS.available() if args.models == "all" else args.models.split(",")
    extra = dict(kv.split("=", 1) for kv in args.train.split(",") if kv)
    for field in ("model_args", "strategy_args"):
        if getattr(args, field):
            extra[field] = {k: yaml.safe_load(v) for k, v in (kv.split("=", 1) for kv in getattr(args, field).split(","))}
    print(f"{'model':>14} {'seed':>4} {'AUROC':>6} {'base':>6} {'diff':>6} {'epochs':>7} {'s':>5}", flush=True)
    for seed in (int(s) for s in args.seeds.split(",")):
        cohort = args.out / f"cohort_{seed}"
        if not (cohort / "labels.csv").is_file():
            # 36 patients, 1-2 slides each (~54 slides), 64-d, 10% witnesses in positive slides
            make_feature_cohort(cohort, n_patients=args.patients, slides_per_patient=(1, 2), dim=64,
                                bag_size=(40, 120), witness_rate=0.1, signal=1.5, seed=100 + seed)
        for name in names:
            out = args.out / f"{name}_{seed}"
            t0 = time.perf_counter()
            if not (out / "metrics.json").is_file():
                cfg = TrainConfig(features=str(cohort / "features"), labels=str(cohort / "labels.csv"), out=str(out),
                                  model=name, seed=seed, bootstrap=200, quiet=True, **extra)
                run_cv(cfg, resume=out.exists())
            m = json.loads((out / "metrics.json").read_text())
            ours, base = m["pooled"]["auroc"]["value"], m["baseline"]["pooled"]["auroc"]["value"]
            epochs = [json.loads((out / f"fold_{k}" / "done.json").read_text())["best_epoch"] for k in m["folds"]]
            print(f"{name:>14} {seed:>4} {ours:6.3f} {base:6.3f} {ours - base:+6.3f} {min(epochs):>3}-{max(epochs):<3} "
                  f"{time.perf_counter() - t0:5.0f}", flush=True)


if __name__ == "__main__":
    main()
