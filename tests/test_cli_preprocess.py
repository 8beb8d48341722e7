"""The slide verbs of the CLI: preprocess then train, segment alone, errors, the encoder list."""

from __future__ import annotations

import json

import pytest

from conftest import runner
from slidemil.cli import app
from slidemil.slides.synthetic import make_slide_cohort

pytestmark = pytest.mark.slow  # trains models or runs the slide pipeline


def test_cli_preprocess_then_train(tmp_path):
    make_slide_cohort(tmp_path / "c", n_patients=4, slides_per_patient=(1, 1), size=(1024, 1536), seed=9)
    res = runner.invoke(app, ["preprocess", "--slides", str(tmp_path / "c" / "slides"), "--out", str(tmp_path / "o"),
                              "--patch-size", "128", "--quiet"])
    assert res.exit_code == 0, res.output
    assert "4 slide(s): 4 done" in res.stdout
    res = runner.invoke(app, ["preprocess", "--slides", str(tmp_path / "c" / "slides"), "--out", str(tmp_path / "o"),
                              "--patch-size", "128", "--quiet"])
    assert "4 already complete" in res.stdout
    assert len(list((tmp_path / "o" / "features_handcrafted").glob("*.h5"))) == 4
    geo = json.loads((tmp_path / "o" / "segmentation" / "P000_S0.geojson").read_text())
    assert geo["type"] == "FeatureCollection"


def test_cli_segment_alone_and_errors(tmp_path):
    make_slide_cohort(tmp_path / "c", n_patients=2, slides_per_patient=(1, 1), size=(1024, 1024), seed=1)
    res = runner.invoke(app, ["segment", "--slides", str(tmp_path / "c" / "slides"), "--out", str(tmp_path / "o"), "--quiet"])
    assert res.exit_code == 0 and not (tmp_path / "o" / "patches").exists()
    assert (tmp_path / "o" / "segmentation" / "P000_S0_qc.png").exists()
    res = runner.invoke(app, ["extract", "--slides", str(tmp_path / "c" / "slides"), "--out", str(tmp_path / "o"),
                              "--encoder", "uni_v1", "--quiet"])
    # missing encoder weights concern the whole batch: one line, stop at once, exit 1, no per-slide noise
    assert res.exit_code == 1 and "--weights" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "o" / "features_uni_v1").exists()
    res = runner.invoke(app, ["preprocess", "--slides", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    assert res.exit_code == 1 and "does not exist" in res.output


def test_cli_segments_a_gdc_download_with_one_folder_per_slide(tmp_path):
    make_slide_cohort(tmp_path / "c", n_patients=2, slides_per_patient=(1, 1), size=(1024, 1024), seed=1)
    gdc = tmp_path / "gdc"
    for i, slide in enumerate(sorted((tmp_path / "c" / "slides").glob("*.tif"))):
        (gdc / f"uuid{i}" / "logs").mkdir(parents=True)
        slide.rename(gdc / f"uuid{i}" / f"TCGA-AA-000{i}-01Z-00-DX1.uuid{i}.tif")
    res = runner.invoke(app, ["segment", "--slides", str(gdc), "--out", str(tmp_path / "o"), "--quiet"])
    assert res.exit_code == 0 and "2 slide(s): 2 done" in res.stdout, res.output
    assert (tmp_path / "o" / "segmentation" / "TCGA-AA-0001-01Z-00-DX1.uuid1.geojson").exists()
    res = runner.invoke(app, ["segment", "--slides", str(tmp_path / "c"), "--out", str(tmp_path / "o2"), "--quiet"])
    assert res.exit_code == 1 and "holds no slide files" in res.output and "subfolders" in res.output


def test_cli_preprocesses_dicom_slides_one_folder_each(tmp_path):
    """A folder per DICOM slide (level files inside): features named after the folders, read through OpenSlide."""
    import numpy as np

    from dicom_slides import write_dicom_slide
    from slidemil.features.store import read_features
    from slidemil.slides.synthetic import render_slide

    for i, sid in enumerate(("CASE1-HE", "CASE2-HE")):
        img, _, _ = render_slide(np.random.default_rng(i), (1024, 1024))
        write_dicom_slide(tmp_path / "dicom" / sid, img, mpp=0.5)
    res = runner.invoke(app, ["preprocess", "--slides", str(tmp_path / "dicom"), "--out", str(tmp_path / "o"),
                              "--patch-size", "128", "--quiet"])
    assert res.exit_code == 0 and "2 slide(s): 2 done" in res.stdout, res.output
    bag = read_features(tmp_path / "o" / "features_handcrafted" / "CASE1-HE.h5")
    assert len(bag.features) > 10 and bag.attrs["level0_mpp"] == 0.5


def test_cli_encoders_lists_registry():
    res = runner.invoke(app, ["encoders"])
    assert res.exit_code == 0
    for name in ("handcrafted", "resnet50_trunc", "uni_v1", "uni_v2", "virchow2", "hoptimus0", "hoptimus1",
                 "gigapath", "phikon_v2", "timm:"):
        assert name in res.stdout
    # encoders released on GitHub showed "hf:None" as their weight source: now the release they come from
    assert "hf:None" not in res.stdout and "birkhoffkiki" in res.stdout


def test_every_command_that_logs_takes_quiet():
    """`--quiet` worked for train and preprocess but was "No such option" for heatmap, view, predict and
    the rest: a pipeline script could not quiet its steps alike."""
    import typer

    def walk(group, prefix=()):
        for name, cmd in group.commands.items():
            if hasattr(cmd, "commands"):
                yield from walk(cmd, prefix + (name,))
            else:
                yield prefix + (name,), cmd

    root = typer.main.get_command(app)
    for path, cmd in walk(root):
        if path[-1] in ("models", "encoders", "doctor", "report") or path[0] == "weights":
            continue                     # print a table or one result, log nothing
        assert "--quiet" in {o for p in cmd.params for o in p.opts}, " ".join(path)
