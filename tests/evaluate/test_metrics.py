"""Bootstrap confidence intervals resample patients, not slides."""

from __future__ import annotations

import numpy as np

from slidemil.evaluate.metrics import bootstrap_ci


def test_bootstrap_resamples_patients():
    """Ten copies of each of four patients carry only four patients' worth of evidence: the CI must
    be as wide as for the four patients alone, not narrowed by the copies."""
    y = np.array([0, 0, 1, 1])
    probs = np.array([[0.6, 0.4], [0.3, 0.7], [0.4, 0.6], [0.2, 0.8]])
    groups = np.arange(4)
    small = bootstrap_ci(y, probs, groups, n_boot=200, seed=0)["accuracy"]
    big = bootstrap_ci(np.repeat(y, 10), np.repeat(probs, 10, 0), np.repeat(groups, 10), n_boot=200, seed=0)["accuracy"]
    assert big["ci_high"] - big["ci_low"] >= 0.8 * (small["ci_high"] - small["ci_low"])
    naive = bootstrap_ci(np.repeat(y, 10), np.repeat(probs, 10, 0), np.arange(40), n_boot=200, seed=0)["accuracy"]
    assert naive["ci_high"] - naive["ci_low"] < big["ci_high"] - big["ci_low"]
