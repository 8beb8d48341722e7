"""`slidemil heatmap`: a run's instance scores back on its slides, exactly on the run's patch grid.

Scores come from the run's own features and fold models (no re-patching, no other grid). Per slide:
`<id>_heatmap.png`, `<id>_scores.h5` (coords, per-fold raw scores, ensemble), `<id>_top_tiles.png`
and `<id>.geojson` (one QuPath detection per patch with its score, plus high-score regions).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Literal, Optional

import h5py
import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field

from slidemil.errors import InputError
from slidemil.explain.geojson import heatmap_geojson
from slidemil.explain.paint import paint
from slidemil.explain.render import heatmap_figure, top_tiles_figure
from slidemil.explain.scores import NoScoresError, ensemble_scores, is_distribution, scale_label
from slidemil.features.encoders import create_encoder
from slidemil.features.extract import embed_patches
from slidemil.features.store import check_compatible, find_feature_file, read_features
from slidemil.rundir import RunDir
from slidemil.slides.patching import PatchConfig, make_grid
from slidemil.slides.reader import open_slide, slide_files
from slidemil.slides.tiles import PatchDataset
from slidemil.slides.tissue import TissueConfig, segment_tissue
from slidemil.tasks import model_task
from slidemil.utils.device import resolve_device
from slidemil.utils.figures import save_figure
from slidemil.utils.io import atomic_path, read_csv_text, safe_child, write_csv, write_text

log = logging.getLogger(__name__)


class HeatmapOptions(BaseModel):
    """Settings of `slidemil heatmap` (flag help and defaults come from here)."""

    model_config = ConfigDict(extra="forbid")

    fold: str = Field("oof", description="oof (a slide of the run by the fold model it was tested on, any other "
                                         "slide by the mean of the fold models), all (that mean for every "
                                         "slide) or a fold number.")
    score: str = Field("attention", description="attention | logit | class:<name>.")
    normalise: Literal["percentile", "minmax", "absolute"] = Field(
        "percentile", description="percentile | minmax (within each slide: a slide's own top patches are red even "
                                  "when it is predicted negative) | absolute (one scale for every slide: attention "
                                  "relative to uniform, logits as sigmoid).")
    sigma: float = Field(0.0, ge=0, description="Gaussian smoothing in heatmap pixels.")
    cmap: str = Field("jet", description="Matplotlib colour map.")
    alpha: float = Field(0.5, ge=0, le=1, description="Overlay opacity.")
    top_k: int = Field(8, ge=1, description="Top and bottom tiles to show.")
    thumb_size: int = Field(2048, ge=64, description="Long side of the heatmap in pixels.")
    high_quantile: float = Field(0.9, ge=0, le=1, description="Normalised score above which a region is "
                                                              "outlined in the GeoJSON.")
    mpp: Optional[float] = Field(None, gt=0, description="Level-0 mpp when the slides lack it.")
    overlap: Optional[int] = Field(None, ge=1, description="Finer grid: overlap in px at the run's resolution; "
                                                           "features are extracted with the run's encoder.")
    allow_failures: bool = Field(False, description="Exit 0 when some slides failed (never when all did).")


class HeatmapRun:
    def __init__(self, run: str | Path, slides_dir: str | Path, out: str | Path | None = None,
                 opts: HeatmapOptions | None = None, features: str | Path | None = None):
        self.run, self.o = RunDir(run), opts or HeatmapOptions()
        self.cfg = self.run.config()
        self.features = Path(features or self.cfg["features"])
        if not self.features.is_dir():     # a run trained elsewhere, or its project moved since
            whose = "" if features else " (the run was trained on it)"
            raise InputError(f"the feature folder {self.features} does not exist{whose}; pass --features with the "
                             "folder of the run's feature files where they are now")
        self.models = self.run.fold_models(fold="all" if self.o.fold == "oof" else self.o.fold)
        # under oof a slide of the run is painted by the model of the fold it was tested on: the others trained
        # on it (their scores and prediction are in-sample, unlike the predictions.csv it is captioned with)
        self.test_fold = self.run.test_folds() if self.o.fold == "oof" else {}
        self.task = model_task(self.models[0][1])
        self._encoder = None
        self.classes = self.models[0][1]["classes"]   # empty for survival and regression
        self.preds = (self.run.predictions().set_index("slide_id") if self.run.predictions_path.exists()
                      else pd.DataFrame())
        self.slides = slide_files(slides_dir, self._run_ids())
        # the run's slides to heatmaps/ (the report's gallery); another cohort's apart, in external/
        self.out = Path(out) if out else (self.run.heatmaps_dir if self._painted_run_ids() else
                                           self.run.external_cohort_dir(Path(slides_dir).resolve().name, "heatmaps"))

    def default_ids(self) -> list[str]:
        """The run's slides that are in the slide folder (a patient-bag run's predictions name patients, so
        its slides come from splits.csv); every slide of the folder when it holds none of the run's (an
        external cohort, painted with its own --features)."""
        return self._painted_run_ids() or sorted(self.slides)   # none of the run's: another cohort's slides

    def _painted_run_ids(self) -> list[str]:
        return [s for s in self._run_ids() if s in self.slides]

    def _run_ids(self) -> list[str]:
        """The slide ids the run scored: its predictions', or a patient-bag run's from splits.csv."""
        if self.models[0][1].get("bag_unit") == "patient" and self.run.splits_path.is_file():
            return list(dict.fromkeys(read_csv_text(self.run.splits_path, dtype={"slide_id": str})["slide_id"]))
        return list(self.preds.index)

    # --- scores ------------------------------------------------------------------------------------
    def scores(self, slide_id: str):
        path = find_feature_file(self.features, slide_id)
        if path is None:
            raise NoScoresError(f"{slide_id}: no features under {self.features}, so no scores to paint; "
                                "extract them first")
        bag = read_features(path)
        check_compatible(self.models[0][1], bag.attrs | {"embedding_dim": bag.dim}, path)   # another cohort's files
        if bag.coords is None:
            raise NoScoresError(f"{path}: has no coords (a CLAM .pt file?); heatmaps need patch coordinates")
        size0 = bag.attrs.get("patch_size_level0")
        if size0 is None:
            raise NoScoresError(f"{path}: no patch_size_level0 attribute; cannot place patches on the slide")
        coords, feats = bag.coords, bag.features
        if self.o.overlap:
            coords, feats = self._finer_grid(slide_id, bag.attrs)
        models = self.models_for(slide_id)
        per_fold, ensemble, logits = ensemble_scores(models, feats, self.o.score, self.classes, self.o.normalise)
        prediction = self.task.ensemble([(m, lg[None]) for (_, m), lg in zip(models, logits)]).iloc[0]
        return coords, float(size0), bag.attrs, per_fold, ensemble, prediction

    def models_for(self, slide_id: str) -> list:
        """[(model, meta)] that paint `slide_id`: its test fold's under oof, else every loaded fold's."""
        fold = self.test_fold.get(slide_id)
        chosen = [(m, meta) for m, meta in self.models if int(meta["fold"]) == fold] if fold is not None else []
        return chosen or self.models

    def _finer_grid(self, slide_id: str, attrs: dict):
        """Patches at the run's resolution and size with `overlap`, embedded by the run's encoder."""
        if "encoder" not in attrs or "target_mpp" not in attrs:
            raise InputError(f"{slide_id}: the run's features do not name their encoder and resolution; "
                             "--overlap needs both (features written by slidemil have them)")
        if self._encoder is None:
            weights = attrs.get("encoder_weights")
            self._encoder = create_encoder(attrs["encoder"], weights if weights and Path(weights).is_file() else None)
        slide = open_slide(self.slides[slide_id], mpp=self.o.mpp or attrs.get("level0_mpp"))
        params = PatchConfig(target_mpp=float(attrs["target_mpp"]), patch_size=int(attrs["patch_size"]),
                             overlap=int(self.o.overlap), min_tissue=0.25)
        grid = make_grid(slide, segment_tissue(slide), params)
        ds = PatchDataset(slide.path, grid.coords, grid.attrs["patch_size_level0"], self._encoder.spec.input_size,
                          mpp=slide.mpp)
        feats = embed_patches(self._encoder, ds, resolve_device("auto"))
        slide.close()
        return grid.coords, feats

    # --- one slide ---------------------------------------------------------------------------------
    def make(self, slide_id: str) -> dict:
        if slide_id not in self.slides:
            raise InputError(f"{slide_id}: no slide file in the slide folder")
        coords, size0, attrs, per_fold, ensemble, prediction = self.scores(slide_id)
        slide = open_slide(self.slides[slide_id], mpp=self.o.mpp or attrs.get("level0_mpp"))
        w0, h0 = slide.dimensions
        seg_mpp = max(slide.mpp * max(w0, h0) / self.o.thumb_size, slide.mpp)
        tissue = segment_tissue(slide, TissueConfig(seg_mpp=seg_mpp))
        field, covered = paint(coords, ensemble, size0, tissue.downsample, tissue.mask.shape, self.o.sigma)
        shown = covered & tissue.mask
        if not shown.any():
            raise NoScoresError(f"{slide_id}: no scored patch lies on tissue; nothing to paint")
        self.out.mkdir(parents=True, exist_ok=True)
        paths = {"heatmap": safe_child(self.out, slide_id, "_heatmap.png"),
                 "scores": safe_child(self.out, slide_id, "_scores.h5"),
                 "tiles": safe_child(self.out, slide_id, "_top_tiles.png"),
                 "geojson": safe_child(self.out, slide_id, ".geojson")}
        models = self.models_for(slide_id)
        self._figure(slide_id, tissue, field, shown, prediction, paths["heatmap"], is_distribution(per_fold[0]), models)
        self._save_scores(paths["scores"], coords, per_fold, ensemble, size0, models)
        self._top_tiles(slide, coords, ensemble, attrs, paths["tiles"], slide_id)
        geo = heatmap_geojson(coords, size0, ensemble, per_fold.mean(0), field, shown, tissue, self.o.high_quantile)
        write_text(paths["geojson"], json.dumps(geo))
        slide.close()
        return {"slide_id": slide_id, **{k: str(v) for k, v in paths.items()}}

    def _title(self, slide_id: str, prediction: pd.Series, models: list) -> str:
        """The slide's truth and the models' prediction: P(class) for classes, risk or value otherwise."""
        known = slide_id in self.preds.index
        folds = [int(meta["fold"]) for _, meta in models]
        who = ("mean of all fold models" if len(folds) > 1 else
               f"fold {folds[0]} model, the slide's test fold" if self.test_fold.get(slide_id) == folds[0] else
               f"fold {folds[0]} model")
        if self.classes:
            label = self.preds.loc[slide_id, "label"] if known and "label" in self.preds else "?"
            probs = np.array([prediction[f"prob_{c}"] for c in self.classes])
            c = len(self.classes) - 1 if len(self.classes) == 2 else int(np.argmax(probs))
            return f"{slide_id}   label: {label}   P({self.classes[c]}) = {probs[c]:.2f} ({who})"
        truth = "   ".join(f"{c}: {self.preds.loc[slide_id, c]:g}" for c in self.task.label_cols
                           if known and c in self.preds)
        shown = "risk" if "risk" in prediction else "pred"
        extra = f" ({prediction['risk_group']})" if "risk_group" in prediction else ""
        return f"{slide_id}   {truth}   {shown} = {prediction[shown]:.2f}{extra} ({who})"

    def _figure(self, slide_id, tissue, field, shown, prediction, path: Path, attention: bool, models: list) -> None:
        model = models[0][0]
        fig = heatmap_figure(tissue, field, shown, self._title(slide_id, prediction, models),
                             scale_label(self.o.score, self.o.normalise, attention),
                             self.o.cmap, self.o.alpha, note=model.scores_note)
        save_figure(fig, path, bbox_inches="tight")

    def _save_scores(self, path, coords, per_fold, ensemble, size0, models: list) -> None:
        with atomic_path(path) as tmp:
            with h5py.File(tmp, "w") as fh:
                fh.create_dataset("coords", data=coords)
                fh.create_dataset("fold_scores", data=per_fold.astype(np.float32))
                fh.create_dataset("ensemble", data=ensemble.astype(np.float32))
                fh.attrs.update({"score": self.o.score, "normalise": self.o.normalise, "patch_size_level0": size0,
                                 "folds": [int(m["fold"]) for _, m in models]})

    def _top_tiles(self, slide, coords, ensemble, attrs, path, slide_id) -> None:
        title = f"{slide_id}: tiles at {attrs.get('target_mpp', '?')} µm/px by {self.o.score}"
        fig = top_tiles_figure(slide, coords, ensemble, int(attrs["patch_size_level0"]),
                               int(attrs.get("patch_size", 256)), self.o.top_k, title)
        save_figure(fig, path, bbox_inches="tight", dpi=100)

    # --- many slides -------------------------------------------------------------------------------
    def check(self, slide_ids: list[str] | None = None) -> list[str]:
        """The slides to paint, checked as a batch before anything is written: when none has a feature file
        every slide would fail alike (another cohort's slides without --features), so that is one error."""
        ids = slide_ids or self.default_ids()
        found = [sid for sid in ids if sid in self.slides]   # an id without a slide file fails on its own
        if found and not any(find_feature_file(self.features, sid) for sid in found):
            encoder = (self.models[0][1].get("encoder") or {}).get("encoder", "the run's encoder")
            raise InputError(f"none of the {len(found)} slide(s) to paint has features in {self.features}; extract "
                             f"them with {encoder} (slidemil preprocess --slides ... --encoder {encoder} --out OUT) "
                             f"and pass --features OUT/features_{encoder}")
        return ids

    def make_all(self, slide_ids: list[str] | None = None) -> pd.DataFrame:
        rows = []
        for sid in slide_ids or self.default_ids():
            try:
                rows.append({**self.make(sid), "status": "done", "error": ""})
            except Exception as exc:  # one slide never stops the others
                msg = str(exc) if isinstance(exc, InputError) else f"{type(exc).__name__}: {exc}"
                log.warning("heatmap of %s failed: %s", sid, msg)
                rows.append({"slide_id": sid, "status": "failed", "error": msg})
        table = pd.DataFrame(rows)
        if len(table):
            write_csv(self.out / "heatmaps.csv", table)
        return table
