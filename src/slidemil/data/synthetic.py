"""Synthetic feature cohorts with planted positive instances, for tests, the demo and benchmarks.

Each instance is x = mu_concept + noise. A bag of class c > 0 holds a fraction `witness_rate` of
instances drawn around class c's prototype; everything else is background. Known instance labels are
stored in each h5 as `instance_labels`, so tests can check where a model puts its attention.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from slidemil.features.store import write_features
from slidemil.utils.io import write_csv


def make_bag(rng: np.random.Generator, label: int, prototypes: np.ndarray, n: int, witness_rate: float,
             noise: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """(features [n, D] float32, instance labels [n]) for one bag of class `label` (0 = negative)."""
    d = prototypes.shape[1]
    x = rng.normal(0.0, noise, size=(n, d)).astype(np.float32)
    inst = np.zeros(n, dtype=np.int64)
    if label > 0:
        k = max(1, int(round(witness_rate * n)))
        idx = rng.choice(n, k, replace=False)
        x[idx] += prototypes[label - 1]
        inst[idx] = label
    return x, inst


def make_feature_cohort(
    out: str | Path,
    n_patients: int = 40,
    slides_per_patient: tuple[int, int] = (1, 2),
    n_classes: int = 2,
    dim: int = 64,
    bag_size: tuple[int, int] = (40, 120),
    witness_rate: float = 0.1,
    signal: float = 1.5,
    seed: int = 0,
    encoder: str = "synthetic",
) -> pd.DataFrame:
    """Write `<out>/features/<slide_id>.h5` and `<out>/labels.csv`; return the label table.

    Patients are assigned classes in turn, so classes are balanced; a patient's slides share its label.
    Coordinates form a raster grid so spatial models and heatmaps have something to work with.
    """
    out = Path(out)
    rng = np.random.default_rng(seed)
    directions = rng.normal(size=(n_classes - 1, dim))
    prototypes = signal * directions / np.linalg.norm(directions, axis=1, keepdims=True) * np.sqrt(dim) / 4
    rows = []
    for p in range(n_patients):
        label = p % n_classes
        for s in range(rng.integers(slides_per_patient[0], slides_per_patient[1] + 1)):
            sid = f"P{p:03d}_S{s}"
            n = int(rng.integers(bag_size[0], bag_size[1] + 1))
            x, inst = make_bag(rng, label, prototypes, n, witness_rate)
            side = int(np.ceil(np.sqrt(n)))
            coords = np.stack([np.arange(n) % side, np.arange(n) // side], 1) * 256
            write_features(out / "features" / f"{sid}.h5", x, coords,
                           {"encoder": encoder, "patch_size": 256, "patch_size_level0": 256},
                           extra={"instance_labels": inst})
            rows.append({"slide_id": sid, "case_id": f"P{p:03d}", "label": f"class{label}" if n_classes > 2
                         else ("positive" if label else "negative")})
    table = pd.DataFrame(rows)
    write_csv(out / "labels.csv", table)
    return table
