"""`RUN/methods.md`: the methods and results paragraphs say what the run did and the report's numbers,
and change when the run did something else (no sentence claims a selection or transform it did not use)."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from slidemil.rundir import RunDir
from slidemil.tasks import create_task
from slidemil.tasks.methods import methods_markdown, methods_sections

pytestmark = pytest.mark.slow  # reads a trained run


def _run(trained):
    run = RunDir(trained[1])
    cfg = run.config()
    return run, cfg, json.loads(run.metrics_path.read_text()), create_task(cfg)


def test_methods_state_the_runs_settings_and_the_reports_numbers(trained):
    run, cfg, metrics, _ = _run(trained)
    text = run.methods_path.read_text()
    preds = pd.read_csv(run.predictions_path, dtype={"case_id": str})
    counts = preds.drop_duplicates("case_id")["label"].value_counts()
    prov = cfg["slidemil"]
    assert prov["n_slides"] > prov["n_patients"]               # some patients have two slides
    assert (f"{prov['n_slides']} whole-slide images of {prov['n_patients']} patients "
            f"({counts['negative']} negative, {counts['positive']} positive)") in text
    # a patient-bag run's metrics count a row per patient: the cohort's slides come from the run's record
    per_patient = {**metrics, "n_slides": metrics["n_patients"]}
    assert f"{prov['n_slides']} whole-slide images" in methods_markdown(methods_sections(run, cfg, per_patient, _run(trained)[3]))
    assert "the abmil aggregator (Ilse et al., ICML 2018" in text          # the paper, recorded at training
    assert "learning rate 0.001" in text and "for at most 15 epochs" in text and "3-fold cross-validation" in text
    epochs = sorted(run.fold_meta(k)["best_epoch"] for k in run.finished_folds())
    assert (f"epochs {epochs[0]}-{epochs[-1]} were kept" if epochs[0] != epochs[-1]
            else f"epoch {epochs[0]} in every fold") in text
    for m in (metrics, metrics["baseline"]):
        auroc = m["pooled"]["auroc"]
        assert f"AUROC {auroc['value']:.3f} (95% CI {auroc['ci_low']:.3f}-{auroc['ci_high']:.3f})" in text
    assert f"{metrics['bootstrap']['resamples']} patient-level bootstrap resamples" in text
    assert "Methods (draft)" in run.report_path.read_text()
    assert "slidemil train --config config.yaml --out NEW_FOLDER" in text
    assert json.loads(json.dumps(cfg["slidemil"]["references"]))["model"].startswith("Ilse et al.")


@pytest.mark.parametrize("change,says,never", [
    ({"select": "last"}, "The model of the last epoch was kept", "selected on an inner validation split"),
    ({"val_fraction": 0.0}, "no epoch was selected on validation data", "inner validation split ("),
    ({"monitor": "val_metric"}, "moving average of the validation AUROC", "validation loss"),
    ({"tune": True, "tune_trials": 7}, "Optuna's TPE sampler (7 trials)", None),
    ({"cv": "leave-site-out"}, "leave-site-out cross-validation (3 sites", "stratified by class"),
    ({"bag_unit": "patient"}, "each patient's slides concatenated into one bag", "one bag per slide"),
    ({"instance_dropout": 0.5, "batch_size": 4}, "50% of each training bag's instances dropped", "one bag per step"),
    ({"class_weights": "balanced"}, "weighted n / (C n_c)", None),
    ({"min_epochs": 0, "smooth": 1}, "the best validation loss, with early stopping", "not before epoch"),
])
def test_methods_follow_what_the_run_did(trained, change, says, never):
    run, cfg, metrics, _ = _run(trained)
    cfg = {**cfg, **change}
    text = methods_markdown(methods_sections(run, cfg, metrics, create_task(cfg)))
    assert says in text, text
    assert never is None or never not in text, text


def test_the_patching_the_features_record_is_stated(trained, monkeypatch):
    run, cfg, metrics, task = _run(trained)
    meta = run.fold_meta(0)
    enc = {"encoder": "uni_v1", "patch_size": 224, "target_mpp": 0.5, "overlap": 32, "min_tissue": 0.4,
           "stain_norm": "macenko"}
    monkeypatch.setattr(RunDir, "fold_meta", lambda self, k: {**meta, "encoder": enc})
    prov = {**cfg["slidemil"], "references": {**cfg["slidemil"]["references"], "encoder": "Chen et al., Nat. Med. 2024"}}
    text = methods_markdown(methods_sections(run, {**cfg, "slidemil": prov}, metrics, task))
    assert ("extracted with uni_v1 (Chen et al., Nat. Med. 2024) from 224 x 224 px patches at 0.5 µm/px overlapping "
            "by 32 px with at least 40% tissue after macenko stain normalisation") in text


def test_features_used_as_extracted_are_not_said_to_be_whitened(trained, monkeypatch):
    run, cfg, metrics, task = _run(trained)
    meta = run.fold_meta(0)
    monkeypatch.setattr(RunDir, "fold_meta", lambda self, k: {**meta, "standardized": False})
    text = methods_markdown(methods_sections(run, cfg, metrics, task))
    assert "used as extracted" in text and "whitened" not in text


def test_an_external_validation_is_reported_with_its_own_numbers(trained, monkeypatch):
    run, cfg, metrics, task = _run(trained)
    ext = {"folds": 3, "metrics": {"n_patients": 40, "n_slides": 52,
                                   "pooled": {"auroc": {"value": 0.81, "ci_low": 0.7, "ci_high": 0.9}}}}
    monkeypatch.setattr(RunDir, "externals", lambda self: {"TCGA-LUAD": ext})
    text = methods_markdown(methods_sections(run, cfg, metrics, task))
    assert ("On the external cohort TCGA-LUAD (40 patients, 52 slides; used in neither training nor selection), "
            "the mean of the 3 fold models reached AUROC 0.810 (95% CI 0.700-0.900).") in text


@pytest.mark.parametrize("ibs_range,says", [("follow-up", "the observed follow-up"),
                                            ("0.1,0.9", "quantiles 0.1,0.9 of the event times")])
def test_survival_methods_name_the_times_its_metrics_were_taken_at(ibs_range, says):
    metrics = {"tau": 77.8, "eval_times": [17.3, 33.6, 60.8], "ibs_window": [7.5, 88.1], "ibs_range": ibs_range}
    text = create_task({"task": "survival"}).methods_notes(metrics)
    assert "truncated at t = 77.8" in text and "averaged over t = 17.3, 33.6, 60.8" in text
    assert f"over t in [7.5, 88.1] ({says})" in text
    assert create_task({"task": "classification"}).methods_notes(metrics) == ""
