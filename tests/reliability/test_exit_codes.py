"""Exit codes a script can trust: a batch-wide error stops at once with 1; a batch where every item
failed exits 1; one where some failed exits 1 after finishing the rest, 0 only with --allow-failures."""

from __future__ import annotations

import pandas as pd
import pytest

from conftest import runner
from slidemil.cli import app
from slidemil.slides.synthetic import make_slide_cohort


@pytest.fixture()
def slides(tmp_path):
    make_slide_cohort(tmp_path / "c", n_patients=2, slides_per_patient=(1, 1), size=(1024, 1024), seed=1)
    folder = tmp_path / "c" / "slides"
    (folder / "broken.svs").write_bytes(b"not a slide")
    return folder


def _segment(slides, out, *extra):
    return runner.invoke(app, ["segment", "--slides", str(slides), "--out", str(out), "--quiet", *extra])


def test_some_slides_failed_exits_1_after_finishing_the_rest(slides, tmp_path):
    res = _segment(slides, tmp_path / "o")
    assert res.exit_code == 1 and "1 of 3 failed (--allow-failures exits 0)" in res.output
    assert (tmp_path / "o" / "segmentation" / "P001_S0.geojson").exists()
    assert list(pd.read_csv(tmp_path / "o" / "failures.csv")["slide_id"]) == ["broken"]
    res = _segment(slides, tmp_path / "o", "--allow-failures")
    assert res.exit_code == 0 and "1 failed" in res.output


def test_every_slide_failed_exits_1_even_when_failures_are_allowed(slides, tmp_path):
    only_bad = tmp_path / "bad"
    only_bad.mkdir()
    (only_bad / "broken.svs").write_bytes(b"not a slide")
    res = _segment(only_bad, tmp_path / "o", "--allow-failures")
    assert res.exit_code == 1 and "every item failed" in res.output


def test_unusable_encoder_weights_stop_the_batch_at_once(slides, tmp_path):
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"garbage")
    res = runner.invoke(app, ["extract", "--slides", str(slides), "--out", str(tmp_path / "o"), "--quiet",
                              "--encoder", "resnet50_trunc", "--weights", str(weights)])
    assert res.exit_code == 1 and "w.pth: cannot be loaded as weights" in res.output
    assert "Traceback" not in res.output and not (tmp_path / "o").exists()


@pytest.mark.slow
def test_heatmap_with_only_failed_slides_exits_1(demo_run, tmp_path):
    root, _ = demo_run
    res = runner.invoke(app, ["heatmap", str(root / "run"), "--slides", str(root / "cohort" / "slides"),
                              "--slide-ids", "nope1,nope2", "--out", str(tmp_path / "h"), "--allow-failures"])
    assert res.exit_code == 1 and "every item failed" in res.output
    assert (tmp_path / "h" / "heatmaps.csv").exists()


@pytest.mark.parametrize("device,says", [
    ("gpu", "'gpu' is not a device: use auto, cpu, cuda or cuda:N"),
    ("mps", "Apple GPUs are not supported yet"),
    ("cuda:7", "cuda:7"),
])
def test_a_device_torch_cannot_use_is_one_line_before_anything_is_written(feature_cohort, slides, tmp_path, device,
                                                                           says):
    """`--device gpu` (a misspelling) and `--device mps` were tracebacks from inside torch, after train had
    written config.yaml and splits.csv; extract failed every slide one by one."""
    root, _ = feature_cohort
    res = runner.invoke(app, ["train", "--features", str(root / "features"), "--labels", str(root / "labels.csv"),
                              "--out", str(tmp_path / "run"), "--device", device, "--quiet"])
    assert res.exit_code == 1 and says in res.output and "Traceback" not in res.output, res.output
    assert not (tmp_path / "run").exists()
    res = runner.invoke(app, ["preprocess", "--slides", str(slides), "--out", str(tmp_path / "o"), "--quiet",
                              "--device", device])
    assert res.exit_code == 1 and says in res.output and "Traceback" not in res.output, res.output
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("flags,says", [
    (["--overlap", "300"], "overlap 300 must be smaller than patch_size 256"),
    (["--tissue-geojson", "nowhere"], "--tissue-geojson nowhere: no such folder"),
    (["--coords-dir", "nowhere"], "--coords-dir nowhere: no such folder"),
])
def test_a_batch_wide_setting_is_refused_once_not_slide_by_slide(slides, tmp_path, flags, says):
    """An overlap as large as the patch, or a --tissue-geojson / --coords-dir folder that does not exist,
    failed every slide one by one (the same error in failures.csv for each) after writing the outputs."""
    res = runner.invoke(app, ["preprocess", "--slides", str(slides), "--out", str(tmp_path / "o"), "--quiet", *flags])
    assert res.exit_code == 1 and says in res.output and "Traceback" not in res.output, res.output
    assert not (tmp_path / "o").exists()
