"""The report page of a run (a self-contained report.html) and its heatmap gallery; the metrics and
plots it shows come from the run's task (`slidemil.tasks.evaluate_run`)."""

from __future__ import annotations

import base64
import html
import io
from importlib import resources
from pathlib import Path
from string import Template

import numpy as np
import pandas as pd
import yaml

from slidemil.rundir import RunDir
from slidemil.utils.io import write_text

# The page, shipped as package data; `$name` fields are filled by `write_report` (values HTML-escaped).
_TEMPLATE = Template(resources.files("slidemil.evaluate").joinpath("templates/report.html").read_text("utf-8"))


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
    out, shown = [], set()
    for title, part in groups:
        items = [(f"{r.slide_id}: label {r.label}, predicted {r.pred} ({r.conf:.2f})", have[r.slide_id])
                 for r in part.head(per_group).itertuples()]
        shown |= {r.slide_id for r in part.head(per_group).itertuples()}
        out.append((title, items))
    return out + _the_rest(p.set_index("slide_id"), have, shown,
                           lambda r: f"label {r['label']}, predicted {r['pred']} ({r['conf']:.2f})")


def outcome_gallery(preds: pd.DataFrame, score: str, what: str, folder: Path, truth, per_group: int = 3) -> list:
    """The gallery of tasks without classes: highest and lowest `score` (risk, predicted value) among the
    slides that have a heatmap, then every other heatmap; `truth(row)` is the caption's truth text."""
    if not folder.is_dir():
        return []
    have = {p.name[: -len("_heatmap.png")]: p for p in folder.glob("*_heatmap.png")}
    p = preds[preds["slide_id"].isin(have)].sort_values(score, ascending=False)
    if p.empty:
        return []
    high = p.head(per_group)
    low = p[~p["slide_id"].isin(high["slide_id"])].tail(per_group).iloc[::-1]
    out = []
    for title, part in ((f"Highest {what}", high), (f"Lowest {what}", low)):
        out.append((title, [(f"{r['slide_id']}: {truth(r)}, {what} {r[score]:.2f}", have[r["slide_id"]])
                            for _, r in part.iterrows()]))
    shown = set(high["slide_id"]) | set(low["slide_id"])
    return out + _the_rest(p.set_index("slide_id"), have, shown, lambda r: f"{truth(r)}, {what} {r[score]:.2f}")


def _the_rest(rows: pd.DataFrame, have: dict, shown: set, caption) -> list:
    """Every heatmap not in a section yet: the report shows each one the run made."""
    rest = [s for s in sorted(have) if s not in shown]
    if not rest:
        return []
    return [("Other slides with heatmaps", [(f"{s}: {caption(rows.loc[s])}" if s in rows.index else s, have[s])
                                             for s in rest])]


def img_tag(path: Path, max_side: int | None = None) -> str:
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


PROTOCOL = {"classification": "and predictions are the argmax of the probabilities (no threshold tuned on test data).",
            "ordinal": "and grades are the rank-consistent CORN prediction (no threshold tuned on test data).",
            "survival": "and risk groups are cut at the median of each fold's training predictions (no test data).",
            "regression": "and the target was standardised with each training fold's mean and SD."}


def unit_note(metrics: dict) -> str:
    """What one row of the metrics is: a patient (default) or a slide."""
    n = metrics.get("n_units", metrics["n_slides"])
    if metrics.get("unit", "slide") == "patient":
        return (f"Metrics are per patient ({n} rows): a patient's slides are averaged (per label where they differ) "
                f"and count once; --eval-unit slide scores slides instead.")
    return f"Metrics are per slide ({n} rows): a patient with several slides counts several times."


def _methods_html(sections) -> str:
    if not sections:
        return ""
    body = "".join(f"<p><b>{html.escape(title)}.</b> {html.escape(text)}</p>" for title, text in sections if text)
    return ("<h2>Methods (draft)</h2><p class=note>Written from what this run recorded (also in methods.md): edit it "
            f"into your paper; every setting and number is the run's.</p><div class=methods>{body}</div>")


def write_report(run: RunDir, cfg: dict, metrics: dict, plots: dict[str, Path], gallery: list | None = None,
                 notes: str = "", external: str = "", methods: list[tuple[str, str]] = ()) -> Path:
    """One HTML file with everything embedded: it opens from disk, e-mail or a browser with no server.
    `notes` is task-specific HTML (already escaped) shown under the metric table; `external` the External
    validation section (HTML, already escaped); `methods` the draft methods paragraphs [(title, text)]."""
    names = list(metrics["pooled"])
    task = metrics.get("task", "classification")
    rows = "".join(
        f"<tr><td>{m}</td><td><b>{_fmt(v['value'])}</b></td><td>{_fmt(v['ci_low'])} – {_fmt(v['ci_high'])}</td>"
        f"<td>{_fmt(metrics['fold_summary'][m]['mean'])} ± {_fmt(metrics['fold_summary'][m]['std'])}</td></tr>"
        for m, v in metrics["pooled"].items())
    fold_rows = "".join(
        f"<tr><td>{k}</td><td>{f['n_slides']}</td>" + "".join(f"<td>{_fmt(f[m])}</td>" for m in names) + "</tr>"
        for k, f in metrics["folds"].items())
    prov = cfg.get("slidemil", {})
    sections = "".join(
        f"<h3>{html.escape(title)}</h3>"
        + ("".join(f'<figure>{img_tag(p, 640)}<figcaption>{html.escape(cap)}</figcaption></figure>' for cap, p in items)
           or "<p class=note>none</p>")
        for title, items in (gallery or []))
    gallery_html = f"<h2>Heatmaps</h2>{sections}" if sections else ""
    shown = {k: v for k, v in cfg.items() if k != "slidemil"} | ({"built_with": prov["arguments"]} if "arguments" in prov else {})
    config_text = html.escape(yaml.safe_dump(shown, sort_keys=False))   # built_with: every argument, defaults too
    body = _TEMPLATE.substitute(
        run_name=html.escape(run.name), model=html.escape(str(cfg.get("model"))), n_slides=metrics["n_slides"],
        n_patients=metrics["n_patients"], unit_note=html.escape(unit_note(metrics)),
        target=html.escape(f"classes {', '.join(metrics['classes'])}" if metrics.get("classes") else f"task {task}"),
        protocol=PROTOCOL.get(task, ""), task_notes=notes,
        version=html.escape(str(prov.get("version"))), torch=html.escape(str(prov.get("torch"))),
        resamples=metrics["bootstrap"]["resamples"], metric_rows=rows, plots="".join(img_tag(p) for p in plots.values()),
        gallery=gallery_html, external=external, methods=_methods_html(methods),
        fold_header="".join(f"<th>{m}</th>" for m in names), fold_rows=fold_rows,
        config=config_text, fingerprint=html.escape(str(prov.get("features_sha256", ""))[:16]),
        git=html.escape(str(prov.get("git_commit"))))
    write_text(run.report_path, body)
    return run.report_path
