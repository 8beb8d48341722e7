"""Seconds and slide pixels read to cut a slide's Deep Zoom tiles (`slidemil view`), beside one plain read
of the same slide at the finest level's resolution (the floor: every pixel decoded once), in one run; on a
slide without a pyramid and on the same slide with one.

    python benchmarks/viewer_tiles.py [--side 16384] [--out /tmp/viewer_bench]
"""

from __future__ import annotations

import argparse
import math
import shutil
import time
from pathlib import Path

import numpy as np

from slidemil.explain.viewer import SlideViewer, ViewerOptions
from slidemil.slides.reader import open_slide, read_scaled
from slidemil.slides.synthetic import render_slide, write_pyramidal_tiff

BAND = 1024     # rows per read of the floor


def counted(slide) -> list[int]:
    """Wrap the slide's reads so the pixels each one decodes are counted (at the level read)."""
    pixels, read = [], slide.read_image
    slide.read_image = lambda *a: pixels.append(a[3] * a[4]) or read(*a)
    return pixels


def floor(slide, scale: float) -> float:
    """Seconds to read the slide once at the finest level's resolution, in bands of BAND rows."""
    w0, h0 = slide.dimensions
    width, height = math.ceil(w0 / scale), math.ceil(h0 / scale)
    level = slide.best_level_for_downsample(scale)
    ds = slide.level_downsamples[level]
    t0 = time.perf_counter()
    for y in range(0, height, BAND):
        rows = min(BAND, height - y)
        ly = int(y * scale)
        read_scaled(slide, 0, ly, level, math.ceil(w0 / ds), max(1, min(math.ceil(rows * scale / ds),
                    math.ceil((h0 - ly) / ds))), width, rows)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--side", type=int, default=16384, help="slide side in pixels at 0.25 µm/px")
    ap.add_argument("--out", type=Path, default=Path("/tmp/viewer_bench"))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    img, _, _ = render_slide(np.random.default_rng(0), (args.side, args.side))
    opts = ViewerOptions(max_mpp=0.25)          # tiles at the slide's own resolution: the most work
    print(f"{args.side} x {args.side} px slide at 0.25 µm/px, tiled at {opts.max_mpp} µm/px")
    for name, downsamples in (("no pyramid", (1,)), ("pyramid 1/4/16", (1, 4, 16))):
        path = write_pyramidal_tiff(args.out / f"{name.split()[0]}.tif", img, 0.25, downsamples=downsamples)
        slide = open_slide(path)
        base = floor(slide, 1.0)
        pixels = counted(slide)
        viewer = SlideViewer.__new__(SlideViewer)
        viewer.o, viewer.out = opts, args.out / "tiles"
        t0 = time.perf_counter()
        viewer._tiles(slide, "s", 1.0, *slide.dimensions)
        took = time.perf_counter() - t0
        read = sum(pixels) / (slide.dimensions[0] * slide.dimensions[1])
        print(f"{name:>15}: tiles {took:6.1f} s, one read {base:5.1f} s, ratio {took / base:4.1f}x; "
              f"pixels decoded {read:4.2f}x the slide's")
        slide.close()
        shutil.rmtree(args.out / "tiles", ignore_errors=True)


if __name__ == "__main__":
    main()
