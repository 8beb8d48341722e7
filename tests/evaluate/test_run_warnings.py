"""The run's warnings (metrics.json, report): a model that trails its baseline is told what held instead."""

from __future__ import annotations

import json

from slidemil.rundir import RunDir
from slidemil.tasks import TaskConfig, create_task
from slidemil.tasks.evaluation import run_warnings


def _metrics(ours: float, ref: float) -> dict:
    cell = {"value": ours, "ci_low": ours - 0.1, "ci_high": ours + 0.05}
    return {"n_patients": 120, "pooled": {"auroc": cell},
            "baseline": {"pooled": {"auroc": {"value": ref, "ci_low": ref - 0.1, "ci_high": ref + 0.05}}}}


def test_a_model_trailing_its_baseline_is_told_which_models_held(tmp_path):
    run = RunDir(tmp_path)
    run.fold_dir(0).mkdir()
    (run.fold_dir(0) / "model.json").write_text(json.dumps({"warnings": []}))
    run.mark_fold_done(0, {"fold": 0})
    task = create_task(TaskConfig())
    trailing = run_warnings(run, _metrics(0.70, 0.85), task)
    assert len(trailing) == 1 and "0.700 is below the reference baseline's 0.850" in trailing[0]
    assert "--model mean_pool or abmilx" in trailing[0] and "docs/protocol.md" in trailing[0]
    assert run_warnings(run, _metrics(0.84, 0.85), task) == []          # within 0.02: no warning


def test_folds_that_rank_alike_on_different_scales_are_explained():
    """Each fold ranks its test patients perfectly, but one fold's probabilities all sit above 0.5 and the
    other's below: pooled, the ranking mixes the folds (and one fold classifies nothing right). The pooled
    AUROC is then far below the folds' mean, and a reader comparing with papers that quote the fold mean
    must be told why."""
    import numpy as np
    import pandas as pd

    from slidemil.tasks.evaluation import pooled_below_folds

    rows = []
    for fold, low in ((0, 0.55), (1, 0.05)):              # fold 1's scores sit far below fold 0's
        for i in range(10):
            positive = i % 2 == 1
            p = low + 0.2 * positive + 0.01 * i
            rows.append({"slide_id": f"f{fold}s{i}", "case_id": f"f{fold}p{i}", "fold": fold,
                         "label": "positive" if positive else "negative", "prob_negative": 1 - p,
                         "prob_positive": p, "pred": "positive" if p > 0.5 else "negative"})
    task = create_task(TaskConfig())
    metrics = task.evaluate(pd.DataFrame(rows), None, {"classes": ["negative", "positive"]}, 50, 0)
    assert metrics["fold_summary"]["auroc"]["mean"] == 1.0 and metrics["pooled"]["auroc"]["value"] < 0.85
    said = pooled_below_folds(metrics, task)
    assert len(said) == 1 and "below the mean of the folds' 1.000" in said[0] and "different scales" in said[0]
    aligned = pd.DataFrame(rows).assign(prob_positive=lambda d: np.where(d["label"] == "positive", 0.8, 0.2))
    assert pooled_below_folds(task.evaluate(aligned, None, {"classes": ["negative", "positive"]}, 50, 0), task) == []
