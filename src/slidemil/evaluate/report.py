"""`slidemil evaluate`: metrics.json, plots/ and a self-contained report.html from a run folder."""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from slidemil.errors import InputError
from slidemil.evaluate.metrics import METRICS, bootstrap_ci, classification_metrics
from slidemil.evaluate.plots import plot_all
from slidemil.utils.io import write_json, write_text


def _load(run: Path):
    pred_path, cfg_path = run / "predictions.csv", run / "config.yaml"
    if not pred_path.is_file() or not cfg_path.is_file():
        raise InputError(f"{run} is not a finished run folder (needs predictions.csv and config.yaml)")
    cfg = yaml.safe_load(cfg_path.read_text())
    preds = pd.read_csv(pred_path, dtype={"slide_id": str, "case_id": str, "label": str, "pred": str})
    classes = [str(c) for c in cfg["slidemil"]["classes"]]
    missing = [f"prob_{c}" for c in classes if f"prob_{c}" not in preds.columns]
    if missing:
        raise InputError(f"{pred_path}: columns {', '.join(missing)} are missing")
    return cfg, preds, classes


def evaluate_run(run: str | Path, n_boot: int = 1000, seed: int = 0, heatmaps: str | Path | None = None) -> dict:
    """Pooled out-of-fold metrics with patient-bootstrap CIs, per-fold metrics, plots and the report."""
    run = Path(run)
    cfg, preds, classes = _load(run)
    y = preds["label"].map({c: i for i, c in enumerate(classes)}).to_numpy()
    probs = preds[[f"prob_{c}" for c in classes]].to_numpy(float)
    per_fold = {}
    for fold, part in preds.groupby("fold"):
        idx = part.index.to_numpy()
        per_fold[int(fold)] = {**classification_metrics(y[idx], probs[idx]), "n_slides": int(len(idx))}
    fold_summary = {}
    for m in METRICS:
        vals = np.array([f[m] for f in per_fold.values()], dtype=float)
        vals = vals[np.isfinite(vals)]
        fold_summary[m] = {"mean": float(vals.mean()) if len(vals) else float("nan"),
                           "std": float(vals.std(ddof=1)) if len(vals) > 1 else float("nan")}
    metrics = {
        "task": "classification", "classes": classes, "n_slides": int(len(preds)),
        "n_patients": int(preds["case_id"].nunique()), "bootstrap": {"resamples": n_boot, "unit": "patient"},
        "pooled": bootstrap_ci(y, probs, preds["case_id"].to_numpy(), n_boot=n_boot, seed=seed),
        "folds": per_fold, "fold_summary": fold_summary,
    }
    write_json(run / "metrics.json", metrics)
    plots = plot_all(y, probs, classes, run / "plots", groups=preds["case_id"].to_numpy())
    gallery = heatmap_gallery(preds, classes, Path(heatmaps) if heatmaps else run / "heatmaps")
    write_report(run, cfg, metrics, plots, gallery)
    return metrics


def heatmap_gallery(preds: pd.DataFrame, classes: list[str], folder: Path, per_group: int = 3) -> list:
    """[(section title, [(caption, heatmap path)])]: best true positives, worst false positives, false
    negatives (binary), or most confident correct and wrong predictions (multi-class)."""
    if not folder.is_dir():
        return []
    have = {p.name[: -len("_heatmap.png")]: p for p in folder.glob("*_heatmap.png")}
    if not have:
        return []
    p = preds[preds["slide_id"].isin(have)].copy()
    p["conf"] = p[[f"prob_{c}" for c in classes]].max(axis=1)
    correct = p["label"] == p["pred"]
    if len(classes) == 2:
        pos = classes[1]
        p["score"] = p[f"prob_{pos}"]
        groups = [("Best true positives", p[correct & (p["label"] == pos)].sort_values("score", ascending=False)),
                  ("Worst false positives", p[~correct & (p["pred"] == pos)].sort_values("score", ascending=False)),
                  ("False negatives", p[~correct & (p["label"] == pos)].sort_values("score"))]
    else:
        groups = [("Most confident correct", p[correct].sort_values("conf", ascending=False)),
                  ("Most confident errors", p[~correct].sort_values("conf", ascending=False))]
    out = []
    for title, part in groups:
        items = [(f"{r.slide_id}: label {r.label}, predicted {r.pred} ({r.conf:.2f})", have[r.slide_id])
                 for r in part.head(per_group).itertuples()]
        out.append((title, items))
    return out


def _img(path: Path, max_side: int | None = None) -> str:
    raw = Path(path).read_bytes()
    if max_side:
        from PIL import Image

        im = Image.open(io.BytesIO(raw))
        im.thumbnail((max_side, max_side))
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        raw = buf.getvalue()
    data = base64.b64encode(raw).decode()
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(Path(path).stem)}">'


def _fmt(v: float) -> str:
    return "n/a" if v is None or not np.isfinite(v) else f"{v:.3f}"


def write_report(run: Path, cfg: dict, metrics: dict, plots: dict[str, Path], gallery: list | None = None) -> Path:
    """One HTML file with everything embedded: it opens from disk, e-mail or a browser with no server."""
    rows = "".join(
        f"<tr><td>{m}</td><td><b>{_fmt(v['value'])}</b></td><td>{_fmt(v['ci_low'])} – {_fmt(v['ci_high'])}</td>"
        f"<td>{_fmt(metrics['fold_summary'][m]['mean'])} ± {_fmt(metrics['fold_summary'][m]['std'])}</td></tr>"
        for m, v in metrics["pooled"].items())
    fold_rows = "".join(
        f"<tr><td>{k}</td><td>{f['n_slides']}</td>" + "".join(f"<td>{_fmt(f[m])}</td>" for m in METRICS) + "</tr>"
        for k, f in metrics["folds"].items())
    prov = cfg.get("slidemil", {})
    sections = "".join(
        f"<h3>{html.escape(title)}</h3>" + ("".join(f'<figure>{_img(p, 640)}<figcaption>{html.escape(cap)}</figcaption></figure>'
                                                    for cap, p in items) or "<p class=note>none</p>")
        for title, items in (gallery or []))
    gallery_html = f"<h2>Heatmaps</h2>{sections}" if sections else ""
    config_text = html.escape(yaml.safe_dump({k: v for k, v in cfg.items() if k != "slidemil"}, sort_keys=False))
    body = f"""<!doctype html><html><head><meta charset="utf-8"><title>slidemil report: {html.escape(run.name)}</title>
<style>body{{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}}
table{{border-collapse:collapse;margin:1em 0}}td,th{{border:1px solid #ccc;padding:4px 10px;text-align:right}}
td:first-child,th:first-child{{text-align:left}}.plots img{{width:260px;margin:4px}}pre{{background:#f5f5f5;padding:1em;overflow:auto}}
.note{{color:#555;font-size:90%}}figure{{display:inline-block;margin:6px;max-width:650px}}
figure img{{max-width:640px}}figcaption{{font-size:85%;color:#333}}</style></head><body>
<h1>slidemil report: {html.escape(run.name)}</h1>
<p>Model <b>{html.escape(str(cfg.get('model')))}</b>, {metrics['n_slides']} slides from {metrics['n_patients']} patients,
classes {html.escape(', '.join(metrics['classes']))}. slidemil {html.escape(str(prov.get('version')))}, torch {html.escape(str(prov.get('torch')))}.</p>
<h2>Metrics (pooled out-of-fold predictions)</h2>
<table><tr><th>metric</th><th>value</th><th>95% CI (patient bootstrap, {metrics['bootstrap']['resamples']} resamples)</th><th>fold mean ± sd</th></tr>{rows}</table>
<p class="note">Each test fold was used only to report: epochs and checkpoints were chosen on an inner validation split,
and predictions are the argmax of the probabilities (no threshold tuned on test data).</p>
<div class="plots">{''.join(_img(p) for p in plots.values())}</div>
{gallery_html}
<h2>Per fold</h2><table><tr><th>fold</th><th>slides</th>{''.join(f'<th>{m}</th>' for m in METRICS)}</tr>{fold_rows}</table>
<h2>Configuration</h2><pre>{config_text}</pre>
<p class="note">features fingerprint {html.escape(str(prov.get('features_sha256', ''))[:16])}…, git {html.escape(str(prov.get('git_commit')))}</p>
</body></html>"""
    path = run / "report.html"
    write_text(path, body)
    return path


def summary_line(metrics: dict) -> str:
    auc = metrics["pooled"]["auroc"]
    return f"AUROC {_fmt(auc['value'])} (95% CI {_fmt(auc['ci_low'])}-{_fmt(auc['ci_high'])})"


def load_metrics(run: Path) -> dict:
    return json.loads((Path(run) / "metrics.json").read_text())
