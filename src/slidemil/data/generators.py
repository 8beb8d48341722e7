"""Cohort generators the per-model defaults were *not* chosen on: the check that defaults transfer.

`synthetic.make_feature_cohort` (isotropic noise, witnesses at a prototype) is where slidemil's defaults
were measured. These families differ from it in what real foundation-model features and real signals
look like, each with its own knob, so a default that only fits the home generator shows here:

- background features with a non-zero mean and an anisotropic covariance (a few strong directions, as
  encoder features have), never standardised by the generator;
- `witness`: a small fraction of a positive bag's instances moved towards a prototype;
- `phenotype`: *every* instance of a positive bag moved a little (a diffuse shift, no witnesses);
- `cluster`: the witnesses are a contiguous disc of the slide's grid (a tumour region), with the
  spatial neighbours of the disc partly shifted too;
- class balance, feature dimension and bag size set per cohort.

`make_survival_cohort` plants a hazard that depends on the witnesses' position along a grade direction,
and returns the oracle C-index (Harrell's C of the true linear predictor), the ceiling a model can reach.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from slidemil.features.store import write_features
from slidemil.utils.io import write_csv

SIGNALS = ("witness", "phenotype", "cluster")


def _background(rng, dim: int, anisotropy: float = 1.5):
    """(mean, factor) of an anisotropic background: x = mean + z @ factor, z ~ N(0, I); `anisotropy` scales
    four strong shared directions (0: isotropic noise around a non-zero mean)."""
    mean = rng.normal(0, 1.0, dim)
    strong = rng.normal(size=(4, dim)) * anisotropy           # four strong directions
    factor = np.concatenate([strong, np.eye(dim) * 0.8])      # [4 + dim, dim]
    return mean, factor


def _bag(rng, n, mean, factor, positive, direction, signal_type, rate, shift):
    z = rng.normal(size=(n, factor.shape[0]))
    x = (mean + z @ factor).astype(np.float32)
    side = int(np.ceil(np.sqrt(n)))
    grid = np.stack([np.arange(n) % side, np.arange(n) // side], 1)
    inst = np.zeros(n, np.int64)
    if positive:
        if signal_type == "witness":
            idx = rng.choice(n, max(1, int(round(rate * n))), replace=False)
            x[idx] += shift * direction
            inst[idx] = 1
        elif signal_type == "phenotype":
            x += (shift * rate) * direction             # every instance, a fraction of the witness shift
            inst[:] = 1
        elif signal_type == "cluster":
            centre = grid[rng.integers(n)]
            dist = np.linalg.norm(grid - centre, axis=1)
            radius = np.sqrt(rate * n / np.pi)
            core = dist <= radius
            x[core] += shift * direction
            rim = (dist > radius) & (dist <= radius + 1.5)
            x[rim] += 0.5 * shift * direction
            inst[core] = 1
        else:
            raise ValueError(f"signal_type must be one of {', '.join(SIGNALS)}, not {signal_type!r}")
    return x, grid * 256, inst


def make_unseen_cohort(out: str | Path, signal_type: str = "witness", n_patients: int = 48, dim: int = 128,
                       bag_size: tuple[int, int] = (100, 300), rate: float = 0.05, shift: float = 3.0,
                       positive_fraction: float = 0.5, slides_per_patient: tuple[int, int] = (1, 1),
                       anisotropy: float = 1.5, seed: int = 0) -> pd.DataFrame:
    """Write `<out>/features/*.h5` and `<out>/labels.csv` (negative/positive); return the label table.
    `shift` is in units of the background's per-dimension noise along a unit direction times sqrt(dim)/4."""
    out = Path(out)
    rng = np.random.default_rng(seed)
    mean, factor = _background(rng, dim, anisotropy)
    direction = rng.normal(size=dim)
    direction *= np.sqrt(dim) / 4 / np.linalg.norm(direction)
    n_pos = int(round(positive_fraction * n_patients))
    labels = rng.permutation(np.r_[np.ones(n_pos, int), np.zeros(n_patients - n_pos, int)])
    rows = []
    for p, label in enumerate(labels):
        for s in range(rng.integers(slides_per_patient[0], slides_per_patient[1] + 1)):
            sid = f"U{p:03d}_S{s}"
            n = int(rng.integers(bag_size[0], bag_size[1] + 1))
            x, coords, inst = _bag(rng, n, mean, factor, bool(label), direction, signal_type, rate, shift)
            write_features(out / "features" / f"{sid}.h5", x, coords,
                           {"encoder": "unseen", "patch_size": 256, "patch_size_level0": 256},
                           extra={"instance_labels": inst})
            rows.append({"slide_id": sid, "case_id": f"U{p:03d}", "label": "positive" if label else "negative"})
    table = pd.DataFrame(rows)
    write_csv(out / "labels.csv", table)
    return table


def make_survival_cohort(out: str | Path, n_patients: int = 120, dim: int = 64, bag_size: tuple[int, int] = (60, 160),
                         rate: float = 0.1, shift: float = 3.0, strength: float = 1.6, censoring: float = 0.3,
                         seed: int = 0) -> tuple[pd.DataFrame, float]:
    """A survival cohort: every bag holds witnesses (a fraction `rate`) at prototype + g * grade, with the
    patient's latent g ~ N(0, 1); hazard exp(strength * g) (exponential times), uniform censoring of about
    `censoring`. Returns (label table with time, event and the planted g, oracle Harrell's C)."""
    from slidemil.evaluate.survival import harrell_c

    out = Path(out)
    rng = np.random.default_rng(seed)
    mean, factor = _background(rng, dim)
    proto, grade = (v * np.sqrt(dim) / 4 / np.linalg.norm(v) for v in rng.normal(size=(2, dim)))
    g = rng.normal(size=n_patients)
    event_time = rng.exponential(np.exp(-strength * g)) * 100
    censor = rng.uniform(0, np.quantile(event_time, 1 - censoring) * 2, n_patients)
    time = np.minimum(event_time, censor) + 0.01
    event = (event_time <= censor).astype(int)
    rows = []
    for p in range(n_patients):
        sid = f"V{p:03d}_S0"
        n = int(rng.integers(bag_size[0], bag_size[1] + 1))
        z = rng.normal(size=(n, factor.shape[0]))
        x = (mean + z @ factor).astype(np.float32)
        idx = rng.choice(n, max(1, int(round(rate * n))), replace=False)
        x[idx] += shift * proto + g[p] * grade
        inst = np.zeros(n, np.int64)
        inst[idx] = 1
        side = int(np.ceil(np.sqrt(n)))
        coords = np.stack([np.arange(n) % side, np.arange(n) // side], 1) * 256
        write_features(out / "features" / f"{sid}.h5", x, coords,
                       {"encoder": "unseen", "patch_size": 256, "patch_size_level0": 256},
                       extra={"instance_labels": inst})
        rows.append({"slide_id": sid, "case_id": f"V{p:03d}", "time": round(float(time[p]), 3),
                     "event": int(event[p]), "g": float(g[p])})
    table = pd.DataFrame(rows)
    write_csv(out / "labels.csv", table)
    return table, harrell_c(table["time"], table["event"], table["g"])
