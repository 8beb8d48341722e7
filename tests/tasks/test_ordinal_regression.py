"""CORN (ordinal) and the regression head: the loss as coral_pytorch defines it, rank-consistent grades,
and the target scaling fitted on training rows only."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import torch

from slidemil.tasks import TaskConfig, create_task
from slidemil.tasks.ordinal import corn_loss, corn_probabilities, grade


def test_corn_loss_by_hand():
    """Two outputs (three grades). Bag y=0 joins task 0 only (label 0); bag y=2 joins both (labels 1, 1):
    three BCE terms, divided by 3."""
    logits = torch.tensor([[0.0, 5.0], [math.log(3.0), 0.0]])
    y = torch.tensor([0, 2])
    bce = lambda z, t: -(t * math.log(1 / (1 + math.exp(-z))) + (1 - t) * math.log(1 - 1 / (1 + math.exp(-z))))
    expected = (bce(0.0, 0) + bce(math.log(3.0), 1) + bce(0.0, 1)) / 3
    assert abs(float(corn_loss(logits, y)) - expected) < 1e-6


def test_corn_probabilities_are_rank_consistent():
    logits = np.random.default_rng(0).normal(size=(50, 4))
    p = corn_probabilities(logits)
    assert np.allclose(p.sum(1), 1) and (p >= 0).all()
    above = 1 - np.cumsum(p, 1)[:, :-1]
    assert (np.diff(above, axis=1) <= 1e-12).all()          # P(y > k) never increases with k
    assert (grade(p) == (above > 0.5).sum(1)).all()


def test_regression_scaling_comes_from_the_training_rows():
    task = create_task(TaskConfig(task="regression"))
    state = task.fit_state(pd.DataFrame({"target": [2.0, 4.0, 6.0]}))
    assert state == {"mean": 4.0, "sd": float(np.std([2, 4, 6]))}
    loss = task.loss(state, None, "cpu", 1)
    # a perfect standardised prediction costs nothing, and predictions come back in target units
    assert float(loss(torch.tensor([[-1.2247449], [0.0]]), torch.tensor([2.0, 4.0]))) < 1e-10
    assert np.allclose(task.columns(state, np.array([[1.0]]), {})["pred"], [4.0 + state["sd"]])


def test_an_ordinal_task_without_classes_names_the_grade_order_it_used(tmp_path, caplog):
    """Text grades sort alphabetically (high < intermediate < low): the warning said only "sorted", so an
    inverted scale went unseen. It now names the order and the flag that fixes it; --classes is obeyed."""
    path = tmp_path / "labels.csv"
    rows = [(f"S{i}", f"P{i}", g) for i, g in enumerate(["low", "intermediate", "high"] * 3)]
    pd.DataFrame(rows, columns=["slide_id", "case_id", "label"]).to_csv(path, index=False)
    with caplog.at_level("WARNING"):
        cohort = create_task(TaskConfig(task="ordinal")).read(path)
    assert cohort.classes == ["high", "intermediate", "low"]
    assert "high < intermediate < low" in caplog.text and "--classes" in caplog.text
    given = create_task(TaskConfig(task="ordinal", classes=["low", "intermediate", "high"])).read(path)
    assert given.classes == ["low", "intermediate", "high"]


def test_regression_fold_ensemble_averages_predictions_in_target_units():
    """Each fold predicts in its own training fold's units (mean, SD); the ensemble is the mean of those,
    not of the standardised outputs, nor one fold's."""
    task = create_task(TaskConfig(task="regression"))
    folds = [({"fold": 0, "task_state": {"mean": 10.0, "sd": 2.0}}, np.array([[1.0], [0.0]])),
             ({"fold": 1, "task_state": {"mean": 20.0, "sd": 4.0}}, np.array([[0.0], [-1.0]]))]
    frame = task.ensemble(folds)
    np.testing.assert_allclose(frame["fold0_pred"], [12.0, 10.0])
    np.testing.assert_allclose(frame["fold1_pred"], [20.0, 16.0])
    np.testing.assert_allclose(frame["pred"], [16.0, 13.0])


def test_regression_folds_are_stratified_by_target_quantile():
    """Every test fold gets low, middle and high targets (a fold of only high targets makes its r and R^2
    meaningless): folds are balanced over target quartiles per patient."""
    from slidemil.data.cohort import Cohort
    from slidemil.data.splits import make_splits

    task = create_task(TaskConfig(task="regression"))
    patients = [f"P{i:02d}" for i in range(40)]
    table = pd.DataFrame({"slide_id": [f"{p}_S0" for p in patients], "case_id": patients,
                          "target": np.arange(40, dtype=float)})
    strata = task.strata(table, 4)
    assert sorted(np.bincount(strata)) == [10, 10, 10, 10]
    assert (np.diff(strata) >= 0).all()                         # quartiles of the (sorted) targets
    splits = make_splits(Cohort(table.assign(y=0), []), folds=4, val_fraction=0, strata=strata)
    for _, rows in splits[splits["role"] == "test"].groupby("fold"):
        quart = table.set_index("slide_id").loc[rows["slide_id"], "target"] // 10
        assert sorted(quart.astype(int).unique()) == [0, 1, 2, 3]
