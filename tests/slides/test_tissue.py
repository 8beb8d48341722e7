"""Tissue segmentation: recovers the true mask, ignores pen, round-trips GeoJSON in level-0 pixels."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image, ImageDraw

from conftest import SLIDE_SIZE, tissue_truth
from slidemil.slides.reader import open_slide
from slidemil.slides.synthetic import MASK_DOWNSAMPLE, render_slide, write_pyramidal_tiff
from slidemil.slides.tissue import TissueConfig, TissueMask, geojson_to_mask, mask_to_geojson, segment_tissue


def test_segmentation_recovers_tissue_mask(slide_cohort):
    for sid in ("P000_S0", "P001_S0", "P002_S0"):
        tissue = segment_tissue(open_slide(slide_cohort / "slides" / f"{sid}.tif"))
        truth = tissue_truth(slide_cohort, sid, "tissue")
        assert tissue.downsample == MASK_DOWNSAMPLE and tissue.mask.shape == truth.shape
        iou = (tissue.mask & truth).sum() / (tissue.mask | truth).sum()
        assert iou >= 0.9, f"{sid}: IoU {iou:.3f}"


def test_pen_marks_are_not_tissue(tmp_path):
    img, tissue_true, _ = render_slide(np.random.default_rng(2), SLIDE_SIZE)
    pil = Image.fromarray(img)
    draw = ImageDraw.Draw(pil)
    draw.line([(50, 100), (1900, 120)], fill=(30, 60, 200), width=140)   # blue pen across the background
    draw.ellipse([1750, 1250, 1980, 1480], fill=(20, 140, 60))          # green dot
    path = write_pyramidal_tiff(tmp_path / "pen.tif", np.asarray(pil), 0.5)
    tissue = segment_tissue(open_slide(path))
    ink = np.zeros_like(tissue_true)
    ink[30 // 16:190 // 16, 4:118] = True
    ink &= ~tissue_true
    assert not (tissue.mask & ink).any()
    off = segment_tissue(open_slide(path), TissueConfig(filter_pen=False))
    assert (off.mask & ink).sum() > 20, "the test's ink should look like tissue without the filter"


def test_geojson_roundtrip_in_level0_pixels(slide_cohort):
    tissue = segment_tissue(open_slide(slide_cohort / "slides" / "P000_S0.tif"))
    geo = mask_to_geojson(tissue)
    json.dumps(geo)
    assert geo["type"] == "FeatureCollection" and geo["features"]
    for feat in geo["features"]:
        assert feat["geometry"]["type"] == "Polygon" and feat["properties"]["objectType"] == "annotation"
        ring = np.asarray(feat["geometry"]["coordinates"][0])
        assert ring.min() >= 0 and ring[:, 0].max() <= SLIDE_SIZE[1] and ring[:, 1].max() <= SLIDE_SIZE[0]
        assert (ring[0] == ring[-1]).all()
    back = geojson_to_mask(geo, tissue.mask.shape, tissue.downsample)
    assert (back & tissue.mask).sum() / (back | tissue.mask).sum() > 0.97


def test_hand_edited_contours_in_every_shape_qupath_exports(tmp_path):
    """QuPath's GeoJSON export without "Export as FeatureCollection" is a JSON array of Features: it failed as
    "AttributeError: 'list' object has no attribute 'get'"; a bare geometry gave an empty mask and "no tissue
    found"; points or lines drawn by mistake the same. Every shape now gives the same mask, or one clear line."""
    from slidemil.errors import InputError
    from slidemil.slides.tissue import load_tissue_geojson

    square = {"type": "Polygon", "coordinates": [[[40, 40], [200, 40], [200, 200], [40, 200], [40, 40]]]}
    feature = {"type": "Feature", "geometry": square, "properties": {"objectType": "annotation"}}
    shapes = [{"type": "FeatureCollection", "features": [feature]}, [feature], feature, square,
              {"type": "MultiPolygon", "coordinates": [square["coordinates"]]}]
    masks = [geojson_to_mask(geo, (64, 64), 4.0) for geo in shapes]
    assert masks[0].sum() == 40 * 40
    assert all((m == masks[0]).all() for m in masks)
    points = tmp_path / "points.geojson"
    points.write_text(json.dumps([{"type": "Feature", "geometry": {"type": "Point", "coordinates": [5, 5]}}]))
    with pytest.raises(InputError, match="holds no Polygon or MultiPolygon; draw the tissue as areas"):
        load_tissue_geojson(points, None, 8.0)


def test_a_slide_without_a_pyramid_is_segmented_in_bounded_reads(tmp_path, monkeypatch):
    """A single-level slide (exported without a pyramid) was read whole for its thumbnail: a 24k x 24k one
    peaked at 4.8 GB, a 100k x 80k one would be killed with the whole batch. Now it is read and shrunk in
    blocks of at most MAX_READ_PIXELS, and the mask is the one a whole read gives."""
    from slidemil.slides import reader

    img, tissue_true, _ = render_slide(np.random.default_rng(3), SLIDE_SIZE)
    path = write_pyramidal_tiff(tmp_path / "flat.tif", img, 0.5, downsamples=(1,))
    whole = segment_tissue(open_slide(path))
    slide = open_slide(path)
    assert slide.level_count == 1
    areas, read = [], slide.read_image
    monkeypatch.setattr(slide, "read_image", lambda *a: areas.append(a[3] * a[4]) or read(*a))
    monkeypatch.setattr(reader, "MAX_READ_PIXELS", 2**18)
    blocks = segment_tissue(slide)
    assert len(areas) > 4 and max(areas) <= 2**18 and sum(areas) == SLIDE_SIZE[0] * SLIDE_SIZE[1]
    assert blocks.mask.shape == whole.mask.shape == tissue_true.shape
    assert np.abs(blocks.thumbnail.astype(int) - whole.thumbnail).mean() < 2
    assert (blocks.mask != whole.mask).mean() < 0.005


def test_a_whole_slide_read_into_a_few_pixels_stays_bounded(tmp_path, monkeypatch):
    """The viewer's coarsest Deep Zoom levels shrink a whole single-level slide into one tile: one output
    pixel then spans more level pixels than a block may hold, and the read was the whole slide at once
    (`view` peaked at 4.6 GB on a 24k x 24k slide). It is now shrunk in two steps, each block bounded."""
    from slidemil.slides import reader

    img, _, _ = render_slide(np.random.default_rng(4), SLIDE_SIZE)
    slide = open_slide(write_pyramidal_tiff(tmp_path / "flat.tif", img, 0.5, downsamples=(1,)))
    areas, read = [], slide.read_image
    monkeypatch.setattr(slide, "read_image", lambda *a: areas.append(a[3] * a[4]) or read(*a))
    monkeypatch.setattr(reader, "MAX_READ_PIXELS", 2**14)
    w, h = slide.dimensions
    small = np.asarray(reader.read_scaled(slide, 0, 0, 0, w, h, 4, 3), float)
    assert small.shape == (3, 4, 3) and max(areas) <= 2**14
    direct = np.asarray(Image.fromarray(img).resize((4, 3), Image.BILINEAR), float)
    assert np.abs(small - direct).mean() < 8


def test_a_hole_in_tissue_stays_out_through_geojson():
    """A ring of tissue around a lumen (or a region a pathologist cut out of an annotation in QuPath): the
    hole is an inner ring of the polygon, and rasterised back it is not tissue."""
    mask = np.zeros((60, 60), bool)
    mask[10:50, 10:50] = True
    mask[22:38, 22:38] = False                                          # the hole
    geo = mask_to_geojson(TissueMask(mask, 8.0, np.zeros((*mask.shape, 3), np.uint8)))
    rings = geo["features"][0]["geometry"]["coordinates"]
    assert len(geo["features"]) == 1 and len(rings) == 2
    back = geojson_to_mask(geo, mask.shape, 8.0)
    assert not back[24:36, 24:36].any() and back[12:20, 12:48].all()
    assert (back != mask).mean() < 0.02


def test_a_blank_slide_has_no_tissue(tmp_path):
    """Glass only, with a faint uneven tint (up to 6 grey levels, as an unevenly lit scan): Otsu's method
    splits any histogram in two, so without its floor (`min_saturation`) a third of this slide became
    "tissue" and was patched."""
    rng = np.random.default_rng(0)
    img = np.clip(235 + rng.normal(0, 3, (*SLIDE_SIZE, 3)), 0, 255)
    ramp = np.linspace(0, 6, SLIDE_SIZE[1])[None, :]
    img[..., 0] -= ramp
    img[..., 1] -= ramp / 2
    slide = open_slide(write_pyramidal_tiff(tmp_path / "blank.tif", np.clip(img, 0, 255).astype(np.uint8), 0.5))
    assert segment_tissue(slide).mask.sum() == 0
    assert segment_tissue(slide, TissueConfig(min_saturation=0)).mask.mean() > 0.2   # the floor is what holds
