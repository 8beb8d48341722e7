"""The report embeds the heatmap gallery and the curves' confidence bands."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow  # trains models or runs the slide pipeline


def test_report_shows_heatmap_gallery_and_bands(demo_run):
    demo_run = demo_run[0]
    html = (demo_run / "run" / "report.html").read_text()
    assert "Best true positives" in html and "Heatmaps" in html and html.count("data:image/png;base64,") >= 6
    made = list((demo_run / "run" / "heatmaps").glob("*_heatmap.png"))          # 3 of 4 were shown before
    assert len(made) == 4 and all(p.name[:-len("_heatmap.png")] + ":" in html for p in made)
    assert "built_with:" in html and "gated: true" in html     # the model's arguments as built, defaults included
