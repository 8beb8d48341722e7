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
