"""A slide's Deep Zoom pyramid (`<id>.dzi` + `<id>_files/<level>/<col>_<row>.jpeg`) from one pass over it.

DZI levels (Deep Zoom spec): level L = ceil(log2(max(W, H))) is the full image, level l is
ceil(W / 2^(L-l)) x ceil(H / 2^(L-l)); tiles are `tile` square plus OVERLAP pixels on every side that has a
neighbour. The full image is read in bands of one tile row, from the slide's pyramid level nearest its
resolution; every coarser level is made of 2 x 2 means of the level above (as libvips' `dzsave` shrinks),
band by band, so each slide pixel is decoded once and memory holds a few bands per level. (Reading every
level from the slide decoded a slide without a pyramid once per level: 3x its pixels at 8k x 8k and more
on larger slides; docs/benchmarks.md.)
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image

from slidemil.slides.reader import read_scaled

OVERLAP = 1


def dzi_levels(width: int, height: int) -> list[tuple[int, int]]:
    """[(width, height)] of every Deep Zoom level, level 0 (1 x 1) first."""
    top = math.ceil(math.log2(max(width, height, 1)))
    return [(math.ceil(width / 2 ** (top - lv)), math.ceil(height / 2 ** (top - lv))) for lv in range(top + 1)]


class _Level:
    """One level, written as its rows arrive: a row of tiles once the rows it covers (with the overlap) are
    in; rows handed on in pairs to the next coarser level as their 2 x 2 means."""

    def __init__(self, folder: Path, size: tuple[int, int], tile: int, quality: int, coarser: _Level | None):
        self.folder, (self.w, self.h), self.t, self.quality, self.coarser = folder, size, tile, quality, coarser
        folder.mkdir(parents=True, exist_ok=True)
        self.rows = np.zeros((0, self.w, 3), np.uint8)    # image rows y0 .. y0 + len - 1 still needed
        self.y0, self.tile_row = 0, 0
        self.unpaired = self.rows                         # a last row waiting for its pair

    def add(self, rows: np.ndarray) -> None:
        self.rows = np.concatenate([self.rows, rows])
        self._write_ready()
        if self.coarser is not None:
            self._hand_on(np.concatenate([self.unpaired, rows]))

    def finish(self) -> None:
        if self.coarser is not None:
            if len(self.unpaired):                      # an odd last row pairs with itself
                self._hand_on(np.concatenate([self.unpaired, self.unpaired]))
            self.coarser.finish()
        if self.tile_row * self.t < self.h:
            raise RuntimeError(f"Deep Zoom level {self.folder.name}: {self.y0 + len(self.rows)} of {self.h} rows arrived")

    def _hand_on(self, rows: np.ndarray) -> None:
        self.unpaired = rows[len(rows) - len(rows) % 2:]
        rows = rows[:len(rows) - len(rows) % 2]
        if not len(rows):
            return
        # Pillow's 2 x 2 box means (an odd last column: the mean of its two pixels), in C
        self.coarser.add(np.asarray(Image.fromarray(rows).reduce(2)))

    def _write_ready(self) -> None:
        t, arrived = self.t, self.y0 + len(self.rows)
        while self.tile_row * t < self.h and arrived >= min((self.tile_row + 1) * t + OVERLAP, self.h):
            r = self.tile_row
            band = self.rows[max(r * t - OVERLAP, 0) - self.y0:min((r + 1) * t + OVERLAP, self.h) - self.y0]
            for col in range(math.ceil(self.w / t)):
                x0, x1 = max(col * t - OVERLAP, 0), min((col + 1) * t + OVERLAP, self.w)
                Image.fromarray(band[:, x0:x1]).save(self.folder / f"{col}_{r}.jpeg", quality=self.quality)
            self.tile_row += 1
            keep = (r + 1) * t - OVERLAP                  # the next tile row starts here
            self.rows, self.y0 = self.rows[keep - self.y0:], keep


def write_tiles(slide, files: Path, scale: float, width: int, height: int, tile: int, quality: int) -> None:
    """Every level's tiles under `files` (`<level>/<col>_<row>.jpeg`) of the slide shown at `width` x `height`
    (`scale` level-0 pixels per pixel)."""
    levels = dzi_levels(width, height)
    level = None
    for lv, size in enumerate(levels):                   # coarsest first: each level hands on to the one below
        level = _Level(files / str(lv), size, tile, quality, level)
    w0, h0 = slide.dimensions
    pyramid = slide.best_level_for_downsample(scale)
    ds = slide.level_downsamples[pyramid]
    for y in range(0, height, tile):
        rows, ly = min(tile, height - y), int(y * scale)
        rh = max(1, min(math.ceil(rows * scale / ds), math.ceil((h0 - ly) / ds)))
        band = read_scaled(slide, 0, ly, pyramid, max(1, math.ceil(w0 / ds)), rh, width, rows, reducing_gap=2.0)
        level.add(np.asarray(band.convert("RGB")))
    level.finish()
