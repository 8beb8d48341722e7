"""The demo's pipeline end to end."""

from __future__ import annotations

import pandas as pd
import pytest

pytestmark = pytest.mark.slow  # trains models or runs the slide pipeline


def test_demo_pipeline_end_to_end(demo_run):
    out, metrics = demo_run
    assert metrics["pooled"]["auroc"]["value"] >= 0.9
    assert (out / "run" / "report.html").exists()
    preds = pd.read_csv(out / "external_predictions.csv")
    truth = pd.read_csv(out / "external" / "labels.csv").set_index("slide_id")
    assert (preds.set_index("slide_id")["pred"] == truth.loc[preds["slide_id"], "label"].to_numpy()).mean() >= 0.75
    # the external cohort's labels validate the run, and its report says so with the small-cohort caveat
    page = (out / "run" / "report.html").read_text()
    section = page[page.index("<h2>External validation</h2>"):]
    assert "<h3>external</h3>" in section and "only 4 patients" in section
