"""The report embeds the heatmap gallery and the curves' confidence bands."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.slow  # trains models or runs the slide pipeline


def test_report_shows_heatmap_gallery_and_bands(demo_run):
    demo_run = demo_run[0]
    html = (demo_run / "run" / "report.html").read_text()
    assert "Best true positives" in html and "Heatmaps" in html and html.count("data:image/png;base64,") >= 6
    made = list((demo_run / "run" / "heatmaps").glob("*_heatmap.png"))          # 3 of 4 were shown before
    assert len(made) == 4 and all(p.name[:-len("_heatmap.png")] + ":" in html for p in made)
    assert "built_with:" in html and "gated: true" in html     # the model's arguments as built, defaults included


def test_a_confusion_matrix_of_equal_counts_shows_its_numbers(tmp_path, monkeypatch):
    """Equal counts in every cell (a model at chance on a balanced cohort) were drawn as an empty-looking
    panel: the colour scale ran from the minimum to the maximum, all cells took the palest blue and the
    numbers were white on it. Each cell's number must stand out from its cell's colour."""
    from matplotlib.colors import to_rgb

    from slidemil.evaluate import plots

    drawn = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: drawn.append(fig) or path)
    luminance = lambda rgb: float(np.dot(to_rgb(rgb), [0.299, 0.587, 0.114]))  # noqa: E731
    for pred in ([0, 1, 0, 1], [0, 0, 1, 1], [1, 1, 0, 0]):        # equal counts, diagonal, anti-diagonal
        plots.confusion_plot(np.array([0, 0, 1, 1]), np.array(pred), ["a", "b"], tmp_path / "cm.png")
        ax = drawn[-1].axes[0]
        image = ax.images[0]
        for text in ax.texts:
            cell = image.cmap(image.norm(int(text.get_text())))
            assert abs(luminance(text.get_color()) - luminance(cell[:3])) > 0.5, (pred, text.get_text())


def test_the_configuration_block_shows_the_runs_own_task_options(trained):
    """A classification report listed survival_loss, bins, time_col and regression_loss among its settings, as if
    they had been used; config.yaml keeps every field, the report shows the task's own."""
    from slidemil.rundir import RunDir
    from slidemil.tasks.base import own_options
    from slidemil.tasks.evaluation import render_report

    _, run = trained
    page = render_report(RunDir(run)).read_text()
    block = page[page.index("Configuration"):]
    assert "label_col:" in block and "model: abmil" in block
    for other in ("survival_loss:", "time_col:", "bins:", "regression_loss:", "target_col:"):
        assert other not in block, other
    survival = own_options({"task": "survival", "time_col": "os", "label_col": "label", "lr": 1e-4})
    assert survival == {"task": "survival", "time_col": "os", "lr": 1e-4}


def test_the_metric_tables_show_each_number_in_its_column(tmp_path):
    """What a reader copies into a paper: each metric's pooled value, its CI and the fold mean ± SD in their own
    columns, each fold's row under the right metric, and what one row of the metrics is (patient or slide)."""
    import re

    from slidemil.evaluate.report import write_report
    from slidemil.rundir import RunDir

    metrics = {"task": "classification", "classes": ["a", "b"], "n_slides": 30, "n_patients": 20, "n_units": 20,
               "unit": "patient", "bootstrap": {"resamples": 200},
               "pooled": {"auroc": {"value": 0.812, "ci_low": 0.701, "ci_high": 0.903},
                          "accuracy": {"value": 0.755, "ci_low": 0.611, "ci_high": 0.877}},
               "fold_summary": {"auroc": {"mean": 0.804, "std": 0.051}, "accuracy": {"mean": 0.744, "std": 0.062}},
               "folds": {"0": {"n_slides": 14, "auroc": 0.751, "accuracy": 0.702},
                         "1": {"n_slides": 16, "auroc": 0.857, "accuracy": 0.786}}}
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    page = write_report(run, {"model": "abmil"}, metrics, {}).read_text()
    cells = lambda row: re.findall(r"<td>(.*?)</td>", row)  # noqa: E731
    rows = {cells(r)[0]: cells(r) for r in re.findall(r"<tr><td>.*?</tr>", page)}
    assert rows["auroc"][1:] == ["<b>0.812</b>", "0.701 – 0.903", "0.804 ± 0.051"]
    assert rows["accuracy"][1:] == ["<b>0.755</b>", "0.611 – 0.877", "0.744 ± 0.062"]
    header = re.search(r"<th>fold</th><th>slides</th>(.*?)</tr>", page).group(1)
    assert re.findall(r"<th>(.*?)</th>", header) == ["auroc", "accuracy"]
    assert rows["0"][1:] == ["14", "0.751", "0.702"] and rows["1"][1:] == ["16", "0.857", "0.786"]
    assert "Metrics are per patient (20 rows)" in page
    slide_level = write_report(run, {"model": "abmil"}, {**metrics, "unit": "slide", "n_units": 30}, {}).read_text()
    assert "Metrics are per slide (30 rows)" in slide_level and "per patient" not in slide_level


def test_the_gallery_shows_the_most_telling_slides_first(tmp_path):
    """Best true positives and worst false positives by the highest positive probability, false negatives by the
    lowest: the heatmaps a pathologist should look at first."""
    import pandas as pd

    from slidemil.evaluate.report import heatmap_gallery

    rows = [("tp1", "b", "b", 0.95), ("tp2", "b", "b", 0.65), ("tp3", "b", "b", 0.80),
            ("fp1", "a", "b", 0.55), ("fp2", "a", "b", 0.90), ("fp3", "a", "b", 0.70),
            ("fn1", "b", "a", 0.40), ("fn2", "b", "a", 0.05), ("fn3", "b", "a", 0.20)]
    preds = pd.DataFrame([{"slide_id": s, "label": y, "pred": p, "prob_a": 1 - q, "prob_b": q} for s, y, p, q in rows])
    for s, *_ in rows:
        (tmp_path / f"{s}_heatmap.png").write_bytes(b"")
    sections = dict(heatmap_gallery(preds, ["a", "b"], tmp_path, per_group=3))
    order = {title: [caption.split(":")[0] for caption, _ in items] for title, items in sections.items()}
    assert order["Best true positives"] == ["tp1", "tp3", "tp2"]
    assert order["Worst false positives"] == ["fp2", "fp3", "fp1"]
    assert order["False negatives"] == ["fn2", "fn3", "fn1"]
