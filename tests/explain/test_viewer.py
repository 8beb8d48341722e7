"""`slidemil view`: Deep Zoom tiles that are the slide, and a page that a real headless Chromium draws with
the heatmap's hot patches where the scores put them."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET

import h5py
import numpy as np
import pytest
from matplotlib import colormaps
from PIL import Image
from typer.testing import CliRunner

from slidemil.cli import app
from slidemil.explain.deepzoom import dzi_levels
from slidemil.explain.paint import paint
from slidemil.slides.reader import open_slide
from slidemil.slides.synthetic import MASK_DOWNSAMPLE

pytestmark = pytest.mark.slow  # uses the demo run and a browser
runner = CliRunner()
WINDOW = (1000, 700)
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--hide-scrollbars", "--force-device-scale-factor=1", f"--window-size={WINDOW[0]},{WINDOW[1]}",
         "--virtual-time-budget=15000"]


def browser() -> str:
    """Chromium from the distribution (`.ci/run` installs it); the viewer test needs a real browser."""
    found = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    assert found, "the viewer test drives a real headless browser: install Chromium (Debian: apt-get install chromium)"
    return found


def chromium(url: str, tmp_path, *args: str) -> str:
    res = subprocess.run([browser(), *FLAGS, f"--user-data-dir={tmp_path / 'profile'}", *args, url],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stdout


def page_state(index, fragment: str, tmp_path) -> dict:
    """The viewer's drawn state (#status JSON) after the page has loaded its tiles."""
    dom = chromium(f"{index.as_uri()}#{fragment}", tmp_path, "--dump-dom")
    state = json.loads(re.search(r'<pre id="status">(.*?)</pre>', dom, re.S).group(1).replace("&amp;", "&"))
    return state


@pytest.fixture(scope="module")
def viewer(demo_run, tmp_path_factory):
    root, _ = demo_run
    run, slides = root / "run", root / "cohort" / "slides"
    ids = sorted(p.name[: -len("_scores.h5")] for p in (run / "heatmaps").glob("*_scores.h5"))[:2]
    out = tmp_path_factory.mktemp("viewer")
    res = runner.invoke(app, ["view", str(run), "--slides", str(slides), "--out", str(out), "--slide-ids", ",".join(ids)])
    assert res.exit_code == 0, res.output
    return root, out, ids


def test_deep_zoom_tiles_are_the_slide(viewer):
    root, out, ids = viewer
    sid = ids[0]
    entry = json.loads((out / f"{sid}.json").read_text())
    size = ET.parse(out / f"{sid}.dzi").getroot()[0].attrib
    width, height = int(size["Width"]), int(size["Height"])
    slide = open_slide(root / "cohort" / "slides" / f"{sid}.tif")
    assert entry["scale"] == pytest.approx(2.0)            # 0.5 µm/px slides tiled at the default 1.0 µm/px
    assert (width, height) == tuple(math.ceil(d / 2) for d in slide.dimensions)
    top = math.ceil(math.log2(max(width, height)))
    assert sorted(int(p.name) for p in (out / f"{sid}_files").iterdir()) == list(range(top + 1))
    assert len(list((out / f"{sid}_files" / str(top)).glob("*.jpeg"))) == math.ceil(width / 254) * math.ceil(height / 254)
    assert Image.open(out / f"{sid}_files" / "0" / "0_0.jpeg").size == (1, 1)
    # an inner tile (1 px overlap on each side) shows the slide region it names, at half resolution
    tile = np.asarray(Image.open(out / f"{sid}_files" / str(top) / "2_3.jpeg").convert("RGB"), np.float64)
    assert tile.shape == (256, 256, 3)
    x0, y0 = (2 * 254 - 1) * 2, (3 * 254 - 1) * 2
    truth = np.asarray(slide.read_image(x0, y0, 0, 512, 512).resize((256, 256), Image.BILINEAR), np.float64)
    assert np.abs(tile - truth).mean() < 6 and tile.std() > 5


def test_page_draws_the_tiles_and_the_hot_patches_where_they_are(viewer, tmp_path):
    root, out, ids = viewer
    sid = ids[0]
    index = out / "index.html"
    state = page_state(index, f"slide={sid}&alpha=1", tmp_path)
    assert state["slide"] == sid and state["ready"] and state["overlay"]
    assert state["wanted"] > 0 and state["loaded"] == state["wanted"] and state["failed"] == 0
    shot = tmp_path / "fit.png"
    chromium(f"{index.as_uri()}#slide={sid}&alpha=1", tmp_path, f"--screenshot={shot}")
    pixels = np.asarray(Image.open(shot).convert("RGB"), np.float64)[: state["height"], : state["width"]]
    # read the overlay's colours back as scores: the nearest colour of the jet colour map
    lut = colormaps["jet"](np.linspace(0, 1, 256))[:, :3] * 255
    dist = ((pixels[:, :, None, :] - lut[None, None]) ** 2).sum(-1)
    nearest, value = dist.min(-1), dist.argmin(-1) / 255
    hot = (nearest < 40 ** 2) & (value >= 0.85)
    assert hot.sum() > 100, "no hot overlay pixel was drawn"
    # each hot screen pixel, taken back to level-0 pixels by the page's own transform, lies on a patch whose
    # heatmap score is high, and the page has as many hot pixels as the high patches cover
    entry = json.loads((out / f"{sid}.json").read_text())
    with h5py.File(root / "run" / "heatmaps" / f"{sid}_scores.h5") as fh:
        coords, ens, size0 = fh["coords"][()], fh["ensemble"][()], fh.attrs["patch_size_level0"]
    w0, h0 = open_slide(root / "cohort" / "slides" / f"{sid}.tif").dimensions
    field, covered = paint(coords, ens, size0, MASK_DOWNSAMPLE, (h0 // MASK_DOWNSAMPLE, w0 // MASK_DOWNSAMPLE))
    ys, xs = np.nonzero(hot)
    to_level0 = entry["scale"] / state["scale"]
    r = np.clip(((ys + 0.5 - state["oy"]) * to_level0 / MASK_DOWNSAMPLE).astype(int), 0, field.shape[0] - 1)
    c = np.clip(((xs + 0.5 - state["ox"]) * to_level0 / MASK_DOWNSAMPLE).astype(int), 0, field.shape[1] - 1)
    assert (np.nan_to_num(field[r, c]) >= 0.8).mean() >= 0.95
    high_area = (covered & (np.nan_to_num(field) >= 0.85)).sum() * (MASK_DOWNSAMPLE / to_level0) ** 2
    assert 0.7 < hot.sum() / high_area < 1.3


def test_a_top_tile_link_zooms_onto_that_tile(viewer, tmp_path):
    _, out, ids = viewer
    sid = ids[0]
    index = out / "index.html"
    fitted = page_state(index, f"slide={sid}", tmp_path)
    zoomed = page_state(index, f"slide={sid}&top=0", tmp_path)
    assert zoomed["ready"] and zoomed["level"] > fitted["level"] and zoomed["scale"] > 4 * fitted["scale"]
    tile = json.loads((out / f"{sid}.json").read_text())["top"][0]
    centre = (zoomed["ox"] + (tile["x"] + tile["size"] / 2) * zoomed["scale"],
              zoomed["oy"] + (tile["y"] + tile["size"] / 2) * zoomed["scale"])
    assert centre == pytest.approx((zoomed["width"] / 2, zoomed["height"] / 2), abs=1)
    # the second slide is on the same page
    assert page_state(index, f"slide={ids[1]}", tmp_path)["slide"] == ids[1]


def test_rerun_skips_finished_slides_and_a_run_without_heatmaps_is_one_line(viewer, demo_run, tmp_path):
    root, out, ids = viewer
    tile = out / f"{ids[0]}_files" / "0" / "0_0.jpeg"
    before = tile.stat().st_mtime_ns
    res = runner.invoke(app, ["view", str(root / "run"), "--slides", str(root / "cohort" / "slides"), "--out", str(out),
                              "--slide-ids", ",".join(ids)])
    assert res.exit_code == 0 and tile.stat().st_mtime_ns == before
    res = runner.invoke(app, ["view", str(root / "run"), "--slides", str(root / "cohort" / "slides"),
                              "--heatmaps", str(tmp_path / "none"), "--out", str(tmp_path / "v")])
    assert res.exit_code == 1 and "no heatmap folder" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "v" / "index.html").exists()


def test_an_external_cohorts_viewer_finds_its_heatmaps_and_keeps_apart(tmp_path):
    """`heatmap` writes another cohort's slides to RUN/external/<slide folder>_heatmaps; `view` on that slide
    folder looked in RUN/heatmaps (nothing there) and would have written over RUN/viewer."""
    from slidemil.explain.viewer import default_folders
    from slidemil.rundir import RunDir

    run = RunDir(tmp_path / "run")
    (run.heatmaps_dir).mkdir(parents=True)
    (run.heatmaps_dir / "A_scores.h5").write_bytes(b"")
    own, ext = tmp_path / "slides", tmp_path / "cohortB"
    for folder, sid in ((own, "A"), (ext, "B")):
        folder.mkdir()
        (folder / f"{sid}.tif").write_bytes(b"")
    assert default_folders(run, own) == (run.heatmaps_dir, run.viewer_dir)
    assert default_folders(run, ext) == (run.heatmaps_dir, run.viewer_dir)     # not painted: as before
    run.external_cohort_dir("cohortB", "heatmaps").mkdir(parents=True)
    assert default_folders(run, ext) == (run.path / "external" / "cohortB_heatmaps",
                                         run.path / "external" / "cohortB_viewer")
    assert default_folders(run, own) == (run.heatmaps_dir, run.viewer_dir)
    # a TCGA download names its files <barcode>.<UUID>.svs while the run's ids are the barcodes: still its own
    (run.heatmaps_dir / "TCGA-AA-0001_scores.h5").write_bytes(b"")
    tcga = tmp_path / "tcga" / "0a1b"
    tcga.mkdir(parents=True)
    (tcga / "TCGA-AA-0001.0a1b2c3d-uuid.svs").write_bytes(b"")
    run.external_cohort_dir("tcga", "heatmaps").mkdir(parents=True)
    assert default_folders(run, tcga.parent) == (run.heatmaps_dir, run.viewer_dir)


def test_a_slide_without_a_pyramid_is_decoded_once_for_all_levels(tmp_path, monkeypatch):
    """Every Deep Zoom level above 2048 px was read from the slide: on a slide without a pyramid each such
    level decoded the whole slide again (3.0x its pixels at 8k x 8k, docs/benchmarks.md). Now the full image
    is read once, in bands, and each coarser level is made of 2 x 2 means of the one above: the reads cover
    the slide exactly once, every level has its tiles, and they show the slide."""
    from slidemil.explain.viewer import SlideViewer, ViewerOptions
    from slidemil.slides.synthetic import render_slide, write_pyramidal_tiff

    img = np.ascontiguousarray(render_slide(np.random.default_rng(6), (2304, 2304))[0][:2111, :2303])   # odd sizes
    slide = open_slide(write_pyramidal_tiff(tmp_path / "flat.tif", img, 0.5, downsamples=(1,)))
    reads, read = [], slide.read_image
    monkeypatch.setattr(slide, "read_image", lambda *a: reads.append(a[3] * a[4]) or read(*a))
    sv = SlideViewer.__new__(SlideViewer)
    sv.o, sv.out = ViewerOptions(quality=100), tmp_path / "v"
    t = sv.o.tile_size
    sv._tiles(slide, "flat", 1.0, 2303, 2111)               # levels 0..12
    assert sum(reads) == 2303 * 2111
    files = tmp_path / "v" / "flat_files"
    for lv, (w, h) in enumerate(dzi_levels(2303, 2111)):
        cols, rows = math.ceil(w / t), math.ceil(h / t)
        assert {p.name for p in (files / str(lv)).glob("*.jpeg")} == {f"{c}_{r}.jpeg" for c in range(cols) for r in range(rows)}
        last = Image.open(files / str(lv) / f"{cols - 1}_{rows - 1}.jpeg")
        assert last.size == (w - (cols - 1) * t + (cols > 1), h - (rows - 1) * t + (rows > 1)), lv
    coarse = np.asarray(Image.open(files / "9" / "0_0.jpeg").convert("RGB"), float)      # of 288 x 264 px
    direct = np.asarray(Image.fromarray(img).resize((288, 264), Image.BOX), float)[:t + 1, :t + 1]
    assert np.abs(coarse - direct).mean() < 2.5   # (1.6)
    inner = np.asarray(Image.open(files / "12" / "2_3.jpeg").convert("RGB"), float)    # 1 px overlap each side
    truth = np.asarray(read(2 * t - 1, 3 * t - 1, 0, t + 2, t + 2).convert("RGB"), float)   # the slide's own pixels
    assert np.abs(inner - truth).mean() < 1.5     # (0.3)
