"""Heatmap scales: within-slide (percentile) makes a negative slide's own top patches red; the absolute
scale keeps one meaning across slides, and the figure says which scale it shows and when a model's scores
are not spatial evidence."""

from __future__ import annotations

import numpy as np
import torch

from slidemil import models
from slidemil.explain.paint import normalise
from slidemil.explain.scores import absolute, ensemble_scores, scale_label


def test_uniform_attention_is_mid_scale_absolutely_but_spans_the_colours_within_the_slide():
    n = 200
    flat = np.full(n, 1.0 / n) + np.random.default_rng(0).normal(0, 1e-6, n)    # a negative slide: no focus
    peaked = np.full(n, 0.2 / (n - 5))
    peaked[:5] = 0.8 / 5                                                       # a positive slide: 5 patches
    assert normalise(flat).max() == 1.0 and normalise(flat).min() == 0.0       # within-slide: red regardless
    a_flat, a_peak = absolute(flat, attention=True), absolute(peaked, attention=True)
    assert np.allclose(a_flat, 0.5, atol=1e-3)                                  # uniform attention = mid scale
    assert a_peak[:5].min() == 1.0 and a_peak[5:].max() < 0.5                  # 32x uniform saturates; rest below
    assert np.allclose(absolute(np.array([-2.0, 0.0, 2.0]), attention=False), 1 / (1 + np.exp([2.0, 0.0, -2.0])))


def test_ensemble_on_the_absolute_scale_and_the_labels_say_what_they_show():
    torch.manual_seed(0)
    model = models.create("abmil", 8, 2).eval()
    feats = np.random.default_rng(1).normal(size=(50, 8)).astype(np.float32)
    per_fold, ens, _ = ensemble_scores([(model, {})], feats, "attention", ["a", "b"], "absolute")
    np.testing.assert_allclose(ens, absolute(per_fold[0], attention=True))
    assert "same scale on every slide" in scale_label("attention", "absolute", True)
    assert "within this slide" in scale_label("attention", "percentile", True)
    assert "--normalise absolute" in scale_label("attention", "percentile", True)


def test_sequence_models_carry_a_note_that_their_scores_are_not_spatial():
    assert "patch-list order" in models.create("transmil", 8, 2).scores_note
    assert "scan" in models.create("mambamil", 8, 2).scores_note
    assert models.create("abmil", 8, 2).scores_note is None


def test_logits_are_not_mistaken_for_attention_on_the_absolute_scale():
    from slidemil.explain.scores import is_distribution

    assert is_distribution(np.full(10, 0.1)) and not is_distribution(np.array([-1.0, 2.0, 0.5]))
    assert not is_distribution(np.array([0.2, 0.3]))             # non-negative but not summing to 1: logits
