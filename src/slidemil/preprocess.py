"""`slidemil segment | patch | extract | preprocess`: per-slide stages over a folder, resumable.

Outputs under `--out`: `segmentation/<id>.geojson` + `<id>_qc.png`, `patches/<id>.h5`,
`features_<encoder>/<id>.h5`, and `failures.csv` (slide_id, stage, error). A slide that fails is
recorded and the batch goes on; a rerun skips every finished, valid output and retries the rest.
Under torchrun (WORLD_SIZE > 1) each rank takes every WORLD_SIZE-th slide and writes
`failures_rank<r>.csv`.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import zlib
from pathlib import Path
from typing import Literal, Optional

import h5py
import numpy as np
import pandas as pd
from pydantic import ConfigDict, Field

from slidemil import __version__
from slidemil.errors import InputError, disk_full
from slidemil.features.encoders import create_encoder
from slidemil.features.extract import ExtractConfig, embed_batches
from slidemil.features.store import read_attrs, write_features
from slidemil.slides.patching import PatchConfig, make_grid, read_coords, write_coords
from slidemil.slides.reader import Slide, list_slides, open_slide, slide_id_of
from slidemil.slides.stain import StainNormalizer
from slidemil.slides.tiles import PatchDataset, TileStream
from slidemil.slides.tissue import TissueConfig, load_tissue_geojson, mask_to_geojson, save_segmentation, segment_tissue
from slidemil.utils.device import resolve_device
from slidemil.utils.io import read_csv_text, safe_child, sha256_file, write_csv
from slidemil.utils.lock import Lock, LockedError

log = logging.getLogger(__name__)
STAGES = ("segment", "patch", "extract")
UPSAMPLE_TOLERANCE = 1.1    # a target finer than the scan by more than this is warned about (slides at 0.2527 vs 0.25 are not)


class NoTissueError(InputError):
    pass


class PreprocessConfig(TissueConfig, PatchConfig, ExtractConfig):
    """Options of `slidemil segment | patch | extract | preprocess` (YAML keys = field names): each
    stage's own settings plus where the slides are, how their resolution is known, and the output."""

    model_config = ConfigDict(extra="forbid")

    slides: str = Field(description="Folder of slides (.svs .tif .ndpi .mrxs ... .png), searched with its subfolders "
                                    "(a gdc-client download's <uuid>/ folders).")
    out: str = Field(description="Output folder.")
    mpp: Optional[float] = Field(None, gt=0, description="Level-0 µm/px for slides whose metadata lacks it.")
    mpp_csv: Optional[str] = Field(None, description="CSV slide_id,mpp overriding the metadata.")
    backend: Literal["auto", "openslide", "tifffile", "image"] = Field(
        "auto", description="Slide reader: auto | openslide | tifffile | image.")
    tissue_geojson: Optional[str] = Field(None, description="Folder of <slide_id>.geojson contours to use instead.")
    coords_dir: Optional[str] = Field(None, description="Extract at CLAM/TRIDENT/slidemil coordinates from this folder.")
    quiet: bool = Field(False, description="No progress bar.")
    allow_failures: bool = Field(False, description="Exit 0 when some slides failed (never when all did).")

    def tissue(self) -> TissueConfig:
        return TissueConfig(**{k: getattr(self, k) for k in TissueConfig.model_fields})

    def patches(self) -> PatchConfig:
        return PatchConfig(**{k: getattr(self, k) for k in PatchConfig.model_fields})


def read_mpp_csv(path: str | None) -> dict[str, float]:
    if not path:
        return {}
    try:
        table = read_csv_text(path, dtype={"slide_id": str})
    except Exception as exc:
        raise InputError(f"{path}: cannot be read as CSV ({exc})") from exc
    for col in ("slide_id", "mpp"):
        if col not in table.columns:
            raise InputError(f"{path}: column {col!r} is missing (found: {', '.join(table.columns)})")
    bad = table["mpp"].isna() | (pd.to_numeric(table["mpp"], errors="coerce") <= 0)
    if bad.any():
        raise InputError(f"{path}: column 'mpp' must be a positive number (row(s) "
                         f"{', '.join(str(i + 2) for i in table.index[bad][:10])})")
    return dict(zip(table["slide_id"], table["mpp"].astype(float)))


def shard(items: list, rank: int | None = None, world: int | None = None) -> list:
    rank = int(os.environ.get("RANK", 0)) if rank is None else rank
    world = int(os.environ.get("WORLD_SIZE", 1)) if world is None else world
    return items[rank::world] if world > 1 else items


class Pipeline:
    """The per-slide stages over a folder of slides, resumable, failures recorded per slide."""

    def __init__(self, cfg: PreprocessConfig):
        self.o = cfg
        self.out = Path(cfg.out)
        self.mpp_override = read_mpp_csv(cfg.mpp_csv)
        self._encoder = None
        self._weights_sha: str | None = None
        self._stain = None
        self._tiles = None
        self._stage = "open"                      # the stage a failing slide was in, for failures.csv
        self.failures: dict[str, tuple[str, str]] = {}
        self._checked: tuple | None = None      # the stages `check` passed for (the CLI checks before run does)

    # ----- paths -------------------------------------------------------------------------------
    @property
    def feature_dir(self) -> Path:
        return self.out / f"features_{self.o.encoder.replace(':', '_').replace('/', '_')}"

    def paths(self, slide_id: str) -> dict[str, Path]:
        patch = safe_child(self.out / "patches", slide_id, ".h5")
        if self.o.coords_dir:  # slidemil / CLAM `<id>.h5`, TRIDENT `<id>_patches.h5`
            given = [safe_child(Path(self.o.coords_dir), slide_id, suffix) for suffix in (".h5", "_patches.h5")]
            patch = next((p for p in given if p.is_file()), given[0])
        return {"segment": safe_child(self.out / "segmentation", slide_id, ".geojson"), "patch": patch,
                "extract": safe_child(self.feature_dir, slide_id, ".h5")}

    def open(self, path: Path) -> Slide:
        return open_slide(path, self.o.backend, self.mpp_override.get(slide_id_of(path), self.o.mpp))

    # ----- stages ------------------------------------------------------------------------------
    def segment(self, slide: Slide) -> None:
        target = self.paths(slide.slide_id)["segment"]
        if self.o.tissue_geojson:
            src = self.hand_edited(slide.slide_id)
            if not src.is_file():
                raise InputError(f"--tissue-geojson: no {src} (nor .json)")
            tissue = load_tissue_geojson(src, slide, self.o.seg_mpp)
        else:
            tissue = segment_tissue(slide, self.o.tissue())
        if not tissue.mask.any():
            raise NoTissueError(f"{slide.path}: no tissue found (segmentation at {self.o.seg_mpp} µm/px); "
                                "check the QC thumbnail, lower --min-saturation, or supply --tissue-geojson")
        save_segmentation(target.parent, slide.slide_id, tissue, mask_to_geojson(tissue), self.o.tissue(),
                          self.tissue_source(slide.slide_id))

    def tissue_source(self, slide_id: str) -> dict:
        """What a slide's tissue contours were made from, kept in its GeoJSON: a rerun whose source differs
        (other tissue settings, a hand-edited GeoJSON, an edit of it) segments again, and what follows with it."""
        if self.o.tissue_geojson:
            src = self.hand_edited(slide_id)
            return {"hand_edited": src.name, "sha256": sha256_file(src) if src.is_file() else ""}   # a moved folder: same
        return {"params": self.o.tissue().model_dump(mode="json")}

    def hand_edited(self, slide_id: str) -> Path:
        """`<dir>/<slide_id>.geojson`, or `.json` (as QuPath scripts often name their export)."""
        folder = Path(self.o.tissue_geojson)
        return next((p for p in (safe_child(folder, slide_id, ".geojson"), safe_child(folder, slide_id, ".json"))
                     if p.is_file()), safe_child(folder, slide_id, ".geojson"))

    def patch(self, slide: Slide) -> None:
        src = self.paths(slide.slide_id)["segment"]
        tissue = load_tissue_geojson(src, slide, self.o.seg_mpp)
        grid = make_grid(slide, tissue, self.o.patches())
        if len(grid.coords) == 0:
            raise NoTissueError(f"{slide.path}: no patch has at least {self.o.min_tissue:.0%} tissue; "
                                "lower --min-tissue or --patch-size")
        if grid.attrs["downsample"] < 1 / UPSAMPLE_TOLERANCE:      # e.g. a 20x scan in a cohort patched at 40x
            log.warning("%s: scanned at %.3g µm/px, coarser than the target %.3g µm/px: its patches are upsampled "
                        "%.1fx, so the encoder sees interpolated pixels unlike the other slides'; patch this cohort at "
                        "--target-mpp %.2g or coarser, or leave the slide out", slide.slide_id,
                        grid.attrs["level0_mpp"], grid.attrs["target_mpp"], 1 / grid.attrs["downsample"],
                        grid.attrs["level0_mpp"])
        write_coords(self.paths(slide.slide_id)["patch"], grid, {"slide_path": str(slide.path),
                                                                "min_tissue": self.o.min_tissue,
                                                                "segmentation_sha256": sha256_file(src)})

    def encoder(self):
        if self._encoder is None:
            self._encoder = create_encoder(self.o.encoder, self.o.weights, self.o.download)
        return self._encoder

    def weights_sha(self) -> str:
        """sha256 of the encoder's weights file, hashed once a batch (it was hashed for every slide: seconds
        each for a multi-GB checkpoint)."""
        if self._weights_sha is None:
            self._weights_sha = _weights_sha(self.encoder().weights)
        return self._weights_sha

    def tiles(self, device) -> TileStream:
        """One tile stream for the whole batch of slides: its worker processes start once."""
        if self._tiles is None:
            self._tiles = TileStream(self.o.batch_size, self.o.num_workers, pin_memory=device.type == "cuda")
        return self._tiles

    def stain(self) -> StainNormalizer | None:
        """The stain normaliser (fitted once on --stain-target), or None."""
        if self.o.stain_norm != "none" and self._stain is None:
            self._stain = StainNormalizer(self.o.stain_norm, self.o.stain_target)
        return self._stain

    def slide_stain(self, ds: PatchDataset, slide_id: str, sample: int = 16) -> StainNormalizer:
        """The stain normaliser with this slide's statistics, from `sample` of its tiles (seeded by id)."""
        norm = copy.copy(self.stain())
        rng = np.random.default_rng(zlib.crc32(slide_id.encode()))
        picks = rng.choice(len(ds), min(sample, len(ds)), replace=False)
        if not norm.fit_source(np.stack([ds[int(i)].permute(1, 2, 0).numpy() for i in picks])):
            log.warning("%s: too little stained tissue to estimate its stains; its tiles are not normalised", slide_id)
        return norm

    def extract(self, slide: Slide, progress=None) -> None:
        coords, attrs = read_coords(self.paths(slide.slide_id)["patch"])
        attrs = complete_patch_attrs(attrs, slide)
        enc = self.encoder()
        device = resolve_device(self.o.device)
        ds = PatchDataset(slide.path, coords, attrs["patch_size_level0"], enc.spec.input_size, self.o.backend,
                          slide.mpp)
        if self.stain() is not None:
            ds.transform = self.slide_stain(ds, slide.slide_id)
        feats = embed_batches(enc, self.tiles(device).batches(ds), device, progress)
        meta = {k: attrs[k] for k in ("patch_size", "patch_size_level0", "target_mpp", "level0_mpp",
                                      "target_magnification", "level0_magnification", "overlap", "patch_level",
                                      "downsample", "level0_width", "level0_height", "min_tissue") if k in attrs}
        meta.update({"encoder": self.o.encoder, "encoder_weights": enc.weights or "none",
                     "encoder_sha256": self.weights_sha(), "slide_path": str(slide.path),
                     "name": slide.slide_id, "slidemil_version": __version__, "stain_norm": self.o.stain_norm})
        if self._stain is not None:
            meta.update(stain_target=self._stain.target.name, stain_target_sha256=sha256_file(self._stain.target))
        write_features(self.paths(slide.slide_id)["extract"], feats, coords, meta,
                       dtype="float16" if self.o.float16 else "float32")

    # ----- resume ------------------------------------------------------------------------------
    def _check_patch_settings(self) -> None:
        """Patches already in --out made at another resolution, size or overlap than this call asks would be
        kept (a finished slide is skipped) beside new ones, and features cut from both: refused before
        anything is written (it was silent)."""
        grid = self.o.patches()
        want = {"target_mpp": grid.resolved_mpp(), "patch_size": grid.patch_size, "overlap": grid.overlap}
        folder = self.out / "patches"
        for path in sorted(folder.glob("*.h5")) if folder.is_dir() else []:
            try:
                attrs = read_attrs(path)
            except Exception:                # unreadable: its slide's own stage redoes or records it
                continue
            differ = [k for k, v in want.items() if k in attrs and abs(float(attrs[k]) - v) > 1e-3 * max(abs(v), 1)]
            if differ:
                was = ", ".join(f"--{k.replace('_', '-')} {attrs[k]:g}" for k in differ)
                now = ", ".join(f"--{k.replace('_', '-')} {want[k]:g}" for k in differ)
                raise InputError(f"{folder}: {path.name} and perhaps others were patched with {was}, this call asks "
                                 f"{now}; a finished slide would keep its old patches beside the new ones. Give "
                                 f"another --out, or remove {folder} and the features made from it to patch again")

    def is_done(self, slide_id: str, stage: str) -> bool:
        p = self.paths(slide_id)
        path = p[stage]
        if not path.is_file():
            return False
        # each stage is complete when its output exists and was made from what this call would make it from
        # (outputs of older versions lack the record and count as complete)
        if stage == "segment":   # a GeoJSON of an older run may lack its QC picture (written after it then)
            try:
                made_from = json.loads(path.read_text()).get("properties", {}).get("source")
            except (OSError, ValueError):
                return False
            return (path.with_name(f"{slide_id}_qc.png").is_file()
                    and made_from in (None, self.tissue_source(slide_id)))
        try:
            if stage == "patch":
                _, attrs = read_coords(path)
                return (attrs.get("min_tissue", self.o.min_tissue) == self.o.min_tissue
                        and attrs.get("segmentation_sha256") in (None, sha256_file(p["segment"])))
            with h5py.File(path, "r") as fh:
                made_at = np.asarray(fh["coords"][()]) if "coords" in fh else None
                n = fh["features"].shape[0]
                enc = fh.attrs.get("encoder")
                stain = fh.attrs.get("stain_norm", "none")
                sha = fh.attrs.get("encoder_sha256")      # other weights of the same encoder: redone, as stain
            coords, _ = read_coords(p["patch"])
            same_grid = n == len(coords) and (made_at is None or np.array_equal(made_at.reshape(-1, 2), coords))
            return same_grid and enc == self.o.encoder and stain == self.o.stain_norm and sha in (None, self.weights_sha())
        except Exception:
            return False

    def check(self, stages=STAGES) -> None:
        """What concerns the whole batch, before anything is written (the CLI calls it before it makes --out):
        the given folders exist, the device is usable, the encoder's weights and the stain target load, and
        patches already in --out were made on this grid. A failure here would fail every slide alike."""
        if self._checked == tuple(stages):
            return
        for flag, folder in (("--tissue-geojson", self.o.tissue_geojson), ("--coords-dir", self.o.coords_dir)):
            if folder and not Path(folder).is_dir():
                raise InputError(f"{flag} {folder}: no such folder")
        if "extract" in stages:
            resolve_device(self.o.device)
            self.encoder()
            self.stain()
        if ("patch" in stages or "extract" in stages) and not self.o.coords_dir:
            self._check_patch_settings()
        self._checked = tuple(stages)

    def run(self, slide_paths: list[Path], stages=STAGES, progress=None) -> pd.DataFrame:
        """Run `stages` on every slide; returns the status table (also written to failures.csv). What
        concerns the whole batch is checked first (`check`) and stops it at once."""
        self.check(stages)
        rows = []
        for path in slide_paths:
            sid = slide_id_of(path)
            self._stage = "open"
            try:
                safe_child(self.out, sid)
                with Lock(safe_child(self.out / ".locks", sid, ".lock"), f"slide {sid}"):
                    self._clean_temporaries(sid)
                    status = self._process(path, sid, stages, progress)
                rows.append({"slide_id": sid, "status": status, "stage": "", "error": ""})
                self.failures.pop(sid, None)
            except LockedError as exc:  # another process is on this slide: leave it to them
                log.info("%s", exc)
                rows.append({"slide_id": sid, "status": "busy", "stage": "", "error": ""})
            except Exception as exc:  # one bad slide never stops the batch; a full disk stops it (all would fail)
                if disk_full(exc):
                    raise
                msg = str(exc) if isinstance(exc, InputError) else f"{path}: {type(exc).__name__}: {exc}"
                log.warning("%s failed at %s: %s", sid, self._stage, msg)
                self.failures[sid] = (self._stage, msg)
                rows.append({"slide_id": sid, "status": "failed", "stage": self._stage, "error": msg})
        self._write_failures({r["slide_id"] for r in rows if r["status"] != "busy"})
        return pd.DataFrame(rows)

    def _process(self, path: Path, sid: str, stages, progress) -> str:
        """The missing stages of one slide (under its lock): "done", or "skipped" when all were complete."""
        wanted = list(("extract",) if self.o.coords_dir and "extract" in stages else stages)
        first = next((i for i, s in enumerate(wanted) if not self.is_done(sid, s)), None)
        if first is None:
            return "skipped"
        slide = self.open(path)
        try:
            for i, stage in enumerate(wanted[first:]):
                # a stage after a redone one is judged again: made from the old output, it is redone too
                if i > 0 and self.is_done(sid, stage):
                    continue
                self._stage = stage
                if stage == "extract" and progress is not None:
                    n = len(read_coords(self.paths(sid)["patch"])[0])
                    getattr(self, stage)(slide, progress(sid, n))
                else:
                    getattr(self, stage)(slide)
        finally:
            slide.close()
        return "done"

    def _write_failures(self, handled: set[str]) -> None:
        """failures.csv, merged with what other processes on this folder recorded: this run's slides
        (`handled`) take this run's outcome, the others keep theirs."""
        world = int(os.environ.get("WORLD_SIZE", 1))
        name = f"failures_rank{os.environ.get('RANK', 0)}.csv" if world > 1 else "failures.csv"
        columns = ["slide_id", "stage", "error"]
        ours = pd.DataFrame([{"slide_id": k, "stage": s, "error": e} for k, (s, e) in sorted(self.failures.items())],
                            columns=columns)
        self.out.mkdir(parents=True, exist_ok=True)
        with Lock(self.out / ".locks" / "failures.lock", "failures.csv", wait=True):
            path = self.out / name
            if path.is_file():
                theirs = pd.read_csv(path, dtype=str, keep_default_na=False)
                ours = pd.concat([theirs[~theirs["slide_id"].isin(handled)], ours], ignore_index=True)
                ours = ours.sort_values("slide_id").reset_index(drop=True)
            write_csv(path, ours)

    def _clean_temporaries(self, sid: str) -> None:
        """Remove this slide's half-written files left by a killed run (they never carry a final name).
        Called under the slide's lock, so no live process is writing them."""
        p = self.paths(sid)
        finals = [p["segment"], p["segment"].with_name(f"{sid}_qc.png"), p["patch"], p["extract"]]
        for final in finals:
            for tmp in final.parent.glob(f".{final.name}.tmp-*"):
                tmp.unlink(missing_ok=True)


def complete_patch_attrs(attrs: dict, slide: Slide) -> dict:
    """Patching attributes from any tool's coords file. TRIDENT stores `patch_size_level0` (possibly a
    float); CLAM stores `patch_size` pixels at `patch_level`, so the level-0 size is patch_size times
    that level's downsample."""
    attrs = dict(attrs)
    if "patch_size_level0" in attrs:
        size0 = int(round(float(attrs["patch_size_level0"])))
    elif "patch_level" in attrs and "patch_size" in attrs:
        size0 = int(round(float(attrs["patch_size"]) * slide.level_downsamples[int(attrs["patch_level"])]))
    else:
        raise InputError(f"coords of {slide.slide_id} carry neither patch_size_level0 (TRIDENT, slidemil) nor "
                         "patch_level + patch_size (CLAM); cannot tell the patch footprint")
    attrs["patch_size_level0"] = size0
    attrs.setdefault("patch_size", size0)
    if slide.mpp:
        attrs.setdefault("level0_mpp", slide.mpp)
        attrs.setdefault("target_mpp", slide.mpp * size0 / float(attrs["patch_size"]))
    return attrs


def _weights_sha(path: str | None) -> str:
    if path and Path(path).is_file():
        return sha256_file(path)
    return "none"


def slides_in(folder: str | Path) -> list[Path]:
    slides = list_slides(folder)
    if not slides:
        raise InputError(f"{folder} holds no slide files (.mrxs, .ndpi, .svs, .tif, ...), in it or its subfolders")
    return shard(slides)
