"""Site-aware validation: leave-site-out folds, per-site metrics in metrics.json and the report, and per-site
metrics of an external cohort."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from conftest import run_config
from slidemil.predict import predict, record_external, validate_external
from slidemil.train.cv import run_cv

pytestmark = pytest.mark.slow  # trains models


@pytest.fixture(scope="module")
def site_run(multicentre_cohort, tmp_path_factory):
    root, _ = multicentre_cohort
    out = tmp_path_factory.mktemp("sites") / "lso"
    run_cv(run_config(root, out, cv="leave-site-out", site_col="site", epochs=6, min_epochs=2, bootstrap=50))
    return root, out


def test_leave_site_out_never_trains_on_the_test_centre(site_run):
    root, run = site_run
    site = pd.read_csv(root / "labels.csv").set_index("slide_id")["site"]
    splits = pd.read_csv(run / "splits.csv")
    splits["site"] = splits["slide_id"].map(site)
    assert sorted(splits["fold"].unique()) == [0, 1]
    for _, part in splits.groupby("fold"):
        tested = set(part.loc[part["role"] == "test", "site"])
        assert len(tested) == 1 and not tested & set(part.loc[part["role"] != "test", "site"])
    preds = pd.read_csv(run / "predictions.csv")
    assert (preds.groupby("site")["fold"].nunique() == 1).all()      # each centre is predicted by one model


def test_per_site_metrics_in_metrics_json_and_report(site_run):
    _, run = site_run
    m = json.loads((run / "metrics.json").read_text())
    assert set(m["sites"]) == {"site0", "site1"}
    for site in m["sites"].values():
        auc = site["pooled"]["auroc"]
        assert site["n_patients"] == 12 and auc["ci_low"] <= auc["value"] <= auc["ci_high"]
    html = (run / "report.html").read_text()
    assert "Per site" in html and "site0" in html and "site1" in html


def test_external_cohort_gets_per_site_metrics(site_run, tmp_path):
    root, run = site_run
    preds = predict(run, root / "features")
    metrics = validate_external(run, preds, root / "labels.csv", n_boot=20)
    assert set(metrics["sites"]) == {"site0", "site1"} and metrics["sites"]["site0"]["n_patients"] == 12
    # a label table without the run's site column still validates (no per-site part then)
    pd.read_csv(root / "labels.csv").drop(columns="site").to_csv(tmp_path / "nosite.csv", index=False)
    assert "sites" not in validate_external(run, preds, tmp_path / "nosite.csv", n_boot=20)
    # recorded in the run, the report's External validation section shows the cohort's per-site table
    record_external(run, "centres", metrics, root / "labels.csv", tmp_path / "p.csv")
    page = (run / "report.html").read_text()
    section = page[page.index("<h2>External validation</h2>"):]
    assert "<h3>centres: per site (95% patient-bootstrap CIs)</h3>" in section
    assert "site0" in section and "site1" in section
