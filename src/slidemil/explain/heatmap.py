"""`slidemil heatmap`: a run's instance scores back on its slides, exactly on the run's patch grid.

Scores come from the run's own features and fold models (no re-patching, no other grid). Per slide:
`<id>_heatmap.png`, `<id>_scores.h5` (coords, per-fold raw scores, ensemble), `<id>_top_tiles.png`
and `<id>.geojson` (one QuPath detection per patch with its score, plus high-score regions).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import h5py
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

from slidemil.errors import InputError  # noqa: E402
from slidemil.explain.paint import normalise, paint  # noqa: E402
from slidemil.features.store import find_feature_file, read_features  # noqa: E402
from slidemil.models.checkpoint import load_model  # noqa: E402
from slidemil.predict import fold_dirs  # noqa: E402
from slidemil.slides.reader import list_slides, open_slide, read_at  # noqa: E402
from slidemil.slides.tissue import TissueMask, TissueParams, mask_to_geojson, segment_tissue  # noqa: E402
from slidemil.utils.io import atomic_path, safe_child, write_text  # noqa: E402

log = logging.getLogger(__name__)


class NoScoresError(InputError):
    pass


@dataclass
class HeatmapOptions:
    fold: str = "all"                 # "all" (mean of every fold model) or a fold number
    score: str = "attention"          # attention | logit | class:<name>
    normalise: str = "percentile"     # percentile | minmax
    sigma: float = 0.0                # Gaussian smoothing, thumbnail pixels
    cmap: str = "jet"
    alpha: float = 0.5
    top_k: int = 8
    thumb_size: int = 2048            # long side of the heatmap, pixels
    high_quantile: float = 0.9        # normalised score above which a region is outlined
    mpp: float | None = None
    overlap: int | None = None        # px at the run's resolution: a finer grid, features made with the run's encoder


def select_scores(out, score: str, classes: list[str]) -> np.ndarray:
    """One score per instance from a model output, as `--score` asks."""
    if score == "attention":
        s = out.instance_scores
        if s is None:
            raise NoScoresError("this model returns no instance scores")
        return s[0].float().cpu().numpy()
    if score == "logit":
        il = out.extras.get("instance_logits")
        if il is None:
            raise NoScoresError("this model has no instance logits; use --score attention")
        return il[0, -1].float().cpu().numpy() if il.shape[1] in (1, 2) else \
            il[0, int(out.logits[0].argmax())].float().cpu().numpy()
    if score.startswith("class:"):
        name = score[6:]
        if name not in classes:
            raise InputError(f"--score {score}: class {name!r} is not one of {', '.join(classes)}")
        c = classes.index(name)
        per_class = out.extras.get("attention")
        if per_class is not None and per_class.shape[1] == len(classes):
            return per_class[0, c].float().cpu().numpy()
        il = out.extras.get("instance_logits")
        if il is not None and il.shape[1] == len(classes):
            return il[0, c].float().cpu().numpy()
        if il is not None and il.shape[1] == 1 and len(classes) == 2:
            return (il[0, 0] if c == 1 else -il[0, 0]).float().cpu().numpy()
        raise NoScoresError(f"this model has no per-class instance scores; use --score attention")
    raise InputError(f"--score must be attention, logit or class:<name>, not {score!r}")


class HeatmapRun:
    def __init__(self, run: str | Path, slides_dir: str | Path, out: str | Path, opts: HeatmapOptions | None = None):
        self.run, self.out, self.o = Path(run), Path(out), opts or HeatmapOptions()
        cfg_path = self.run / "config.yaml"
        if not cfg_path.is_file():
            raise InputError(f"{self.run} is not a run folder (no config.yaml)")
        self.cfg = yaml.safe_load(cfg_path.read_text())
        self.features = Path(self.cfg["features"])
        self.slides = {p.stem: p for p in list_slides(slides_dir)}
        folds = fold_dirs(self.run)
        if self.o.fold != "all":
            folds = [d for d in folds if d.name == f"fold_{self.o.fold}"]
            if not folds:
                raise InputError(f"--fold {self.o.fold}: {self.run} has no finished fold_{self.o.fold}")
        self.models = [load_model(d) for d in folds]
        self._encoder = None
        self.classes = self.models[0][1]["classes"]
        pred_path = self.run / "predictions.csv"
        self.preds = (pd.read_csv(pred_path, dtype={"slide_id": str}).set_index("slide_id")
                      if pred_path.exists() else pd.DataFrame())

    def default_ids(self) -> list[str]:
        ids = list(self.preds.index) if len(self.preds) else sorted(self.slides)
        return [s for s in ids if s in self.slides]

    # --- scores ------------------------------------------------------------------------------------
    @torch.no_grad()
    def scores(self, slide_id: str):
        path = find_feature_file(self.features, slide_id)
        if path is None:
            raise NoScoresError(f"{slide_id}: no features under {self.features}, so no scores to paint; "
                                "extract them first")
        bag = read_features(path)
        if bag.coords is None:
            raise NoScoresError(f"{path}: has no coords (a CLAM .pt file?); heatmaps need patch coordinates")
        size0 = bag.attrs.get("patch_size_level0")
        if size0 is None:
            raise NoScoresError(f"{path}: no patch_size_level0 attribute; cannot place patches on the slide")
        coords, feats = bag.coords, bag.features
        if self.o.overlap:
            coords, feats = self._finer_grid(slide_id, bag.attrs)
        x = torch.from_numpy(feats)[None]
        per_fold, probs = [], []
        for model, _ in self.models:
            out = model(x)
            per_fold.append(select_scores(out, self.o.score, self.classes))
            probs.append(torch.softmax(out.logits.float(), 1)[0].numpy())
        per_fold = np.stack(per_fold)
        ensemble = np.mean([normalise(s, self.o.normalise) for s in per_fold], 0)
        return coords, float(size0), bag.attrs, per_fold, ensemble, np.mean(probs, 0)

    def _finer_grid(self, slide_id: str, attrs: dict):
        """Patches at the run's resolution and size with `overlap`, embedded by the run's encoder."""
        from slidemil.features.encoders import create_encoder
        from slidemil.features.extract import PatchDataset, embed_patches
        from slidemil.slides.patching import PatchParams, make_grid
        from slidemil.train.trainer import resolve_device

        if "encoder" not in attrs or "target_mpp" not in attrs:
            raise InputError(f"{slide_id}: the run's features do not name their encoder and resolution; "
                             "--overlap needs both (features written by slidemil have them)")
        if self._encoder is None:
            weights = attrs.get("encoder_weights")
            self._encoder = create_encoder(attrs["encoder"], weights if weights and Path(weights).is_file() else None)
        slide = open_slide(self.slides[slide_id], mpp=self.o.mpp or attrs.get("level0_mpp"))
        params = PatchParams(target_mpp=float(attrs["target_mpp"]), patch_size=int(attrs["patch_size"]),
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
        coords, size0, attrs, per_fold, ensemble, probs = self.scores(slide_id)
        slide = open_slide(self.slides[slide_id], mpp=self.o.mpp or attrs.get("level0_mpp"))
        w0, h0 = slide.dimensions
        seg_mpp = max(slide.mpp * max(w0, h0) / self.o.thumb_size, slide.mpp)
        tissue = segment_tissue(slide, TissueParams(seg_mpp=seg_mpp))
        field, covered = paint(coords, ensemble, size0, tissue.downsample, tissue.mask.shape, self.o.sigma)
        shown = covered & tissue.mask
        if not shown.any():
            raise NoScoresError(f"{slide_id}: no scored patch lies on tissue; nothing to paint")
        self.out.mkdir(parents=True, exist_ok=True)
        paths = {"heatmap": safe_child(self.out, slide_id, "_heatmap.png"),
                 "scores": safe_child(self.out, slide_id, "_scores.h5"),
                 "tiles": safe_child(self.out, slide_id, "_top_tiles.png"),
                 "geojson": safe_child(self.out, slide_id, ".geojson")}
        self._figure(slide_id, tissue, field, shown, probs, paths["heatmap"])
        self._save_scores(paths["scores"], coords, per_fold, ensemble, size0)
        self._top_tiles(slide, coords, ensemble, attrs, paths["tiles"], slide_id)
        write_text(paths["geojson"], json.dumps(self.geojson(coords, size0, ensemble, per_fold.mean(0), field, shown, tissue)))
        slide.close()
        return {"slide_id": slide_id, **{k: str(v) for k, v in paths.items()}}

    def _title(self, slide_id: str, probs: np.ndarray) -> str:
        label = self.preds.loc[slide_id, "label"] if slide_id in self.preds.index and "label" in self.preds else "?"
        c = len(self.classes) - 1 if len(self.classes) == 2 else int(np.argmax(probs))
        who = "mean of all fold models" if self.o.fold == "all" else f"fold {self.o.fold} model"
        return f"{slide_id}   label: {label}   P({self.classes[c]}) = {probs[c]:.2f} ({who})"

    def _figure(self, slide_id, tissue: TissueMask, field, shown, probs, path: Path) -> None:
        h, w = shown.shape
        fig, ax = plt.subplots(figsize=(10, 10 * h / w + 0.8), dpi=max(72, min(200, int(w / 10))))
        ax.imshow(tissue.thumbnail)
        overlay = np.where(shown, field, np.nan)
        im = ax.imshow(overlay, cmap=self.o.cmap, alpha=self.o.alpha, vmin=0, vmax=1, interpolation="nearest")
        ax.set_axis_off()
        ax.set_title(self._title(slide_id, probs), fontsize=10)
        cb = fig.colorbar(im, ax=ax, fraction=0.03, pad=0.01)
        cb.set_label(f"{self.o.score} ({self.o.normalise} within slide)")
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", bbox_inches="tight")
        plt.close(fig)

    def _save_scores(self, path, coords, per_fold, ensemble, size0) -> None:
        with atomic_path(path) as tmp:
            with h5py.File(tmp, "w") as fh:
                fh.create_dataset("coords", data=coords)
                fh.create_dataset("fold_scores", data=per_fold.astype(np.float32))
                fh.create_dataset("ensemble", data=ensemble.astype(np.float32))
                fh.attrs.update({"score": self.o.score, "normalise": self.o.normalise, "patch_size_level0": size0,
                                 "folds": [int(m["fold"]) for _, m in self.models]})

    def _top_tiles(self, slide, coords, ensemble, attrs, path, slide_id) -> None:
        k = min(self.o.top_k, len(coords) // 2 or 1)
        order = np.argsort(-ensemble)
        picks = [("top", i) for i in order[:k]] + [("bottom", i) for i in order[::-1][:k]]
        size = int(attrs.get("patch_size", 256))
        size0 = int(attrs["patch_size_level0"])
        fig, axes = plt.subplots(2, k, figsize=(2 * k, 4.6), squeeze=False)
        for j, (row, i) in enumerate(picks):
            ax = axes[0 if row == "top" else 1, j % k]
            ax.imshow(read_at(slide, int(coords[i, 0]), int(coords[i, 1]), size0, size))
            ax.set_title(f"{ensemble[i]:.2f}", fontsize=8)
            ax.set_axis_off()
        axes[0, 0].text(-0.1, 0.5, "highest", transform=axes[0, 0].transAxes, rotation=90, va="center", ha="right")
        axes[1, 0].text(-0.1, 0.5, "lowest", transform=axes[1, 0].transAxes, rotation=90, va="center", ha="right")
        fig.suptitle(f"{slide_id}: tiles at {attrs.get('target_mpp', '?')} µm/px by {self.o.score}", fontsize=10)
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", bbox_inches="tight", dpi=100)
        plt.close(fig)

    def geojson(self, coords, size0, ensemble, raw, field, shown, tissue: TissueMask) -> dict:
        """QuPath feature collection: a detection per patch (level-0 square, score measurements) and
        annotations outlining regions whose normalised score is above `high_quantile`."""
        feats = []
        for (x, y), s, r in zip(coords.tolist(), ensemble.tolist(), raw.tolist()):
            ring = [[x, y], [x + size0, y], [x + size0, y + size0], [x, y + size0], [x, y]]
            feats.append({"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring]},
                          "properties": {"objectType": "detection", "classification": {"name": "Patch"},
                                         "measurements": {"score": s, "raw_score": r}}})
        high = TissueMask(shown & (np.nan_to_num(field) >= self.o.high_quantile), tissue.downsample, tissue.thumbnail)
        for f in mask_to_geojson(high, name="High score")["features"]:
            feats.append(f)
        return {"type": "FeatureCollection", "features": feats}

    # --- many slides -------------------------------------------------------------------------------
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
            from slidemil.utils.io import write_csv

            write_csv(self.out / "heatmaps.csv", table)
        return table
