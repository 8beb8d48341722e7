"""Bootstrap confidence intervals resample patients, not slides."""

from __future__ import annotations

import numpy as np
import pytest

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


def test_delong_matches_the_pairwise_definition_and_paired_bootstrap_sees_a_real_gap():
    from sklearn.metrics import roc_auc_score

    from slidemil.evaluate.compare import average_ranks, delong, nemenyi_cd, paired_bootstrap

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    a, b = y + rng.normal(0, 1, 200), y + rng.normal(0, 1.5, 200)
    res = delong(y, a, b)
    assert res["auc_a"] == pytest.approx(roc_auc_score(y, a)) and res["auc_b"] == pytest.approx(roc_auc_score(y, b))
    # the O(mn) structural components of DeLong et al. 1988
    psi = [(s[y == 1][:, None] > s[y == 0][None]) + 0.5 * (s[y == 1][:, None] == s[y == 0][None]) for s in (a, b)]
    v10, v01 = np.stack([p.mean(1) for p in psi]), np.stack([p.mean(0) for p in psi])
    cov = np.cov(v10) / v10.shape[1] + np.cov(v01) / v01.shape[1]
    z = (v10[0].mean() - v10[1].mean()) / np.sqrt(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
    assert res["z"] == pytest.approx(z)
    groups = np.arange(200)
    strong = paired_bootstrap(lambda i: roc_auc_score(y[i], y[i] + 0.3 * a[i]), lambda i: roc_auc_score(y[i], b[i]),
                              groups, 300)
    same = paired_bootstrap(lambda i: roc_auc_score(y[i], a[i]), lambda i: roc_auc_score(y[i], a[i]), groups, 300)
    assert strong["ci_low"] > 0 and strong["p"] < 0.01 and 0 < strong["p"]
    assert same["diff"] == 0 and same["p"] == 1.0
    assert nemenyi_cd(4, 10) == pytest.approx(2.569 * np.sqrt(20 / 60), abs=1e-3)    # Demsar 2006, table 5
    assert list(average_ranks(np.array([[0.9, 0.8, 0.7], [0.6, 0.9, np.nan]]))) == [1.5, 1.5, 3.0]


def test_numpy_metrics_equal_scikit_learns_on_random_samples_with_ties_and_missing_classes():
    """classification_metrics computes in numpy what scikit-learn computes (a bootstrap calls it 1000 times
    per run, and scikit-learn's input checks made that 7 s); the two must agree on every kind of sample."""
    import warnings

    from sklearn.metrics import (
        accuracy_score,
        average_precision_score,
        balanced_accuracy_score,
        f1_score,
        roc_auc_score,
    )

    from slidemil.evaluate.metrics import classification_metrics

    rng = np.random.default_rng(0)
    checked = 0
    for trial in range(300):
        c = [2, 3, 4][trial % 3]
        n = int(rng.integers(2, 40))
        y = rng.integers(0, c, n)
        if trial % 7 == 0:
            y[:] = y[0]                                   # one class only: AUROC/AUPRC undefined
        probs = rng.dirichlet(np.ones(c), n)
        if trial % 2:
            probs = np.round(probs, 1)                    # ties in scores and in the argmax
        ours = classification_metrics(y, probs)
        pred = probs.argmax(1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref = {"accuracy": accuracy_score(y, pred), "balanced_accuracy": balanced_accuracy_score(y, pred),
                   "macro_f1": f1_score(y, pred, average="macro", labels=list(range(c)), zero_division=0)}
        if len(np.unique(y)) < 2:
            ref["auroc"] = ref["auprc"] = np.nan
        elif c == 2:
            ref["auroc"], ref["auprc"] = roc_auc_score(y, probs[:, 1]), average_precision_score(y, probs[:, 1])
        else:
            cols = [k for k in range(c) if 0 < (y == k).sum() < n]
            ref["auroc"] = np.mean([roc_auc_score(y == k, probs[:, k]) for k in cols])
            ref["auprc"] = np.mean([average_precision_score(y == k, probs[:, k]) for k in cols])
        for name, value in ref.items():
            np.testing.assert_allclose(ours[name], value, rtol=1e-12, atol=1e-12, err_msg=f"{name}, trial {trial}")
            checked += 1
    assert checked == 1500


def test_bootstrap_ci_is_the_95_percent_interval_and_paired_p_is_two_sided():
    """The mean of 400 standard normal draws: its bootstrap 95% CI is +-1.96 standard errors (a 90% one,
    the 5th-95th percentiles, would be +-1.645) and a difference 2 standard errors from 0 has a two-sided
    p of ~0.046 (one-sided ~0.023)."""
    from scipy import stats

    from slidemil.evaluate.bootstrap import patient_bootstrap
    from slidemil.evaluate.compare import paired_bootstrap

    rng = np.random.default_rng(0)
    x = rng.normal(size=400)
    se = x.std() / np.sqrt(len(x))
    ci = patient_bootstrap(lambda i: {"mean": x[i].mean()}, np.arange(400), n_boot=4000, seed=1)["mean"]
    assert (ci["ci_high"] - ci["ci_low"]) / (2 * 1.96 * se) == pytest.approx(1.0, abs=0.06)
    shifted = x - x.mean() + 2 * se                        # a mean exactly 2 standard errors above 0
    res = paired_bootstrap(lambda i: shifted[i].mean(), lambda i: 0.0, np.arange(400), n_boot=4000, seed=1)
    assert res["p"] == pytest.approx(2 * stats.norm.sf(2), abs=0.015)


def test_ordinal_kappa_is_quadratically_weighted():
    """Cohen's kappa with weights (i - j)^2 / (K - 1)^2 (the grading literature's QWK), computed here from
    its definition: observed against expected (outer product of the marginals) weighted disagreement."""
    from slidemil.evaluate.regression import ordinal_metrics

    y, pred, k = np.array([0, 0, 1, 1, 2, 2, 3, 3, 3]), np.array([0, 1, 1, 3, 2, 0, 3, 2, 3]), 4
    observed = np.zeros((k, k))
    np.add.at(observed, (y, pred), 1)
    expected = np.outer(observed.sum(1), observed.sum(0)) / observed.sum()
    w = (np.subtract.outer(np.arange(k), np.arange(k)) ** 2) / (k - 1) ** 2
    qwk = 1 - (w * observed).sum() / (w * expected).sum()
    got = ordinal_metrics(y, pred, k)
    assert got["qwk"] == pytest.approx(qwk, abs=1e-12) and got["mae"] == pytest.approx(np.abs(y - pred).mean())
