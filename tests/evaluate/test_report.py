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
