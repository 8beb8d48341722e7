"""Task options are checked before anything is written; certify refuses non-classification tasks; run
folders from before tasks existed still evaluate and predict as classification."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml
from pydantic import ValidationError
from tests.conftest import fit_config, runner

from slidemil.cli import app
from slidemil.predict import predict
from slidemil.tasks import TASKS, evaluate_run


def test_the_four_tasks_are_registered():
    assert TASKS.available() == ["classification", "ordinal", "regression", "survival"]


@pytest.mark.parametrize("kw, words", [
    ({"task": "survival", "survival_loss": "cox"}, "batch-size 2"),
    ({"task": "survival", "class_weights": "balanced"}, "class-weights is for classification"),
    ({"task": "regression", "balanced_sampling": True}, "needs classes"),
    ({"task": "ordinal", "monitor": "val_auroc"}, "use val_metric"),
    ({"task": "regression", "strategy": "sc"}, "needs --task classification"),
    ({"task": "surv"}, "did you mean"),
])
def test_options_that_do_not_fit_the_task(kw, words):
    with pytest.raises(ValidationError, match=words):
        fit_config(**kw)


def test_certify_is_classification_only():
    result = runner.invoke(app, ["certify", "--task", "survival", "--models", "abmil"])
    assert result.exit_code == 1 and "not defined" in result.output and "Traceback" not in result.output


@pytest.mark.slow
def test_a_run_folder_from_before_tasks_still_loads(trained, tmp_path):
    """0.1 wrote no `task` in config.yaml or model.json: evaluate and predict treat it as classification
    and reproduce its metrics."""
    root, run = trained
    old = tmp_path / "old_run"
    shutil.copytree(run, old)
    cfg = yaml.safe_load((old / "config.yaml").read_text())
    for key in ("task", "time_col", "event_col", "target_col", "survival_loss", "bins", "alpha_surv", "eval_times",
                "regression_loss"):
        cfg.pop(key, None)
    (old / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    for meta_path in old.glob("fold_*/model.json"):
        meta = json.loads(meta_path.read_text())
        meta.pop("task", None)
        meta_path.write_text(json.dumps(meta))
    metrics = evaluate_run(old, n_boot=100, seed=0)
    assert metrics["pooled"] == json.loads((run / "metrics.json").read_text())["pooled"]
    preds = predict(old, root / "features")
    assert {"prob_negative", "prob_positive", "pred"} <= set(preds.columns)
