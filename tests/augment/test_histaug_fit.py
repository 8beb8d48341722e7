"""HistAug's generator, fit with `slidemil histaug fit` on the demo slides, predicts augmented embeddings."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.slow  # trains models or runs the slide pipeline


def test_histaug_generator_beats_the_unaugmented_embedding(generator):
    """On held-out slides the generator predicts E(T_t(x)) better than E(x) itself does."""
    report = json.loads((generator / "histaug.json").read_text())
    assert report["config"]["encoder"] == "handcrafted" and report["heldout_slides"]
    assert report["heldout_mse"] < 0.8 * report["identity_mse"], report
