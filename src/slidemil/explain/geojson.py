"""QuPath GeoJSON of a heatmap: one detection per patch with its score, plus outlines of high-score regions."""

from __future__ import annotations

import numpy as np

from slidemil.slides.tissue import TissueMask, mask_to_geojson


def heatmap_geojson(coords: np.ndarray, size0: float, ensemble: np.ndarray, raw: np.ndarray, field: np.ndarray,
                    shown: np.ndarray, tissue: TissueMask, high_quantile: float) -> dict:
    """Feature collection in level-0 pixels: a detection per patch (its square, `score` = normalised
    ensemble, `raw_score` = mean raw fold score) and annotations outlining the regions whose normalised
    score is at least `high_quantile`."""
    feats = []
    for (x, y), s, r in zip(coords.tolist(), ensemble.tolist(), raw.tolist()):
        ring = [[x, y], [x + size0, y], [x + size0, y + size0], [x, y + size0], [x, y]]
        feats.append({"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring]},
                      "properties": {"objectType": "detection", "classification": {"name": "Patch"},
                                     "measurements": {"score": s, "raw_score": r}}})
    high = TissueMask(shown & (np.nan_to_num(field) >= high_quantile), tissue.downsample, tissue.thumbnail)
    feats.extend(mask_to_geojson(high, name="High score")["features"])
    return {"type": "FeatureCollection", "features": feats}
