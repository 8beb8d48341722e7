"""`slidemil robustness`: how much an encoder's embeddings cluster by centre rather than by biology.

For each feature folder: the robustness index at slide level (mean-pooled slide embeddings) and patch
level (a random sample of each slide's patches), linear probes of the label and of the centre on the
slide embeddings, and a 2-D map coloured by centre and by label. Several folders (encoders, or the same
encoder before and after stain normalisation) are compared in one table.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from slidemil.data.cohort import attach_features
from slidemil.errors import InputError
from slidemil.evaluate.robustness import embed_2d, linear_probe, robustness_index
from slidemil.features.store import read_features
from slidemil.tasks import create_task
from slidemil.utils.figures import new_figure, save_figure
from slidemil.utils.io import ensure_writable, safe_child, write_json

log = logging.getLogger(__name__)


class RobustnessSettings(BaseModel):
    """Options of `slidemil robustness` (and the `robustness` key of a benchmark grid)."""

    model_config = ConfigDict(extra="forbid")

    label_col: str = Field("label", description="Biological class column of the label table.")
    site_col: str = Field("site", description="Centre column of the label table.")
    slide_col: str = Field("slide_id", description="Slide id column.")
    case_col: str = Field("case_id", description="Patient id column.")
    k_slide: int = Field(10, ge=1, description="Neighbours per slide for the slide-level index.")
    k_patch: int = Field(50, ge=1, description="Neighbours per patch for the patch-level index.")
    patches_per_slide: int = Field(32, ge=1, description="Patches sampled per slide for the patch-level index.")
    map: Literal["auto", "umap", "pca"] = Field("auto", description="2-D map: umap (needs umap-learn), pca, "
                                                                   "or auto (umap when installed).")
    bootstrap: int = Field(200, ge=0, description="Patient-bootstrap resamples for the index's CI.")
    balance: bool = Field(True, description="Compute the index on class x centre balanced subsamples (as the "
                                            "paper's datasets are built); --no-balance uses every sample.")
    draws: int = Field(10, ge=1, description="Balanced subsamples drawn and averaged.")
    seed: int = Field(0, description="Patch sampling, probes and map.")


def load_embeddings(cohort, settings: RobustnessSettings) -> dict:
    """Slide means and a per-slide patch sample with their slide's label, centre and patient."""
    rng = np.random.default_rng(settings.seed)
    slide, patch, rows = [], [], []
    for i, path in enumerate(cohort.table["feature_path"]):
        x = read_features(path).features
        slide.append(x.mean(0))
        take = rng.choice(len(x), min(len(x), settings.patches_per_slide), replace=False)
        patch.append(x[take])
        rows.append(np.full(len(take), i))
    rows = np.concatenate(rows)
    t = cohort.table
    cols = {c: t[c].to_numpy() for c in ("label", "site", "case_id")}
    return {"slide": (np.stack(slide), cols), "patch": (np.concatenate(patch), {c: v[rows] for c, v in cols.items()})}


def analyse(cohort, settings: RobustnessSettings) -> tuple[dict, dict]:
    """(results, what the figure needs) for one feature folder."""
    emb = load_embeddings(cohort, settings)
    result = {}
    for level, k in (("slide", settings.k_slide), ("patch", settings.k_patch)):
        x, c = emb[level]
        result[level] = {"robustness_index": robustness_index(x, c["label"], c["site"], c["case_id"], k,
                                                             settings.bootstrap, settings.seed, settings.balance,
                                                             settings.draws)}
    x, c = emb["slide"]
    result["slide"]["probe_label"] = linear_probe(x, c["label"], c["case_id"], settings.seed)
    result["slide"]["probe_centre"] = linear_probe(x, c["site"], c["case_id"], settings.seed)
    coords, method = embed_2d(x, settings.map, settings.seed)
    result["slide"]["map"] = method
    return result, {"coords": coords, "label": c["label"], "site": c["site"], "method": method}


def plot_robustness(name: str, result: dict, fig_data: dict, path: Path) -> Path:
    """Three panels: the slide map coloured by centre, the same by label, RI(k) curves."""
    fig, axes = new_figure((13, 4), 1, 3)
    xy = fig_data["coords"]
    for ax, key in zip(axes[:2], ("site", "label")):
        for value in sorted(set(fig_data[key])):
            sel = fig_data[key] == value
            ax.scatter(xy[sel, 0], xy[sel, 1], s=18, label=str(value), alpha=0.8)
        ax.set_title(f"slides by {'centre' if key == 'site' else 'label'} ({fig_data['method'].upper()})")
        ax.legend(fontsize=7, loc="best")
        ax.set_xticks([])
        ax.set_yticks([])
    for level in ("slide", "patch"):
        ri = result[level]["robustness_index"]
        line = axes[2].plot(np.arange(1, len(ri["curve"]) + 1), ri["curve"], label=level)[0]
        axes[2].axhline(ri["chance"], color=line.get_color(), lw=0.8, ls="--")
    axes[2].set_yscale("log")
    axes[2].set_xlabel("k (neighbours)")
    axes[2].set_ylabel("R = SO / OS (dashed: random embeddings)")
    axes[2].legend()
    axes[2].set_title(f"{name}: above the dashed line, biology dominates")
    return save_figure(fig, path, dpi=100, bbox_inches="tight")


def read_cohorts(features: dict[str, str | Path], labels: str | Path, settings: RobustnessSettings) -> dict:
    """Each feature folder's cohort, validated before anything is written."""
    if not features:
        raise InputError("give at least one --features folder")
    task = create_task({"task": "classification", "label_col": settings.label_col, "site_col": settings.site_col,
                        "slide_col": settings.slide_col, "case_col": settings.case_col})
    cohort = task.read(labels)
    _check_design(cohort.table, labels, settings.site_col)
    return {name: attach_features(cohort, folder) for name, folder in features.items()}


def _check_design(table, labels, site_col: str) -> None:
    """The index compares neighbours of one class from other centres (SO) with neighbours of other classes
    from the same centre (OS): it needs a centre holding two classes and a class seen at two centres. A
    cohort without them (centre confounded with the class, or a centre column that names each patient)
    gave an undefined index and a crash in the plot."""
    if table["site"].nunique() < 2:
        raise InputError(f"{labels}: column {site_col!r} names one centre; the robustness index compares two or more")
    classes_per_centre = table.groupby("site")["label"].nunique()
    centres_per_class = table.groupby("label")["site"].nunique()
    if classes_per_centre.max() < 2 or centres_per_class.max() < 2:
        what = ("names a centre per patient" if table.groupby("site")["case_id"].nunique().max() == 1
                else "confounds centre and class: every centre holds one class" if classes_per_centre.max() < 2
                else "has no class seen at two centres")
        raise InputError(f"{labels}: column {site_col!r} {what}, so neighbours of another class from the same centre "
                         "(or of the same class from another centre) cannot exist and the robustness index is "
                         "undefined; it needs centres that each hold several classes")


def run_robustness(features: dict[str, str | Path], labels: str | Path, out: str | Path,
                   settings: RobustnessSettings | None = None) -> dict:
    """robustness.json (every folder's index, probes and map method, and a comparison table) and
    `<name>_robustness.png` per folder in `out`."""
    settings = settings or RobustnessSettings()
    cohorts = read_cohorts(features, labels, settings)
    out = ensure_writable(out)
    report = {"settings": settings.model_dump(), "labels": str(labels), "features": {}, "comparison": []}
    for name, cohort in cohorts.items():
        result, fig_data = analyse(cohort, settings)
        result["plot"] = plot_robustness(name, result, fig_data, safe_child(out, name, "_robustness.png")).name
        result["folder"] = str(features[name])
        report["features"][name] = result
        report["comparison"].append(comparison_row(name, result))
        log.info("%s: slide R %.3f (chance %.2f), patch R %.3f, centre probe %.2f, label probe %.2f", name,
                 result["slide"]["robustness_index"]["value"], result["slide"]["robustness_index"]["chance"],
                 result["patch"]["robustness_index"]["value"],
                 result["slide"]["probe_centre"]["balanced_accuracy"], result["slide"]["probe_label"]["balanced_accuracy"])
    write_json(out / "robustness.json", report)
    return report


def comparison_row(name: str, result: dict) -> dict:
    s, p = result["slide"], result["patch"]
    ri = s["robustness_index"]
    return {"features": name, "slide_ri": ri["value"], "slide_ri_ci_low": ri["ci_low"],
            "slide_ri_ci_high": ri["ci_high"], "slide_ri_chance": ri["chance"], "slide_reading": ri["reading"],
            "slide_ri_normalized": ri["normalized"], "patch_ri": p["robustness_index"]["value"],
            "patch_ri_chance": p["robustness_index"]["chance"],
            "centre_probe_bacc": s["probe_centre"]["balanced_accuracy"], "centre_chance": s["probe_centre"]["chance"],
            "label_probe_bacc": s["probe_label"]["balanced_accuracy"], "label_chance": s["probe_label"]["chance"]}
