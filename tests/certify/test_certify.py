"""Algorithmic unit tests (Raff & Holt 2023): generators, verdicts, and which models pass."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from slidemil.certify.generators import false_frequency, single_concept, threshold_poison
from slidemil.certify.run import CertifySettings, certify, combine, seed_verdict
from slidemil.cli import app

# 8 epochs: instance_max pools by the mean for its first 5 training epochs and needs a few by the max after
# them (at 6 epochs it reached train / test AUROC 0.91 / 0.89, at 8 0.97 / 0.98; without the warm-up 0.99 / 0.98)
FAST = CertifySettings(n_train=300, n_test=200, epochs=8, seeds=1)


def _kinds(bag):
    """Label each instance by the concept it was drawn from (means are far apart at sd 0.1)."""
    m = bag.mean(1)
    sd = bag.std(1)
    return np.where((sd < 0.5) & (np.abs(m + 10) < 1), "poison",
                    np.where((sd < 0.5) & (np.abs(m - 2) < 0.5), "A2",
                             np.where((sd < 0.5) & (np.abs(m - 3) < 0.5), "B3",
                                      np.where((sd < 0.5) & (np.abs(m + 2) < 0.5), "A-2", "other"))))


def test_single_concept_distribution():
    t = single_concept(n_train=400, n_test=400, seed=0)
    assert t.train_y.sum() == 200 and t.test_y.sum() == 200
    for bags, ys, train in ((t.train_bags, t.train_y, True), (t.test_bags, t.test_y, False)):
        for bag, y in zip(bags, ys):
            n_poison = (_kinds(bag) == "poison").sum()
            assert n_poison == (1 if (y == 0) == train else 0)
            assert bag.shape[1] == 16
            lo, hi = {(True, 0): (2, 10), (True, 1): (2, 7), (False, 0): (1, 9), (False, 1): (3, 8)}[(train, int(y))]
            assert lo <= len(bag) <= hi
    poison = np.concatenate([b[_kinds(b) == "poison"] for b in t.train_bags])
    assert abs(poison.mean() + 10) < 0.02 and abs(poison.std() - 0.1) < 0.01
    negatives = np.concatenate([b[_kinds(b) == "other"] for b, y in zip(t.test_bags, t.test_y) if y == 0])
    assert abs(negatives.mean()) < 0.05 and abs(negatives.std() - 1) < 0.05
    positives = np.concatenate([b[_kinds(b) == "other"] for b, y in zip(t.test_bags, t.test_y) if y == 1])
    assert positives.std() > 1.5  # the N(0, 3^2) instances widen positive bags


def test_threshold_poison_distribution():
    t = threshold_poison(n_train=600, n_test=200, seed=1)
    poisoned_pos = []
    for bag, y in zip(t.train_bags, t.train_y):
        k = _kinds(bag)
        a, b = (k == "A2").sum(), (k == "B3").sum()
        if y:
            assert 1 <= a <= 4 and 1 <= b <= 4
            poisoned_pos.append((k == "poison").sum())
        else:
            assert a + b == 1 and (k == "poison").sum() == 1
    assert 0.05 < np.mean(poisoned_pos) < 0.16  # poison in 1 of 10 training positives
    for bag, y in zip(t.test_bags, t.test_y):
        assert (_kinds(bag) == "poison").sum() == (1 if y else 0)


def test_false_frequency_distribution():
    t = false_frequency(n_train=200, n_test=200, seed=2)
    for bag, y in zip(t.train_bags, t.train_y):
        k = _kinds(bag)
        assert ((k == "A-2").sum(), (k == "A2").sum()) in ([(1, 1)] if y else [(1, 0), (0, 1)])
    for bag, y in zip(t.test_bags, t.test_y):
        k = _kinds(bag)
        copies = max((k == "A-2").sum(), (k == "A2").sum())
        assert (copies == 1) if y else (35 <= copies <= 39 and min((k == "A-2").sum(), (k == "A2").sum()) == 0)
    a = np.concatenate([b[_kinds(b) == "A-2"] for b in t.test_bags])
    assert abs(a.mean() + 2) < 0.01 and abs(a.std() - 0.1) < 0.01


def test_generators_are_seeded_and_min_size_fills():
    a, b = single_concept(100, 50, seed=3), single_concept(100, 50, seed=3)
    assert all(np.array_equal(x, y) for x, y in zip(a.train_bags, b.train_bags))
    filled = threshold_poison(100, 50, seed=0, min_size=45)
    assert all(len(x) == 45 for x in filled.train_bags + filled.test_bags)


def test_verdict_logic():
    assert [seed_verdict(v) for v in (0.95, 0.9, 0.89, 0.51, 0.5, 0.02)] == ["PASS", "PASS", "WEAK", "WEAK", "FAIL", "FAIL"]
    assert combine(["PASS", "PASS"]) == "PASS" and combine(["FAIL", "FAIL"]) == "FAIL"
    assert combine(["PASS", "FAIL"]) == "SEED-DEPENDENT" and combine(["PASS", "WEAK", "FAIL"]) == "SEED-DEPENDENT"
    assert combine(["PASS", "WEAK"]) == "WEAK" and combine(["WEAK", "FAIL"]) == "WEAK"


def test_standardisation_uses_the_training_instances_only():
    """The notebook's protocol: mean and std of the training instances, applied to both splits. Test bags
    shifted by +50 must come out shifted (a fit that includes them would pull them toward zero)."""
    from slidemil.certify.run import standardise

    rng = np.random.default_rng(0)
    train = [rng.normal(2.0, 3.0, (int(rng.integers(5, 15)), 4)) for _ in range(40)]
    test = [rng.normal(52.0, 3.0, (10, 4)) for _ in range(40)]
    train_z, test_z = standardise(train, test)
    inst = np.concatenate(train_z)
    np.testing.assert_allclose(inst.mean(0), 0.0, atol=1e-9)
    np.testing.assert_allclose(inst.std(0), 1.0, atol=1e-5)
    raw = np.concatenate(train)
    np.testing.assert_allclose(test_z[0], (test[0] - raw.mean(0)) / (raw.std(0) + 1e-6))
    assert np.concatenate(test_z).mean() > 10


@pytest.mark.slow
@pytest.mark.parametrize("model,verdict", [("instance_max", "PASS"), ("evidence_attn", "PASS"), ("mean_pool", "FAIL")])
def test_single_concept_poison_verdicts(model, verdict):
    _, summary = certify([(model, {})], ["single_concept"], FAST)
    row = summary.iloc[0]
    assert row.train_auroc >= 0.9, "the model must fit the training bags either way"
    assert row.verdict == verdict, summary


@pytest.mark.slow
def test_standard_variant_is_solved_by_attention():
    """Sanity: without the poison shift, ABMIL (which fails the poisoned test) solves the task."""
    s = CertifySettings(n_train=300, n_test=200, epochs=6, seeds=1, poisoned=False)
    _, summary = certify([("abmil", {})], ["single_concept"], s)
    assert summary.iloc[0].verdict == "PASS"


@pytest.mark.slow
def test_cli_certify_json_and_model_config(tmp_path):
    cfg = tmp_path / "m.yaml"
    cfg.write_text("model: abmil\nmodel_args: {gated: false, hidden_dim: 64}\n")
    res = CliRunner().invoke(app, ["certify", "--model-config", str(cfg), "--tests", "single_concept", "--seeds", "1",
                                   "--n-train", "200", "--n-test", "100", "--epochs", "4", "--json",
                                   str(tmp_path / "out.json"), "--quiet"])
    assert res.exit_code == 0, res.output
    data = json.loads((tmp_path / "out.json").read_text())
    # ABMIL cannot solve the poisoned single-concept test (Raff & Holt's finding, test_standard_variant_... shows
    # it solves the clean one): the CLI must report that verdict, not merely some verdict
    assert data["summary"][0]["model"] == "abmil" and data["summary"][0]["verdict"] == "FAIL"
    res = CliRunner().invoke(app, ["certify", "--models", "nope"])
    assert res.exit_code == 1 and "unknown model" in res.output
