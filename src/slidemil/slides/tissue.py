"""Tissue segmentation on a low-resolution level, QC thumbnails, and QuPath-compatible GeoJSON.

Classical pipeline (as CLAM's, with physical units): HSV saturation -> median blur -> threshold
(Otsu by default) -> morphological closing -> fill holes smaller than `max_hole_um2` -> drop objects
smaller than `min_area_um2`. Pen ink (blue/green hues) and near-black pixels (marker, dust, folds)
are removed before thresholding. The GeoJSON is the hand-off between stages: `slidemil patch` reads
it back, so contours edited in QuPath are used as they are.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from pydantic import BaseModel, ConfigDict, Field
from scipy import ndimage as ndi
from skimage import color, draw, filters, measure, morphology

from slidemil.errors import InputError
from slidemil.slides.reader import Slide, read_scaled, require_mpp
from slidemil.utils.io import atomic_path, write_text


class TissueConfig(BaseModel):
    """Settings of the segmentation stage (`slidemil segment`; YAML keys = field names)."""

    model_config = ConfigDict(extra="forbid")

    seg_mpp: float = Field(8.0, gt=0, description="Segmentation resolution in µm/px.")
    threshold: str = Field("otsu", description="otsu, or a saturation threshold in [0, 1].")
    min_saturation: float = Field(0.04, description="Floor of Otsu's threshold (blank slides stay blank).")
    median: int = Field(7, description="Median filter size in mask pixels.")
    close: int = Field(4, description="Closing disk radius in mask pixels.")
    min_area_um2: float = Field(20000.0, description="Drop tissue objects smaller than this (µm²).")
    max_hole_um2: float = Field(10000.0, description="Fill holes smaller than this (µm²).")
    filter_pen: bool = Field(True, description="Remove pen ink and dark artefacts before thresholding.")
    pen_hue: tuple[float, float] = Field((0.15, 0.67), description="Hue range of pen ink (green to blue; H&E "
                                                                   "stains sit at pink/purple hues).")
    dark_value: float = Field(0.12, description="HSV value below which a pixel is an artefact, not tissue.")


@dataclass
class TissueMask:
    mask: np.ndarray      # bool [h, w] on the segmentation grid
    downsample: float     # level-0 pixels per mask pixel
    thumbnail: np.ndarray  # RGB of the segmentation grid

    @property
    def fraction(self) -> float:
        return float(self.mask.mean())


def segmentation_image(slide: Slide, seg_mpp: float) -> tuple[np.ndarray, float]:
    """RGB of the whole slide at about `seg_mpp`, read from the best level and resized."""
    mpp0 = require_mpp(slide)
    downsample = max(1.0, seg_mpp / mpp0)
    level = slide.best_level_for_downsample(downsample)
    w0, h0 = slide.dimensions
    w, h = max(1, int(round(w0 / downsample))), max(1, int(round(h0 / downsample)))
    img = np.array(read_scaled(slide, 0, 0, level, *slide.level_dimensions[level], w, h))
    return img, w0 / w


def segment_tissue(slide: Slide, params: TissueConfig | None = None) -> TissueMask:
    p = params or TissueConfig()
    img, downsample = segmentation_image(slide, p.seg_mpp)
    hsv = color.rgb2hsv(img)
    sat = ndi.median_filter(hsv[..., 1], size=p.median)
    artefact = np.zeros(sat.shape, bool)
    if p.filter_pen:
        hue, s, v = hsv[..., 0], hsv[..., 1], hsv[..., 2]
        artefact |= (hue > p.pen_hue[0]) & (hue < p.pen_hue[1]) & (s > 0.2)
        artefact |= v < p.dark_value
        artefact = morphology.dilation(artefact, morphology.disk(2))
    if p.threshold == "otsu":
        usable = sat[~artefact]
        thr = filters.threshold_otsu(usable) if usable.size and np.ptp(usable) > 0 else 1.0
        thr = max(thr, p.min_saturation)
    else:
        thr = float(p.threshold)
    mask = (sat > thr) & ~artefact
    if p.close > 0:
        mask = morphology.closing(mask, morphology.disk(p.close))
    px_area = (p.seg_mpp if slide.mpp is None else slide.mpp * downsample) ** 2
    mask = morphology.remove_small_holes(mask, max_size=max(1, int(p.max_hole_um2 / px_area)))
    mask = morphology.remove_small_objects(mask, max_size=max(1, int(p.min_area_um2 / px_area)))
    return TissueMask(mask, downsample, img)


def mask_to_geojson(tissue: TissueMask, name: str = "Tissue") -> dict:
    """Polygons (with holes) in level-0 pixel coordinates, as QuPath annotations."""
    features = []
    labels = measure.label(tissue.mask, connectivity=2)
    for region in measure.regionprops(labels):
        obj = labels == region.label
        rings = [_ring(ndi.binary_fill_holes(obj), tissue.downsample)]
        holes = measure.label(ndi.binary_fill_holes(obj) & ~obj, connectivity=1)
        for h in range(1, holes.max() + 1):
            ring = _ring(holes == h, tissue.downsample)
            if len(ring) >= 4:
                rings.append(ring)
        if len(rings[0]) < 4:
            continue
        features.append({"type": "Feature",
                         "geometry": {"type": "Polygon", "coordinates": rings},
                         "properties": {"objectType": "annotation", "classification": {"name": name},
                                        "area_px": float(region.area * tissue.downsample**2)}})
    return {"type": "FeatureCollection", "features": features}


def _ring(obj: np.ndarray, downsample: float) -> list[list[float]]:
    padded = np.pad(obj, 1)
    contours = measure.find_contours(padded.astype(np.uint8), 0.5)
    if not contours:
        return []
    c = max(contours, key=len) - 1  # undo the padding
    c = measure.approximate_polygon(c, tolerance=0.75)
    # mask pixel (r, c) covers level-0 [c*ds, (c+1)*ds): its centre is (c + 0.5) * ds
    ring = [[float((x + 0.5) * downsample), float((y + 0.5) * downsample)] for y, x in c]
    if ring[0] != ring[-1]:
        ring.append(ring[0])
    return ring


def geojson_polygons(geo) -> list:
    """The polygons (lists of rings, level-0 px) of a GeoJSON as QuPath, slidemil or other tools write it: a
    FeatureCollection, a JSON array of Features (QuPath's export without "FeatureCollection"), one Feature, or
    a bare Polygon / MultiPolygon geometry."""
    if isinstance(geo, list):
        features = geo
    elif isinstance(geo, dict) and (geo.get("type") == "FeatureCollection" or "features" in geo):
        features = geo.get("features") or []
    elif isinstance(geo, dict) and geo.get("type") in ("Polygon", "MultiPolygon"):
        features = [{"geometry": geo}]
    else:
        features = [geo]
    polys = []
    for feat in features:
        geom = (feat.get("geometry") if isinstance(feat, dict) else None) or {}
        polys += ([geom["coordinates"]] if geom.get("type") == "Polygon"
                  else geom.get("coordinates", []) if geom.get("type") == "MultiPolygon" else [])
    return polys


def geojson_to_mask(geo, shape: tuple[int, int], downsample: float) -> np.ndarray:
    """Rasterise Polygon / MultiPolygon features (level-0 px) onto a grid of `shape` at `downsample`."""
    mask = np.zeros(shape, bool)
    for rings in geojson_polygons(geo):
            for i, ring in enumerate(rings):
                pts = np.asarray(ring, float) / downsample - 0.5
                rr, cc = draw.polygon(pts[:, 1], pts[:, 0], shape)
                mask[rr, cc] = i == 0  # exterior fills, holes clear
    return mask


def load_tissue_geojson(path: str | os.PathLike, slide: Slide, seg_mpp: float) -> TissueMask:
    path = Path(path)
    try:
        geo = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: not a readable GeoJSON file ({exc})") from exc
    if not geojson_polygons(geo):
        raise InputError(f"{path}: holds no Polygon or MultiPolygon; draw the tissue as areas (QuPath: brush, "
                         "polygon or wand annotations), not points or lines")
    img, downsample = segmentation_image(slide, seg_mpp)
    return TissueMask(geojson_to_mask(geo, img.shape[:2], downsample), downsample, img)


def draw_qc(tissue: TissueMask, geo: dict, coords: np.ndarray | None = None, patch_size0: int | None = None) -> Image.Image:
    """Thumbnail with tissue contours (green), holes (blue) and, when given, patch outlines (grey)."""
    im = Image.fromarray(tissue.thumbnail).convert("RGB")
    pen = ImageDraw.Draw(im)
    ds = tissue.downsample
    if coords is not None and patch_size0:
        for x, y in coords:
            pen.rectangle([x / ds, y / ds, (x + patch_size0) / ds, (y + patch_size0) / ds], outline=(90, 90, 90))
    for feat in geo["features"]:
        for i, ring in enumerate(feat["geometry"]["coordinates"]):
            pts = [(x / ds, y / ds) for x, y in ring]
            pen.line(pts, fill=(0, 200, 0) if i == 0 else (0, 0, 255), width=2)
    return im


def save_segmentation(folder: Path, slide_id: str, tissue: TissueMask, geo: dict, params: TissueConfig,
                      source: dict | None = None) -> None:
    """`<id>.geojson` and its QC picture; `source` (what the contours were made from) is kept in the GeoJSON's
    properties, so that a rerun made otherwise segments again."""
    from slidemil.utils.io import safe_child

    folder.mkdir(parents=True, exist_ok=True)
    geo = dict(geo, properties={"slide_id": slide_id, "downsample": tissue.downsample,
                                "params": params.model_dump(mode="json"), "source": source})
    # the QC picture first: the GeoJSON marks the stage complete, so a stop between the two (a full disk)
    # leaves the slide to be segmented again
    with atomic_path(safe_child(folder, slide_id, "_qc.png")) as tmp:
        draw_qc(tissue, geo).save(tmp, format="PNG")
    write_text(safe_child(folder, slide_id, ".geojson"), json.dumps(geo))
