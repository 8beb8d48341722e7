"""Tile-reading speed of the extraction data path, side by side in one run:

1. raw JPEG decode of the same tiles (tifffile's stored bytes -> imagecodecs), the decode floor;
2. a bare loop of OpenSlide `read_region` calls (what every WSI tool pays at least);
3. slidemil's extraction path: PatchDataset (read at the best level + resize to the encoder's input +
   tensor conversion) through a DataLoader with 0, 1 and 2 worker processes, encoder excluded.

    python benchmarks/read_speed.py [--tiles 600] [--size 6144 8192]

Writes nothing; paste the printed table into docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import imagecodecs
import numpy as np
import openslide
import tifffile
import torch
from torch.utils.data import DataLoader

from slidemil.slides.synthetic import render_slide, write_pyramidal_tiff
from slidemil.slides.tiles import PatchDataset


def rate(fn, n: int) -> float:
    t0 = time.perf_counter()
    fn()
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiles", type=int, default=600)
    ap.add_argument("--size", type=int, nargs=2, default=(6144, 8192))
    ap.add_argument("--out-size", type=int, default=224, help="encoder input size")
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.tif"
        img, _, _ = render_slide(np.random.default_rng(0), tuple(args.size), tumour=True)
        write_pyramidal_tiff(path, img, mpp=0.5)
        del img
        rng = np.random.default_rng(1)
        h, w = args.size
        coords = np.stack([rng.integers(0, w // 256, args.tiles) * 256, rng.integers(0, h // 256, args.tiles) * 256], 1)

        with tifffile.TiffFile(path) as tf:
            page = tf.pages[0]
            across = (w + 255) // 256
            blobs = []
            for x, y in coords:
                i = (y // 256) * across + x // 256
                tf.filehandle.seek(page.dataoffsets[i])
                blobs.append(page.jpegtables[:-2] + tf.filehandle.read(page.databytecounts[i])[2:] if page.jpegtables
                             else tf.filehandle.read(page.databytecounts[i]))
        raw = rate(lambda: [imagecodecs.jpeg_decode(b) for b in blobs], len(blobs))

        slide = openslide.OpenSlide(str(path))
        bare = rate(lambda: [slide.read_region((int(x), int(y)), 0, (256, 256)) for x, y in coords], len(coords))

        results = {}
        for backend in ("auto", "openslide"):
            for workers in (0, 1, 2):
                ds = PatchDataset(path, coords, 256, args.out_size, backend=backend)
                loader = DataLoader(ds, batch_size=64, num_workers=workers)
                next(iter(DataLoader(PatchDataset(path, coords[:2], 256, args.out_size, backend=backend))))  # warm
                results[(backend, workers)] = rate(lambda: [b for b in loader], len(coords))

    print(f"{args.tiles} random 256x256 level-0 tiles (tile-aligned) of a {w}x{h} JPEG pyramidal TIFF, "
          f"resized to {args.out_size}\n")
    print("| path | tiles/s | vs bare OpenSlide |")
    print("|---|---|---|")
    print(f"| raw JPEG decode (imagecodecs), 1 process | {raw:.0f} | {raw / bare:.2f} |")
    print(f"| bare OpenSlide read_region loop, 1 process | {bare:.0f} | 1.00 |")
    for (backend, workers), r in results.items():
        label = "main process" if workers == 0 else f"{workers} worker{'s' if workers > 1 else ''}"
        name = "default (auto: tifffile for tiled TIFF/SVS)" if backend == "auto" else "forced OpenSlide backend"
        print(f"| slidemil PatchDataset, {name}, {label} | {r:.0f} | {r / bare:.2f} |")


if __name__ == "__main__":
    main()
