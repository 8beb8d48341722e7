"""TileStream: the tiles of slide after slide, identical to PatchDataset's, from workers started once."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from slidemil.slides.reader import SlideReadError
from slidemil.slides.tiles import PatchDataset, TileStream


def _invert(tile):
    return 255 - tile


@pytest.mark.parametrize("workers", [0, 2])
def test_stream_gives_each_slides_tiles_in_order_from_the_same_workers(slide_cohort, workers):
    paths = sorted((slide_cohort / "slides").glob("*.tif"))[:3]
    rng = np.random.default_rng(0)
    stream = TileStream(batch_size=5, num_workers=workers)
    pids = []
    for path in paths:
        coords = rng.integers(0, 1024, size=(12, 2))
        ds = PatchDataset(path, coords, 256, 64, transform=_invert if path == paths[1] else None)   # per slide
        got = torch.cat(list(stream.batches(ds)))
        torch.testing.assert_close(got, torch.stack([ds[i] for i in range(len(ds))]), rtol=0, atol=0)
        if workers:
            pids.append([w.pid for w in stream.loader._iterator._workers])
    if workers:
        assert pids[0] == pids[1] == pids[2] and len(pids[0]) == 2     # started once, for all slides


def test_a_broken_slide_raises_and_the_next_slide_still_streams(slide_cohort, tmp_path):
    good = sorted((slide_cohort / "slides").glob("*.tif"))[0]
    bad = tmp_path / "bad.tif"
    bad.write_bytes(b"not a tiff at all")
    stream = TileStream(batch_size=4, num_workers=1)
    coords = np.array([[0, 0], [256, 256], [512, 0]])
    with pytest.raises(SlideReadError, match="bad.tif"):     # re-raised from the worker, naming the file
        list(stream.batches(PatchDataset(bad, coords, 256, 32)))
    ds = PatchDataset(good, coords, 256, 32)
    torch.testing.assert_close(torch.cat(list(stream.batches(ds))), torch.stack([ds[i] for i in range(3)]))


def test_an_unpicklable_transform_is_an_error_not_a_hang(slide_cohort):
    path = sorted((slide_cohort / "slides").glob("*.tif"))[0]
    stream = TileStream(batch_size=4, num_workers=1)
    with pytest.raises(TypeError, match="cannot be sent to worker processes"):
        stream.batches(PatchDataset(path, np.array([[0, 0]]), 256, 32, transform=lambda t: t))
