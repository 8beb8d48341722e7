"""The robustness index (de Jong et al.'s R = SO / OS, read against random embeddings on class x centre
balanced samples) and the probes detect a planted centre shift, come back near neutral without it, and
random embeddings read as neutral even on a cohort whose centres differ in size and class mix."""

from __future__ import annotations

import json

import numpy as np
import pytest

from slidemil.data.synthetic import make_feature_cohort
from slidemil.errors import InputError
from slidemil.evaluate.robustness import robustness_index
from slidemil.robustness import RobustnessSettings, run_robustness


def test_index_counts_same_class_other_centre_against_other_class_same_centre():
    # four points per (class, centre) cell, one patient each; embeddings that follow the class exactly
    label = np.repeat([0, 1], 8)
    centre = np.array([0, 0, 0, 0, 1, 1, 1, 1] * 2)
    groups = np.arange(16)
    by_class = np.eye(2)[label] + 0.01 * np.random.default_rng(0).normal(size=(16, 2))
    by_centre = np.eye(2)[centre] + 0.01 * np.random.default_rng(1).normal(size=(16, 2))
    ours = robustness_index(by_class, label, centre, groups, k=3, n_boot=0)
    assert ours["value"] == np.inf and ours["normalized"] == 1.0 and ours["reading"].startswith("biology")
    assert robustness_index(by_centre, label, centre, groups, k=3, n_boot=0)["value"] == 0.0
    # 2 classes x 2 centres, balanced: random embeddings' level is the paper's parity, 1
    assert ours["chance"] == pytest.approx(1.0) and ours["balance"] == "balanced as given"
    # neighbours from the sample's own patient never count
    same_patient = robustness_index(by_centre, label, centre, np.arange(16) // 8, k=3, n_boot=0)
    assert same_patient["k"] == 3 and same_patient["n_patients"] == 2


def _unbalanced(rng, n_a=100, n_b=20):
    """A big centre of mostly one class and a small one of mostly the other."""
    centre = np.r_[np.zeros(n_a), np.ones(n_b)].astype(int)
    label = np.r_[rng.random(n_a) < 0.3, rng.random(n_b) < 0.7].astype(int)
    return label, centre, np.arange(n_a + n_b)


def test_random_embeddings_read_as_neutral_on_an_unbalanced_two_centre_cohort():
    """Unbalanced, random embeddings scored ~0.4 (normalised 0.29, "clusters by centre") before balancing;
    on class x centre balanced draws they sit at the chance level, and the reading says so."""
    hits = 0
    for seed in range(5):
        rng = np.random.default_rng(seed)
        label, centre, groups = _unbalanced(rng)
        emb = rng.normal(size=(len(label), 32))
        raw = robustness_index(emb, label, centre, groups, k=10, n_boot=0, balance=False)
        assert raw["chance"] < 0.6                                  # the design alone pulls R down
        ri = robustness_index(emb, label, centre, groups, k=10, n_boot=200, seed=seed)
        assert ri["chance"] == pytest.approx(1.0) and "cell" in ri["balance"]
        assert 0.7 < ri["value"] < 1.4
        hits += ri["reading"].startswith("not distinguishable")
    assert hits >= 4


def test_balancing_leaves_out_a_centre_without_every_class():
    rng = np.random.default_rng(0)
    label = np.r_[np.repeat([0, 1], 10), np.repeat([0, 1], 10), np.zeros(6, int)]
    centre = np.r_[np.zeros(20), np.ones(20), np.full(6, 2)].astype(int)
    ri = robustness_index(rng.normal(size=(46, 8)), label, centre, np.arange(46), k=5, n_boot=0)
    assert "left out: 2" in ri["balance"] and ri["n_samples_used"] == 40


@pytest.fixture(scope="module")
def shifted_and_clean(tmp_path_factory):
    root = tmp_path_factory.mktemp("robust")
    for name, shift in (("shifted", 6.0), ("clean", 0.0)):
        make_feature_cohort(root / name, n_patients=24, dim=16, bag_size=(20, 40), witness_rate=0.5, signal=3.0,
                            seed=5, n_sites=2, centre_shift=shift)
    return root


def test_planted_centre_shift_is_detected(shifted_and_clean, tmp_path):
    root = shifted_and_clean
    report = run_robustness({"shifted": root / "shifted" / "features", "clean": root / "clean" / "features"},
                            root / "shifted" / "labels.csv", tmp_path / "out",
                            RobustnessSettings(k_slide=5, k_patch=20, patches_per_slide=16, bootstrap=50))
    s, c = report["features"]["shifted"], report["features"]["clean"]
    # the shifted encoder's neighbours are its own centre's; the probe reads the centre off the embedding
    for level in ("slide", "patch"):
        ri = s[level]["robustness_index"]
        assert ri["value"] < 0.5 * ri["chance"] and ri["normalized"] < 0.35
    assert s["slide"]["robustness_index"]["reading"].startswith("centre dominates")
    assert s["slide"]["probe_centre"]["balanced_accuracy"] >= 0.9
    # without the shift the centre is not predictable and biology decides the neighbourhood
    assert c["slide"]["robustness_index"]["value"] > 1.5 * c["slide"]["robustness_index"]["chance"]
    assert c["slide"]["robustness_index"]["reading"].startswith("biology dominates")
    assert c["slide"]["probe_centre"]["balanced_accuracy"] < 0.75
    assert c["slide"]["robustness_index"]["ci_low"] > s["slide"]["robustness_index"]["ci_high"]
    saved = json.loads((tmp_path / "out" / "robustness.json").read_text())
    assert [r["features"] for r in saved["comparison"]] == ["shifted", "clean"]
    assert (tmp_path / "out" / "shifted_robustness.png").stat().st_size > 5000
    assert s["slide"]["map"] in ("umap", "pca")


def test_one_centre_is_an_input_error(shifted_and_clean, tmp_path):
    import pandas as pd

    table = pd.read_csv(shifted_and_clean / "clean" / "labels.csv").assign(site="A")
    table.to_csv(tmp_path / "one.csv", index=False)
    with pytest.raises(InputError, match="one centre"):
        run_robustness({"x": shifted_and_clean / "clean" / "features"}, tmp_path / "one.csv", tmp_path / "o")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("sites,says", [
    ("patient", "names a centre per patient"),
    ("label", "confounds centre and class"),
])
def test_a_centre_column_that_leaves_the_index_undefined_is_an_input_error(shifted_and_clean, tmp_path, sites, says):
    """A site column naming each patient (or centres each holding one class) left the index undefined (no
    neighbour of another class from the same centre) and crashed in the plot's log axis, after the output
    folder was made."""
    import pandas as pd

    table = pd.read_csv(shifted_and_clean / "clean" / "labels.csv")
    table["site"] = table["case_id"] if sites == "patient" else table["label"]
    table.to_csv(tmp_path / "t.csv", index=False)
    with pytest.raises(InputError, match=says):
        run_robustness({"x": shifted_and_clean / "clean" / "features"}, tmp_path / "t.csv", tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_cli_compares_folders_and_names_a_missing_one(shifted_and_clean, tmp_path):
    from conftest import runner
    from slidemil.cli import app

    root = shifted_and_clean
    ok = runner.invoke(app, ["robustness", "--features", f"shifted={root / 'shifted' / 'features'}", "--features",
                             str(root / "clean" / "features"), "--labels", str(root / "clean" / "labels.csv"),
                             "--out", str(tmp_path / "r"), "--k-slide", "5", "--k-patch", "10", "--bootstrap", "10"])
    assert ok.exit_code == 0, ok.output
    assert "shifted" in ok.output and "features" in ok.output           # the second folder is named after itself
    bad = runner.invoke(app, ["robustness", "--features", str(tmp_path / "nowhere"), "--labels",
                              str(root / "clean" / "labels.csv"), "--out", str(tmp_path / "r2")])
    assert bad.exit_code == 1 and "nowhere" in bad.output and "Traceback" not in bad.output
    assert not (tmp_path / "r2").exists()


def _cells(per_cell, copies=1):
    """2 classes x 2 centres, `per_cell` patients in each, `copies` samples per patient."""
    patients = np.arange(4 * per_cell)
    label, centre = patients % 2, (patients // 2) % 2
    return np.repeat(label, copies), np.repeat(centre, copies), np.repeat(patients, copies)


def test_a_samples_own_patient_is_never_its_neighbour():
    """One patient per class x centre cell, four tiles each, embedded by class: every tile's nearest tiles
    are its own patient's (same class, same centre: they count for nothing). Leaving the patient out, its
    neighbours are the other centre's patient of its class: all SO, R = inf."""
    label, centre, groups = _cells(1, copies=4)
    rng = np.random.default_rng(0)
    emb = np.eye(2)[label] + 0.05 * rng.normal(size=(4, 2))[groups] + 0.001 * rng.normal(size=(16, 2))
    ri = robustness_index(emb, label, centre, groups, k=3, n_boot=0)
    assert ri["value"] == np.inf and ri["fractions"]["SS"] == 0.0


def test_chance_level_is_a_uniform_draw_from_the_other_patients_samples():
    """Written out: each sample's chance of an SO (and an OS) neighbour drawn uniformly from the samples
    of the other patients, summed over samples; patients of several samples and unequal cells."""
    from slidemil.evaluate.robustness import chance_level

    rng = np.random.default_rng(3)
    groups = rng.integers(0, 15, 60)
    label = (groups % 2 + (rng.random(60) < 0.2)) % 2          # mostly one class per patient, not always
    centre = (groups // 5) % 3
    so = os_ = 0.0
    for i in range(60):
        other = groups != groups[i]
        so += np.mean((label[other] == label[i]) & (centre[other] != centre[i]))
        os_ += np.mean((label[other] != label[i]) & (centre[other] == centre[i]))
    assert chance_level(label, centre, groups) == pytest.approx(so / os_, rel=1e-12)


def test_balanced_draws_are_random_subsets_of_every_cell():
    """Each draw holds the smallest cell's number of patients from every cell; different draws take
    different patients, so over ten draws far more than that many patients of a big cell take part."""
    from slidemil.evaluate.robustness import balanced_draws

    label = np.r_[np.zeros(30), np.ones(4), np.zeros(4), np.ones(4)].astype(int)
    centre = np.r_[np.zeros(34), np.ones(8)].astype(int)
    groups = np.arange(42)
    draws, note = balanced_draws(label, centre, groups, draws=10, seed=0)
    assert len(draws) == 10 and "4 patient(s) per class x centre cell" in note
    for rows in draws:
        assert len(rows) == 16 and (np.bincount(label[rows] * 2 + centre[rows], minlength=4) == 4).all()
    big = np.unique(np.concatenate([rows[(label[rows] == 0) & (centre[rows] == 0)] for rows in draws]))
    assert len(big) >= 15


def test_the_confidence_interval_resamples_patients():
    """Ten identical tiles per patient carry one patient's evidence: the CI equals that of one tile per
    patient (k scaled alike), where resampling tiles would make it ~3x narrower."""
    label, centre, groups = _cells(8)
    emb = np.eye(2)[label] * 0.6 + np.random.default_rng(1).normal(size=(32, 2))
    one = robustness_index(emb, label, centre, groups, k=1, n_boot=400, seed=0)
    l10, c10, g10 = _cells(8, copies=10)
    ten = robustness_index(np.repeat(emb, 10, 0), l10, c10, g10, k=10, n_boot=400, seed=0)
    assert ten["value"] == pytest.approx(one["value"])
    assert one["ci_high"] > one["ci_low"]
    assert (ten["ci_low"], ten["ci_high"]) == pytest.approx((one["ci_low"], one["ci_high"]))
