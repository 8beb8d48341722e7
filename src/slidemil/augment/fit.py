"""`slidemil histaug fit`: sample patches of a cohort (from `slidemil patch` coordinates), augment them in
image space, encode both with the cohort's encoder, and fit the HistAug generator on the pairs.
Slides are split into fitting and held-out slides; the held-out cosine similarity is reported."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from slidemil.augment.histaug import FitSettings, collect_pairs, fit_generator, save_generator, split_slides
from slidemil.errors import InputError
from slidemil.features.encoders import create_encoder
from slidemil.slides.patching import read_coords
from slidemil.slides.reader import slide_files
from slidemil.slides.tiles import PatchDataset
from slidemil.utils.io import write_csv

log = logging.getLogger(__name__)


def sample_tiles(slide_path: Path, patch_file: Path, k: int, size: int, rng: np.random.Generator,
                 backend: str = "auto") -> list[torch.Tensor]:
    coords, attrs = read_coords(patch_file)
    if len(coords) == 0:
        raise InputError(f"{patch_file}: no patches")
    pick = np.sort(rng.choice(len(coords), size=min(k, len(coords)), replace=False))
    ds = PatchDataset(slide_path, coords[pick], int(attrs["patch_size_level0"]), size, backend)
    return [ds[i] for i in range(len(ds))]


def fit_from_slides(slides: Path, patches: Path, out: Path, encoder: str, weights: str | None = None,
                    download: bool = False, settings: FitSettings = FitSettings(), device: str = "cpu",
                    backend: str = "auto") -> dict:
    enc = create_encoder(encoder, weights, download).to(device).eval()
    by_id = slide_files(slides)
    files = sorted(patches.glob("*.h5"))
    ids = [f.stem.removesuffix("_patches") for f in files if f.stem.removesuffix("_patches") in by_id]
    if not ids:
        raise InputError(f"{patches}: no coordinate files (<slide_id>.h5) matching a slide in {slides}; "
                         f"run `slidemil patch --slides {slides} --out ...` first")
    rng = np.random.default_rng(settings.seed)
    gen = torch.Generator().manual_seed(settings.seed)
    fit_ids, test_ids = split_slides(ids, settings.heldout, settings.seed)
    tiles: dict[str, list] = {"fit": [], "test": []}
    failures = []
    for sid in ids:
        patch_file = next(f for f in files if f.stem.removesuffix("_patches") == sid)
        try:
            part = sample_tiles(by_id[sid], patch_file, settings.patches_per_slide, enc.spec.input_size, rng, backend)
        except Exception as exc:  # one unreadable slide must not stop the fit (recorded below)
            log.warning("histaug: %s skipped: %s", sid, exc)
            failures.append({"slide_id": sid, "error": f"{type(exc).__name__}: {exc}"})
            continue
        tiles["test" if sid in test_ids else "fit"].extend(part)
    if not tiles["fit"] or not tiles["test"]:
        raise InputError(f"histaug fit needs patches from at least two readable slides (got {len(tiles['fit'])} "
                         f"fitting and {len(tiles['test'])} held-out patches)")
    dev = torch.device(device)
    log.info("histaug: encoding %d + %d patches with %d augmentations each", len(tiles["fit"]),
             len(tiles["test"]), settings.augmentations)
    train = collect_pairs(tiles["fit"], enc, settings, dev, gen)
    test = collect_pairs(tiles["test"], enc, settings, dev, gen)
    model, report = fit_generator(train, test, encoder, settings, dev)
    failed = {f["slide_id"] for f in failures}
    report.update({"encoder": encoder, "encoder_weights": str(enc.weights), "fit_slides": sorted(set(fit_ids) - failed),
                   "heldout_slides": sorted(set(test_ids) - failed)})
    save_generator(out, model, report)
    if failures:
        import pandas as pd

        write_csv(out / "failures.csv", pd.DataFrame(failures))
    return report
