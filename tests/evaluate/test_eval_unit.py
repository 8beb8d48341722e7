"""Patient-level evaluation is the default for every task, slide-level on request, and the leaderboard
scores with the same function as metrics.json."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from slidemil.benchmark.leaderboard import _auroc
from slidemil.evaluate.compare import holm
from slidemil.evaluate.metrics import classification_metrics
from slidemil.tasks import create_task


def _preds():
    """Patient p0 has four slides, all confidently wrong; six other patients one slide each, right. Per
    slide p0 weighs four times; per patient once."""
    rows = [("p0", f"p0_s{i}", "pos", 0.1) for i in range(4)]
    rows += [(f"p{i}", f"p{i}_s0", lab, pr) for i, (lab, pr) in enumerate(
        [("pos", 0.9), ("pos", 0.8), ("pos", 0.7), ("neg", 0.2), ("neg", 0.3), ("neg", 0.05)], start=1)]
    frame = pd.DataFrame(rows, columns=["case_id", "slide_id", "label", "prob_pos"])
    frame["prob_neg"] = 1 - frame["prob_pos"]
    frame["pred"] = np.where(frame["prob_pos"] > 0.5, "pos", "neg")
    frame["fold"] = 0
    return frame


META = {"classes": ["neg", "pos"]}


def test_classification_counts_a_patient_once_by_default():
    preds = _preds()
    per_patient = create_task({"task": "classification"}).evaluate(preds, None, META, n_boot=0, seed=0)
    per_slide = create_task({"task": "classification", "eval_unit": "slide"}).evaluate(preds, None, META, 0, 0)
    assert per_patient["unit"] == "patient" and per_patient["n_units"] == 7 and per_patient["n_slides"] == 10
    assert per_slide["unit"] == "slide" and per_slide["n_units"] == 10
    # per patient: 6 of 7 right; per slide: 6 of 10
    assert per_patient["pooled"]["accuracy"]["value"] == pytest.approx(6 / 7)
    assert per_slide["pooled"]["accuracy"]["value"] == pytest.approx(6 / 10)
    y = np.array([1, 1, 1, 1, 0, 0, 0])
    probs = np.array([[0.9, 0.1], [0.1, 0.9], [0.2, 0.8], [0.3, 0.7], [0.8, 0.2], [0.7, 0.3], [0.95, 0.05]])
    assert per_patient["pooled"]["auroc"]["value"] == classification_metrics(y, probs)["auroc"]


def test_a_patients_slides_with_different_labels_stay_apart():
    preds = _preds()
    preds.loc[0, "label"] = "neg"                       # p0's first slide is a normal slide
    rows = create_task({"task": "classification"}).units(preds)
    assert len(rows) == 8 and set(rows.loc[rows["case_id"] == "p0", "label"]) == {"neg", "pos"}


def test_regression_and_ordinal_units_are_patients_too():
    reg = pd.DataFrame({"case_id": ["a", "a", "b", "c"], "slide_id": list("wxyz"), "target": [1.0, 1.0, 2.0, 3.0],
                        "pred": [0.0, 2.0, 2.0, 3.0], "fold": 0})
    m = create_task({"task": "regression"}).evaluate(reg, None, {"classes": []}, 0, 0)
    assert m["n_units"] == 3 and m["pooled"]["mae"]["value"] == pytest.approx(0.0)
    ordinal = pd.DataFrame({"case_id": ["a", "a", "b"], "slide_id": list("xyz"), "label": ["G1", "G1", "G2"],
                            "prob_G1": [0.2, 0.9, 0.1], "prob_G2": [0.8, 0.1, 0.9], "pred": ["G2", "G1", "G2"],
                            "fold": 0})
    rows = create_task({"task": "ordinal"}).units(ordinal)
    assert list(rows["pred"]) == ["G1", "G2"]          # decided again on the patient's mean (0.55/0.45), not slide x's
    two = pd.DataFrame({"case_id": "p", "slide_id": ["s0", "s1"], "label": "pos", "prob_pos": [0.1, 0.95],
                        "prob_neg": [0.9, 0.05], "pred": ["neg", "pos"], "fold": 0})
    rows = create_task({"task": "classification"}).units(two)
    assert rows["prob_pos"].item() == pytest.approx(0.525) and rows["pred"].item() == "pos"


def test_leaderboard_auroc_is_the_tasks_auroc_on_a_three_class_sample_missing_a_class():
    """The leaderboard's own AUROC returned NaN here while metrics.json reported 0.611-like values."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 40)                       # class 2 of 3 absent from this sample
    probs = rng.dirichlet([1, 1, 1], 40)
    assert np.isfinite(_auroc(y, probs))
    assert _auroc(y, probs) == classification_metrics(y, probs)["auroc"]


def test_holm_adjustment():
    assert holm([0.01, 0.04, 0.03, float("nan"), 0.5]) == pytest.approx([0.04, 0.09, 0.09, float("nan"), 0.5],
                                                                        nan_ok=True)
    assert holm([]) == []


def test_small_or_degenerate_samples_carry_a_caveat():
    """External validation on 4 patients printed AUROC 1.000 (95% CI 1.000-1.000) with no caveat."""
    from slidemil.tasks import sample_caveats, summary_line

    task = create_task({"task": "classification"})
    preds = pd.DataFrame({"case_id": list("abcd"), "slide_id": list("abcd"), "label": ["pos", "pos", "neg", "neg"],
                          "prob_pos": [0.9, 0.8, 0.2, 0.1], "fold": 0})
    preds["prob_neg"] = 1 - preds["prob_pos"]
    metrics = task.evaluate(preds, None, META, n_boot=100, seed=0)
    metrics["warnings"] = sample_caveats(metrics, task)
    text = summary_line(metrics)
    assert "only 4 patients" in text and "collapsed to 1.000" in text
    big = _preds()
    assert not any("only" in w for w in sample_caveats(task.evaluate(pd.concat([big.assign(
        case_id=big["case_id"] + str(i), slide_id=big["slide_id"] + str(i)) for i in range(4)]), None, META, 50, 0),
        task))


def test_every_task_says_what_its_numbers_mean_and_why_one_is_na():
    task = create_task({"task": "classification"})
    one_class = _preds()[lambda f: f["label"] == "pos"]
    metrics = task.evaluate(one_class, None, META, n_boot=0, seed=0)
    text = task.report_notes(metrics)
    assert "What the numbers mean" in text and "AUROC" in text and "n/a here" in text and "one class only" in text
    assert "n/a here" not in task.report_notes(task.evaluate(_preds(), None, META, 0, 0))
    for name, word in (("ordinal", "Quadratic kappa"), ("regression", "Pearson r")):
        assert word in create_task({"task": name}).report_notes({})
