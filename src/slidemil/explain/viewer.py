"""`slidemil view`: a static, zoomable page of a run's slides with their heatmaps (no server, no network).

For each slide with a heatmap (`<id>_scores.h5` from `slidemil heatmap`) it writes a Deep Zoom image
(`<id>.dzi` + `<id>_files/<level>/<col>_<row>.jpeg`, the format OpenSeadragon reads, so the tiles open in
any DZI viewer too), the patch scores as one RGBA overlay PNG (one cell per patch, transparent off the
scored patches) and the top-scoring tiles. `index.html` + `viewer.js` (package data, plain JavaScript, one
canvas) pan, zoom, fade the overlay and jump to a top tile; `slides.js` lists the slides (a script, not a
JSON fetch, so the page works from file://).

The full image is the slide at `max_mpp` (level-0 pixels / scale), so a 40x slide is not tiled at
0.25 µm/px unless asked: tiles grow 4x per halving of `max_mpp`. The levels and tiles: `deepzoom`.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from importlib import resources
from pathlib import Path
from typing import Optional

import h5py
import numpy as np
import pandas as pd
from matplotlib import colormaps
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from slidemil.errors import InputError
from slidemil.explain.deepzoom import OVERLAP, dzi_levels, write_tiles
from slidemil.explain.paint import paint
from slidemil.explain.scores import is_distribution, scale_label
from slidemil.rundir import RunDir
from slidemil.slides.reader import open_slide, slide_files
from slidemil.utils.io import atomic_path, safe_child, write_csv, write_text

log = logging.getLogger(__name__)

ASSETS = ("index.html", "viewer.js")


class ViewerOptions(BaseModel):
    """Settings of `slidemil view` (flag help and defaults come from here)."""

    model_config = ConfigDict(extra="forbid")

    max_mpp: float = Field(1.0, gt=0, description="Finest resolution tiled, in µm/px (1.0 ~ 10x); each halving "
                                                  "writes ~4x more tiles.")
    tile_size: int = Field(254, ge=64, le=2048, description="Deep Zoom tile side in pixels (plus 1 px overlap).")
    quality: int = Field(85, ge=10, le=100, description="JPEG quality of the tiles.")
    cmap: str = Field("jet", description="Matplotlib colour map of the overlay.")
    alpha: float = Field(0.5, ge=0, le=1, description="Initial overlay opacity (a slider on the page changes it).")
    top_k: int = Field(8, ge=1, description="Top-scoring tiles listed beside the slide.")
    mpp: Optional[float] = Field(None, gt=0, description="Level-0 mpp when the slides lack it.")
    allow_failures: bool = Field(False, description="Exit 0 when some slides failed (never when all did).")


def default_folders(run: RunDir, slides_dir: str | Path) -> tuple[Path, Path]:
    """(heatmaps, viewer) of `run` for the slides in `slides_dir`: heatmaps/ and viewer/, or, for another
    cohort's slides that `heatmap` painted into external/<slide folder>_heatmaps, that folder and its viewer."""
    cohort = Path(slides_dir).resolve().name
    painted = run.external_cohort_dir(cohort, "heatmaps")
    if painted.is_dir():
        # both exist: the run's own heatmaps win if one is of a slide here (TCGA's <id>.<UUID>.svs names too)
        own = heatmap_ids(run.heatmaps_dir)
        if not set(own) & set(slide_files(slides_dir, own)):
            return painted, run.external_cohort_dir(cohort, "viewer")
    return run.heatmaps_dir, run.viewer_dir


def heatmap_ids(folder: Path) -> list[str]:
    """The slide ids with a heatmap (`<id>_scores.h5`) in `folder`."""
    return sorted(p.name[: -len("_scores.h5")] for p in Path(folder).glob("*_scores.h5"))


class SlideViewer:
    """The viewer folder of one run: tiles, overlays and the page."""

    def __init__(self, slides_dir: str | Path, heatmaps: str | Path, out: str | Path, opts: ViewerOptions | None = None):
        self.heatmaps, self.out, self.o = Path(heatmaps), Path(out), opts or ViewerOptions()
        if not self.heatmaps.is_dir():
            raise InputError(f"{self.heatmaps}: no heatmap folder; run `slidemil heatmap RUN --slides ...` first")
        if self.o.cmap not in colormaps:
            raise InputError(f"--cmap {self.o.cmap!r} is not a matplotlib colour map (e.g. jet, viridis, inferno)")
        self.slides = slide_files(slides_dir, self.default_ids())

    def default_ids(self) -> list[str]:
        return heatmap_ids(self.heatmaps)

    # --- one slide ---------------------------------------------------------------------------------
    def make(self, slide_id: str) -> dict:
        """Tiles, overlay and the slide's entry (`<id>.json`, written last: a rerun skips a finished slide)."""
        entry_path = safe_child(self.out, slide_id, ".json")
        scores_path = safe_child(self.heatmaps, slide_id, "_scores.h5")
        if not scores_path.is_file():
            raise InputError(f"{slide_id}: no {scores_path.name} in {self.heatmaps}; run `slidemil heatmap` on it")
        made_from = {**self._tiling(), "scores_mtime_ns": scores_path.stat().st_mtime_ns}   # a new heatmap: redo
        if entry_path.is_file():
            entry = json.loads(entry_path.read_text())
            if entry.get("options") == made_from:
                return entry
        if slide_id not in self.slides:
            raise InputError(f"{slide_id}: no slide file in the slide folder")
        with h5py.File(scores_path) as fh:
            coords, ensemble = fh["coords"][()], fh["ensemble"][()].astype(np.float64)
            size0, attrs = float(fh.attrs["patch_size_level0"]), dict(fh.attrs)
            attention = is_distribution(fh["fold_scores"][0])
        slide = open_slide(self.slides[slide_id], mpp=self.o.mpp)
        try:
            w0, h0 = slide.dimensions
            scale = max(1.0, self.o.max_mpp / slide.mpp) if slide.mpp else max(1.0, max(w0, h0) / 32768)
            width, height = math.ceil(w0 / scale), math.ceil(h0 / scale)
            self._tiles(slide, slide_id, scale, width, height)
        finally:
            slide.close()
        self._overlay(slide_id, coords, ensemble, size0, (h0, w0))
        order = np.argsort(-ensemble)[: self.o.top_k]
        entry = {
            "id": slide_id, "width": width, "height": height, "tile": self.o.tile_size, "overlap": OVERLAP,
            "format": "jpeg", "levels": len(dzi_levels(width, height)), "scale": scale,
            "mpp": slide.mpp * scale if slide.mpp else None, "overlay": f"{slide_id}_overlay.png",
            "overlay_cell": size0 / 2 / scale,
            "scale_label": scale_label(str(attrs.get("score", "attention")), str(attrs.get("normalise", "percentile")),
                                       attention),
            "top": [{"x": float(coords[i, 0] / scale), "y": float(coords[i, 1] / scale), "size": size0 / scale,
                     "score": round(float(ensemble[i]), 4)} for i in order],
            "options": made_from}
        write_text(entry_path, json.dumps(entry))
        return entry

    def _tiling(self) -> dict:
        return {"max_mpp": self.o.max_mpp, "tile_size": self.o.tile_size, "quality": self.o.quality,
                "cmap": self.o.cmap, "mpp": self.o.mpp}

    def _tiles(self, slide, slide_id: str, scale: float, width: int, height: int) -> None:
        """Every level's tiles (one pass over the slide, `deepzoom.write_tiles`), then the .dzi."""
        t = self.o.tile_size
        files = safe_child(self.out, slide_id, "_files")
        shutil.rmtree(files, ignore_errors=True)
        write_tiles(slide, files, scale, width, height, t, self.o.quality)
        dzi = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Image xmlns="http://schemas.microsoft.com/deepzoom/2008" '
               f'Format="jpeg" Overlap="{OVERLAP}" TileSize="{t}"><Size Width="{width}" Height="{height}"/></Image>\n')
        write_text(safe_child(self.out, slide_id, ".dzi"), dzi)

    def _overlay(self, slide_id: str, coords, ensemble, size0: float, shape0: tuple[int, int]) -> None:
        """The scores as RGBA, one cell per half patch over the whole slide, transparent where no patch is."""
        cell = size0 / 2
        shape = (max(1, math.ceil(shape0[0] / cell)), max(1, math.ceil(shape0[1] / cell)))
        field, covered = paint(coords, ensemble, size0, cell, shape)
        rgba = (colormaps[self.o.cmap](np.clip(np.nan_to_num(field), 0, 1)) * 255).astype(np.uint8)
        rgba[..., 3] = np.where(covered, 255, 0)
        with atomic_path(safe_child(self.out, slide_id, "_overlay.png")) as tmp:
            Image.fromarray(rgba, "RGBA").save(tmp, format="PNG")

    # --- the page ----------------------------------------------------------------------------------
    def make_all(self, slide_ids: list[str] | None = None, title: str = "slidemil viewer") -> pd.DataFrame:
        """Every slide (one failure never stops the others: viewer.csv says why), then the page."""
        ids = slide_ids or self.default_ids()
        if not ids:
            raise InputError(f"{self.heatmaps}: no heatmap (*_scores.h5); run `slidemil heatmap RUN --slides ...` first")
        self.out.mkdir(parents=True, exist_ok=True)
        rows, entries = [], []
        for sid in ids:
            try:
                entries.append(self.make(sid))
                rows.append({"slide_id": sid, "status": "done", "error": ""})
            except Exception as exc:  # one slide never stops the others
                msg = str(exc) if isinstance(exc, InputError) else f"{type(exc).__name__}: {exc}"
                log.warning("viewer tiles of %s failed: %s", sid, msg)
                rows.append({"slide_id": sid, "status": "failed", "error": msg})
        table = pd.DataFrame(rows, columns=["slide_id", "status", "error"])
        write_csv(self.out / "viewer.csv", table)
        if entries:
            for name in ASSETS:
                write_text(self.out / name, resources.files("slidemil.explain").joinpath(f"templates/{name}")
                           .read_text("utf-8"))
            stops = [colormaps[self.o.cmap](v / 10) for v in range(11)]      # the colour bar's gradient
            data = {"title": title, "alpha": self.o.alpha, "cmap": self.o.cmap, "slides": entries,
                    "colorbar": [f"rgb({r * 255:.0f},{g * 255:.0f},{b * 255:.0f})" for r, g, b, _ in stops]}
            write_text(self.out / "slides.js", "window.SLIDEMIL_VIEWER = " + json.dumps(data) + ";\n")
        return table
