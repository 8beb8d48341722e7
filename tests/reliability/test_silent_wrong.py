"""Nothing silently wrong (issue 29): a resume, a prediction or a preprocess that would corrupt a result is
refused before anything is written, with one line naming the file, row or field and the fix."""

from __future__ import annotations

import json
import shutil

import h5py
import numpy as np
import pandas as pd
import pytest

from conftest import runner, write_text_file
from slidemil.cli import app
from slidemil.data.cohort import read_label_table
from slidemil.data.synthetic import make_feature_cohort
from slidemil.errors import InputError
from slidemil.features.store import check_feature_file, write_features
from slidemil.slides.reader import list_slides

FAST = ["--folds", "2", "--epochs", "2", "--min-epochs", "0", "--bootstrap", "20", "--quiet"]


def _cohort_and_run(root):
    """A 12-patient cohort (16-d features) and a finished 2-fold run on it, in `root`."""
    make_feature_cohort(root, n_patients=12, dim=16, bag_size=(10, 20), seed=1)
    res = runner.invoke(app, ["train", "--features", str(root / "features"), "--labels", str(root / "labels.csv"),
                              "--out", str(root / "run"), *FAST])
    assert res.exit_code == 0, res.output
    return root


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return _cohort_and_run(tmp_path_factory.mktemp("small"))


def _resumable(tmp_path):
    """A run with its last fold unfinished, as after a crash (its own cohort: config.yaml names the paths)."""
    root = _cohort_and_run(tmp_path / "c")
    (root / "run" / "fold_1" / "done.json").unlink()
    return root


def _resume(root):
    return runner.invoke(app, ["train", "--features", str(root / "features"), "--labels", str(root / "labels.csv"),
                               "--out", str(root / "run"), *FAST, "--resume"])


@pytest.mark.slow
def test_resume_refuses_a_changed_label_table_or_changed_features(tmp_path):
    root = _resumable(tmp_path)
    labels = pd.read_csv(root / "labels.csv")
    flipped = labels.assign(label=labels["label"].map({"negative": "positive", "positive": "negative"}))
    flipped.to_csv(root / "labels.csv", index=False)
    res = _resume(root)
    assert res.exit_code == 1 and "label table" in res.output and "changed since the run started" in res.output
    labels.to_csv(root / "labels.csv", index=False)
    first = sorted((root / "features").glob("*.h5"))[0]
    shutil.copy(first, tmp_path / "orig.h5")
    # new content from the same encoder (another encoder's file is refused before the resume check, as bad)
    write_features(first, np.random.default_rng(5).normal(size=(15, 16)).astype(np.float32), None,
                   {"encoder": "synthetic"})
    res = _resume(root)
    assert res.exit_code == 1 and "feature files changed" in res.output and "Traceback" not in res.output
    assert not (root / "run" / "fold_1" / "done.json").exists()
    shutil.copy(tmp_path / "orig.h5", first)                        # the data as it was: the resume finishes
    res = _resume(root)
    assert res.exit_code == 0, res.output
    assert (root / "run" / "fold_1" / "done.json").exists()


def test_config_yaml_names_its_inputs_by_absolute_path(small):
    import yaml

    cfg = yaml.safe_load((small / "run" / "config.yaml").read_text())
    assert all(cfg[k].startswith("/") for k in ("features", "labels", "out"))


@pytest.mark.parametrize("where", ["run/predictions.csv", "run/new.csv", "labels.csv"])
def test_predict_refuses_to_overwrite_a_run_or_an_input(small, tmp_path, where):
    root = tmp_path / "c"
    shutil.copytree(small, root)
    before = {p: p.read_bytes() for p in (root / "run").glob("*.*")} | {root / "labels.csv": (root / "labels.csv").read_bytes()}
    res = runner.invoke(app, ["predict", str(root / "run"), "--features", str(root / "features"),
                              "--out", str(root / where), "--labels", str(root / "labels.csv")])
    assert res.exit_code == 1 and "--force" in res.output and "Traceback" not in res.output
    assert all(p.read_bytes() == b for p, b in before.items())        # nothing was written
    res = runner.invoke(app, ["predict", str(root / "run"), "--features", str(root / "features"),
                              "--out", str(root / "run" / "ext.csv"), "--force"])
    assert res.exit_code == 0 and (root / "run" / "ext.csv").exists()


def test_predict_passes_over_hidden_files_and_names_unusable_ids(small, tmp_path):
    feats = tmp_path / "f"
    shutil.copytree(small / "features", feats)
    one = sorted(feats.glob("*.h5"))[0]
    (feats / f"._{one.name}").write_bytes(b"\0\5\26\7 AppleDouble")   # what macOS leaves beside copied files
    out = tmp_path / "p.csv"
    res = runner.invoke(app, ["predict", str(small / "run"), "--features", str(feats), "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert len(pd.read_csv(out)) == len(list(small.glob("features/*.h5")))
    shutil.copy(one, feats / "scan (copy)#2.h5")
    res = runner.invoke(app, ["predict", str(small / "run"), "--features", str(feats), "--out", str(out)])
    assert res.exit_code == 1 and "scan (copy)#2: not usable as a slide id" in res.output and "Traceback" not in res.output
    res = runner.invoke(app, ["predict", str(small / "run"), "--features", str(feats), "--out", str(out),
                              "--slide-ids", "../x"])
    assert res.exit_code == 1 and "../x: not usable as a slide id" in res.output


def test_slide_ids_must_be_unique_across_extensions(tmp_path):
    for name in ("A.svs", "A.tif", "B.ome.tif", "B.ndpi", "C.svs"):
        (tmp_path / name).write_bytes(b"")
    with pytest.raises(InputError) as err:
        list_slides(tmp_path)
    assert "A.svs and A.tif -> 'A'" in str(err.value) and "B.ndpi and B.ome.tif -> 'B'" in str(err.value)


def _h5(path, **datasets):
    with h5py.File(path, "w") as fh:
        for k, v in datasets.items():
            fh[k] = v
    return path


def test_hdf5_data_from_outside_the_file_is_refused(tmp_path):
    secret = tmp_path / "secret.bin"
    secret.write_bytes(np.ones((20, 4), np.float32).tobytes())
    with h5py.File(tmp_path / "external.h5", "w") as fh:
        fh.create_dataset("features", shape=(20, 4), dtype="f4", external=[(str(secret), 0, 20 * 4 * 4)])
    src = _h5(tmp_path / "src.h5", features=np.ones((20, 4), np.float32))
    with h5py.File(tmp_path / "virtual.h5", "w") as fh:
        layout = h5py.VirtualLayout(shape=(20, 4), dtype="f4")
        layout[:] = h5py.VirtualSource(str(src), "features", shape=(20, 4))
        fh.create_virtual_dataset("features", layout)
    with h5py.File(tmp_path / "link.h5", "w") as fh:
        fh["features"] = h5py.ExternalLink(str(src), "features")
    assert "external file" in check_feature_file(tmp_path / "external.h5")[1]
    assert "virtual dataset" in check_feature_file(tmp_path / "virtual.h5")[1]
    assert "is a link to" in check_feature_file(tmp_path / "link.h5")[1]
    assert check_feature_file(src) == (4, None)


def test_coords_must_be_finite_numbers_and_features_fit_float32(tmp_path):
    feats = np.ones((20, 4), np.float32)
    nan = np.zeros((20, 2))
    nan[3, 1] = np.nan
    text = np.array([[b"a", b"b"]] * 20)
    huge = np.ones((20, 4))
    huge[7, 0] = 1e300
    assert "coords contain NaN" in check_feature_file(_h5(tmp_path / "a.h5", features=feats, coords=nan))[1]
    assert "not numbers" in check_feature_file(_h5(tmp_path / "b.h5", features=feats, coords=text))[1]
    assert "exceed float32's range" in check_feature_file(_h5(tmp_path / "c.h5", features=huge))[1]


def test_na_none_and_null_are_text_not_missing(tmp_path):
    """pandas reads "NA", "None", "null" as missing by default: a patient NA lost its id (its slides then
    fell into different folds) and a class "None" vanished. Only an empty cell is missing."""
    table = write_text_file(tmp_path, "slide_id,case_id,label\ns1,NA,None\ns2,NA,None\ns3,p3,null\ns4,p4,null\n"
                                      "s5,p5,None\ns6,p6,null\n")
    cohort = read_label_table(table)
    assert list(cohort.table["case_id"][:2]) == ["NA", "NA"] and cohort.n_patients == 5
    assert cohort.classes == ["None", "null"]


def test_a_column_named_twice_is_refused(tmp_path):
    table = write_text_file(tmp_path, "slide_id,label,case_id,label\ns1,a,p1,b\n")
    with pytest.raises(InputError, match=r"names a column more than once \('label' in columns 2, 4\)"):
        read_label_table(table)


def test_ids_too_long_for_the_file_system_are_refused_up_front(tmp_path):
    long = "s" * 230   # fits 255 bytes alone, not as `.<id>_qc.png.tmp-<pid>`
    table = write_text_file(tmp_path, f"slide_id,label\n{long},a\ns2,b\n")
    with pytest.raises(InputError, match="at most 200 characters"):
        read_label_table(table)


def test_a_segmentation_without_its_qc_picture_is_redone(tmp_path):
    """A stop between the two files (a full disk) once left a GeoJSON without its QC PNG that resume took as
    complete; the PNG is now written first and both are required."""
    from slidemil.preprocess import Pipeline, PreprocessConfig

    pipe = Pipeline(PreprocessConfig(slides=str(tmp_path), out=str(tmp_path / "out"), quiet=True))
    seg = tmp_path / "out" / "segmentation"
    seg.mkdir(parents=True)
    (seg / "s1.geojson").write_text("{}")
    assert not pipe.is_done("s1", "segment")
    (seg / "s1_qc.png").write_bytes(b"png")
    assert pipe.is_done("s1", "segment")


def test_labelled_slides_a_run_leaves_out_are_recorded_and_reported(small, tmp_path):
    """A label row without a label and a slide a given splits.csv puts in no fold were dropped with at most a
    log line: the run's excluded.csv and its report (metrics.json warnings) had no trace of either."""
    labels = pd.read_csv(small / "labels.csv", dtype=str)
    labels.loc[0, "label"] = ""
    write_text_file(tmp_path, labels.to_csv(index=False))
    splits = pd.read_csv(small / "run" / "splits.csv", dtype=str)
    left = labels["slide_id"][1]
    splits[splits["slide_id"] != left].to_csv(tmp_path / "splits.csv", index=False)
    out = tmp_path / "run"
    res = runner.invoke(app, ["train", "--features", str(small / "features"), "--labels", str(tmp_path / "labels.csv"),
                              "--splits", str(tmp_path / "splits.csv"), "--out", str(out), *FAST])
    assert res.exit_code == 0, res.output
    excluded = pd.read_csv(out / "excluded.csv", dtype=str).set_index("slide_id")["reason"]
    assert set(excluded.index) == {labels["slide_id"][0], left}
    assert "row 2" in excluded[labels["slide_id"][0]] and "label" in excluded[labels["slide_id"][0]]
    assert "in no fold of the splits" in excluded[left]
    (out / "fold_1" / "done.json").unlink()                 # a resume reads the run's own splits: still recorded
    res = runner.invoke(app, ["train", "--features", str(small / "features"), "--labels", str(tmp_path / "labels.csv"),
                              "--splits", str(tmp_path / "splits.csv"), "--out", str(out), *FAST, "--resume"])
    assert res.exit_code == 0, res.output
    assert set(pd.read_csv(out / "excluded.csv", dtype=str)["slide_id"]) == {labels["slide_id"][0], left}
    warnings = json.loads((out / "metrics.json").read_text())["warnings"]
    assert any("2 slide(s) of the label table were left out" in w and "excluded.csv" in w for w in warnings)
    predicted = set(pd.read_csv(out / "predictions.csv", dtype=str)["slide_id"])
    assert not predicted & set(excluded.index)


def test_given_splits_without_validation_rows_say_no_epoch_was_selected(small, tmp_path):
    """Splits with train and test rows only (common for published splits) trained every fold to its last
    epoch under the default --select best, and the report said nothing about it."""
    splits = pd.read_csv(small / "run" / "splits.csv", dtype=str)
    splits.loc[splits["role"] == "val", "role"] = "train"
    splits.to_csv(tmp_path / "splits.csv", index=False)
    out = tmp_path / "run"
    res = runner.invoke(app, ["train", "--features", str(small / "features"), "--labels", str(small / "labels.csv"),
                              "--splits", str(tmp_path / "splits.csv"), "--out", str(out), *FAST])
    assert res.exit_code == 0, res.output
    warnings = json.loads((out / "metrics.json").read_text())["warnings"]
    assert sum("no validation split" in w and "last epoch was kept" in w for w in warnings) == 2      # both folds
