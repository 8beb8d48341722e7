"""The multicentre study of docs/benchmarking.md, end to end on synthetic features: three centres, two
"encoders" (one whose embeddings carry a strong centre shift, one with a weak one), `slidemil robustness`,
then a leave-site-out grid of 2 encoders x 2 models x 2 seeds with `slidemil benchmark`.

    python benchmarks/multicentre.py [--out /tmp/multicentre]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import yaml

from slidemil.data.synthetic import make_feature_cohort


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("/tmp/multicentre"))
    args = ap.parse_args()
    out = args.out
    for name, shift in (("shifted", 4.0), ("robust", 0.5)):
        if not (out / name / "labels.csv").is_file():
            # 48 patients over 3 centres, 32-d, 15% witnesses; the same patients and labels for both encoders
            make_feature_cohort(out / name, n_patients=48, dim=32, bag_size=(40, 100), witness_rate=0.15,
                                signal=2.0, seed=7, n_sites=3, centre_shift=shift)
    slidemil = [sys.executable, "-m", "slidemil"]
    t0 = time.perf_counter()
    subprocess.run(slidemil + ["robustness", "--features", f"shifted={out / 'shifted' / 'features'}", "--features",
                               f"robust={out / 'robust' / 'features'}", "--labels", str(out / "robust" / "labels.csv"),
                               "--out", str(out / "robustness")], check=True)
    print(f"robustness: {time.perf_counter() - t0:.0f} s")
    grid = {"labels": str(out / "robust" / "labels.csv"), "task": "classification",
            "features": {"shifted": str(out / "shifted" / "features"), "robust": str(out / "robust" / "features")},
            "models": ["abmil", "mean_pool"], "seeds": [0, 1], "cv": "leave-site-out", "site_col": "site",
            "bootstrap": 500, "train": {"epochs": 20}}
    (out / "grid.yaml").write_text(yaml.safe_dump(grid))
    t0 = time.perf_counter()
    subprocess.run(slidemil + ["benchmark", str(out / "grid.yaml"), "--out", str(out / "grid")], check=True)
    print(f"benchmark: {time.perf_counter() - t0:.0f} s")
    board = pd.read_csv(out / "grid" / "leaderboard.csv")
    auroc = board[board["metric"] == "auroc"]
    print(auroc.pivot_table(index=["encoder", "model", "seed"], columns="cohort", values="value").round(3).to_string())
    print(auroc[auroc["cohort"] == "cv"][["encoder", "model", "seed", "seconds", "peak_mb"]].to_string(index=False))
    print(pd.read_csv(out / "grid" / "comparisons.csv").round(3).to_string(index=False))
    print(pd.read_csv(out / "grid" / "ranking.csv").round(3).to_string(index=False))


if __name__ == "__main__":
    main()
