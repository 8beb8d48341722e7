"""Tile-reading speed of the extraction data path, side by side in one run:

1. raw JPEG decode of the same tiles (tifffile's stored bytes -> imagecodecs), the decode floor;
2. a bare loop of OpenSlide `read_region` calls (what every WSI tool pays at least);
3. slidemil's extraction path: PatchDataset (read at the best level + resize to the encoder's input +
   tensor conversion) through a DataLoader with 0, 1 and 2 worker processes, encoder excluded;
4. end to end through an encoder (`embed_patches`, 2 workers): handcrafted and resnet50_trunc (random
   weights: the speed is the architecture's), so the bottleneck is visible;
5. many small slides (40 x 16 tiles, 2 workers): a DataLoader started per slide vs `TileStream`, whose
   workers live across slides (what `slidemil extract` uses).

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

from slidemil.features.extract import embed_patches
from slidemil.slides.synthetic import render_slide, write_pyramidal_tiff
from slidemil.slides.tiles import PatchDataset, TileStream


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

        small = [(path, coords[i * 16:(i + 1) * 16]) for i in range(40)]
        per_slide = rate(lambda: [b for p, c in small for b in DataLoader(PatchDataset(p, c, 256, args.out_size),
                                                                            batch_size=64, num_workers=2)], 640)
        stream = TileStream(64, 2)
        persistent = rate(lambda: [b for p, c in small for b in stream.batches(PatchDataset(p, c, 256, args.out_size))],
                          640)

        encoders = {}
        for name in ("handcrafted", "resnet50_trunc"):
            enc = _encoder(name, Path(tmp))
            ds = PatchDataset(path, coords, 256, enc.spec.input_size)
            embed_patches(enc, PatchDataset(path, coords[:8], 256, enc.spec.input_size), torch.device("cpu"), 8)
            torch.set_num_threads(2)          # the encoder gets the cores, as in `slidemil extract`
            encoders[name] = rate(lambda: embed_patches(enc, ds, torch.device("cpu"), 64, 2), len(coords))
            torch.set_num_threads(1)

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
    print(f"| 40 slides x 16 tiles, a DataLoader per slide, 2 workers | {per_slide:.0f} | {per_slide / bare:.2f} |")
    print(f"| 40 slides x 16 tiles, TileStream (workers live across slides), 2 workers | {persistent:.0f} | "
          f"{persistent / bare:.2f} |")
    for name, r in encoders.items():
        print(f"| end to end: tiles -> {name} features (embed_patches, 2 workers, CPU) | {r:.0f} | {r / bare:.2f} |")


def _encoder(name: str, tmp: Path):
    """The encoder, with random weights for those that need a file (speed does not depend on them)."""
    from safetensors.torch import save_file

    from slidemil.features.encoders import create_encoder, get_spec

    spec = get_spec(name)
    if not spec.needs_weights:
        return create_encoder(name)
    weights = tmp / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in spec.builder().state_dict().items()}, str(weights))
    return create_encoder(name, weights=str(weights))


if __name__ == "__main__":
    main()
