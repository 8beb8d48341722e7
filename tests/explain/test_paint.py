"""Painting scores onto the thumbnail grid: exact footprints and within-slide normalisation."""

from __future__ import annotations

import numpy as np
import pytest

from slidemil.explain.paint import normalise, paint


@pytest.mark.parametrize("downsample,size0,stride", [(16, 256, 256), (8, 512, 384), (5.3, 224, 112), (32, 1000, 500),
                                                      (2.5, 96, 80)])
def test_one_hot_patch_lands_on_its_footprint(downsample, size0, stride):
    xs = np.arange(0, 8000 - size0, stride)
    ys = np.arange(0, 6000 - size0, stride)
    gx, gy = np.meshgrid(xs, ys)
    coords = np.stack([gx.ravel(), gy.ravel()], 1)
    hot = len(coords) // 2 + 3
    values = np.zeros(len(coords))
    values[hot] = 1.0
    shape = (int(np.ceil(6000 / downsample)), int(np.ceil(8000 / downsample)))
    field, covered = paint(coords, values, size0, downsample, shape)
    x, y = coords[hot]
    r0, r1 = int(round(y / downsample)), int(round((y + size0) / downsample))
    c0, c1 = int(round(x / downsample)), int(round((x + size0) / downsample))
    footprint = np.zeros(shape, bool)
    footprint[r0:r1, c0:c1] = True
    assert np.array_equal(np.nan_to_num(field) > 0, footprint)
    # overlap averaging against a direct reference (each patch's rectangle summed with slicing): every pixel
    # holds the mean of the patches covering it, 1 / (patches covering) on the hot footprint, NaN uncovered
    total, count = np.zeros(shape), np.zeros(shape)
    for (px, py), v in zip(coords, values):
        rows = slice(int(round(py / downsample)), int(round((py + size0) / downsample)))
        cols = slice(int(round(px / downsample)), int(round((px + size0) / downsample)))
        total[rows, cols] += v
        count[rows, cols] += 1
    assert np.array_equal(covered, count > 0)
    assert np.allclose(field[covered], total[covered] / count[covered]) and np.isnan(field[~covered]).all()
    if stride < size0:            # overlapping grids: the hot footprint is shared, so its values fall below 1
        assert field[footprint].min() < 1.0 and np.isclose(field[footprint].max(), 1.0 / count[footprint].min())
    else:
        assert (field[footprint] == 1.0).all()


def test_normalisation():
    s = np.array([5.0, 1.0, 3.0, 100.0])
    assert np.allclose(normalise(s, "percentile"), [2 / 3, 0, 1 / 3, 1])
    assert np.allclose(normalise(s, "minmax"), (s - 1) / 99)


def test_tied_scores_get_one_colour():
    """max_pool's share and a saturated attention give many patches the same score: ranked in file order
    they were painted as a ramp of colours, a structure the model never saw. Ties share their mean rank."""
    scores = np.array([0.0, 0.0, 0.0, 0.0, 1.0, 0.5])
    ranks = normalise(scores)
    assert len(set(ranks[:4])) == 1 and ranks[4] == 1.0 and ranks[:4].max() < ranks[5] < ranks[4]


def test_the_negative_class_of_a_one_logit_model_is_painted_by_the_negated_logit():
    """DSMIL and the max poolings keep one instance logit for two classes (evidence for the positive class):
    `--score class:<negative>` must paint its opposite, or the map of the negative class is the positive's."""
    import torch

    from slidemil.explain.scores import select_scores
    from slidemil.models.base import MILOutput

    logit = torch.tensor([[[2.0, -1.0, 0.5]]])                          # [B, 1, N]
    out = MILOutput(torch.tensor([[0.0, 1.0]]), None, {"instance_logits": logit})
    pos = select_scores(out, "class:tumour", ["normal", "tumour"])
    neg = select_scores(out, "class:normal", ["normal", "tumour"])
    np.testing.assert_allclose(pos, [2.0, -1.0, 0.5])
    np.testing.assert_allclose(neg, [-2.0, 1.0, -0.5])
