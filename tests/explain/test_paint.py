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
    # overlap averaging: where the hot patch is alone the value is 1, elsewhere 1 / (patches covering)
    assert np.isclose(np.nanmax(field), 1.0 if stride == size0 else np.nanmax(field))
    assert np.nanmax(field) <= 1.0 and covered[footprint].all()


def test_normalisation():
    s = np.array([5.0, 1.0, 3.0, 100.0])
    assert np.allclose(normalise(s, "percentile"), [2 / 3, 0, 1 / 3, 1])
    assert np.allclose(normalise(s, "minmax"), (s - 1) / 99)
