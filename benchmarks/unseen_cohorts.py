"""Do slidemil's per-model defaults hold on cohorts they were not chosen on? (docs/protocol.md)

Every model at `slidemil train` defaults (3 folds) on the cohort families of `slidemil.data.generators`
(anisotropic, non-centred background; witnesses, a diffuse phenotype shift, a spatial cluster, an
imbalanced cohort with several slides per patient), beside the same run's baseline (a tuned logistic
regression on mean-pooled features, same folds). Survival: abmil at defaults on a 120-patient cohort
with a known oracle C. Runs go two at a time, one thread each.

    python benchmarks/unseen_cohorts.py [--models abmil,clam_sb] [--cohorts witness,cluster] [--seed 0]
        [--train KEY=VALUE,...] [--out /tmp/unseen] [--survival]
    python benchmarks/unseen_cohorts.py --summary /tmp/unseen/unseen_s0.csv /tmp/unseen/unseen_s1.csv ...

`--summary` reads the tables of several seeds (one settings each) and prints, per model and family, the
mean difference to the same-run baseline and in how many seeds the model holds (within 0.05 of it).
With `--ceiling` the tables are one seed's runs at several settings, and it prints the best difference
over them: chosen on the test folds, so not a result but a bound: if even it misses the baseline, no
setting in the grid reaches it and the default is not what holds the model back.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pandas as pd
import yaml

COHORTS = {
    "witness": dict(signal_type="witness", dim=128, bag_size=(100, 300), rate=0.05, shift=1.6),
    "phenotype": dict(signal_type="phenotype", dim=128, bag_size=(50, 150), rate=0.25, shift=0.45),
    "cluster": dict(signal_type="cluster", dim=64, bag_size=(150, 400), rate=0.06, shift=0.9),
    "imbalanced": dict(signal_type="witness", dim=256, bag_size=(60, 200), rate=0.1, shift=0.75,
                       positive_fraction=0.3, slides_per_patient=(1, 2)),
}
SKIP = {"otsurv"}            # survival only


def _one(job: dict) -> dict:
    import torch

    torch.set_num_threads(1)
    from slidemil.train.config import TrainConfig
    from slidemil.train.cv import run_cv

    t0 = time.perf_counter()
    cfg = TrainConfig(features=job["features"], labels=job["labels"], out=job["out"], model=job["model"], folds=3,
                      bootstrap=200, quiet=True, seed=job["seed"], **job["train"])
    try:
        run_cv(cfg)
    except Exception as exc:                 # a failed cell is a row, not the end of the table
        return {**job, "error": f"{type(exc).__name__}: {exc}"[:200]}
    metrics = json.loads((Path(job["out"]) / "metrics.json").read_text())
    head = "c_index" if job.get("task") == "survival" else "auroc"
    return {**job, "value": metrics["pooled"][head]["value"], "baseline": metrics["baseline"]["pooled"][head]["value"],
            "seconds": time.perf_counter() - t0}


HOLDS = 0.05         # the goal: within this of the same-fold baseline


def summarize(paths: list[Path]) -> pd.DataFrame:
    """Per model and family over the seeds' tables: mean and best difference to the baseline, holds/seeds."""
    table = pd.concat([pd.read_csv(p) for p in paths], ignore_index=True).dropna(subset=["value"])
    table["diff"] = table["value"] - table["baseline"]
    cells = table.groupby(["model", "cohort"])["diff"]
    out = pd.DataFrame({"mean": cells.mean(), "best": cells.max(),
                        "holds": cells.apply(lambda d: int((d >= -HOLDS).sum())), "seeds": cells.size()})
    return out.reset_index()


def main() -> None:
    from slidemil.data.generators import make_survival_cohort, make_unseen_cohort
    from slidemil.models import available

    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="all")
    ap.add_argument("--cohorts", default=",".join(COHORTS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--patients", type=int, default=48)
    ap.add_argument("--train", default="", help="extra TrainConfig fields as KEY=VALUE,KEY=VALUE (YAML values)")
    ap.add_argument("--out", type=Path, default=Path("/tmp/unseen"))
    ap.add_argument("--survival", action="store_true", help="also abmil on the survival cohort")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--summary", type=Path, nargs="+", help="summarise these tables (one per seed) and stop")
    ap.add_argument("--ceiling", action="store_true", help="with --summary: the best difference over the tables")
    args = ap.parse_args()
    if args.summary:
        cells = summarize(args.summary)
        cells["cell"] = cells.apply(lambda r: f"{r['best']:+.3f}" if args.ceiling else
                                    f"{r['mean']:+.3f} ({r['holds']}/{r['seeds']})", axis=1)
        print(cells.pivot(index="model", columns="cohort", values="cell").to_string())
        if not args.ceiling:
            majority = int((cells["holds"] * 2 > cells["seeds"]).sum())
            every = int((cells["holds"] == cells["seeds"]).sum())
            print(f"{majority} of {len(cells)} cells hold in most seeds, {every} in every seed")
        return
    train = {k: yaml.safe_load(v) for k, v in (kv.split("=", 1) for kv in args.train.split(",") if kv)}
    names = [m for m in available() if m not in SKIP] if args.models == "all" else args.models.split(",")
    tag = "_".join(f"{k}{v}" for k, v in train.items())
    suffix = f"_{tag}" if tag else ""
    jobs = []
    for cohort in filter(None, args.cohorts.split(",")):   # --cohorts "" --survival: survival only
        root = args.out / f"{cohort}_s{args.seed}"
        if not (root / "labels.csv").is_file():
            make_unseen_cohort(root, n_patients=args.patients, seed=args.seed, **COHORTS[cohort])
        for model in names:
            jobs.append({"cohort": cohort, "model": model, "seed": args.seed, "train": train,
                         "features": str(root / "features"), "labels": str(root / "labels.csv"),
                         "out": str(args.out / "runs" / f"{cohort}_s{args.seed}_{model}{suffix}")})
    if args.survival:
        root = args.out / f"survival_s{args.seed}"
        table, oracle = make_survival_cohort(root, seed=args.seed) if not (root / "labels.csv").is_file() else \
            (None, json.loads((root / "oracle.json").read_text())["c_index"])
        (root / "oracle.json").write_text(json.dumps({"c_index": oracle}))
        print(f"survival cohort: oracle Harrell C {oracle:.3f}")
        jobs.append({"cohort": "survival", "model": "abmil", "seed": args.seed, "task": "survival",
                     "train": {"task": "survival", **train}, "features": str(root / "features"),
                     "labels": str(root / "labels.csv"), "out": str(args.out / "runs" / f"survival_s{args.seed}_abmil{suffix}")})
    os.environ["OMP_NUM_THREADS"] = "1"
    rows = []
    with ProcessPoolExecutor(args.workers) as pool:
        for row in pool.map(_one, jobs):
            rows.append(row)
            shown = f"{row['value']:.3f} vs baseline {row['baseline']:.3f} ({row['seconds']:.0f} s)" if "value" in row \
                else row["error"]
            print(f"{row['cohort']:>11} {row['model']:>14}: {shown}", flush=True)
    table = pd.DataFrame(rows)
    path = args.out / f"unseen_s{args.seed}{suffix}.csv"
    if path.is_file():      # runs of other models with the same settings stay; a rerun cell replaces its row
        table = pd.concat([pd.read_csv(path), table]).drop_duplicates(["cohort", "model"], keep="last")
    table.to_csv(path, index=False)
    if "value" in table:
        table["diff"] = table["value"] - table["baseline"]
        print(table.pivot_table(index="model", columns="cohort", values="diff").round(3).to_string())


if __name__ == "__main__":
    main()
