"""Bad feature content is found in one pass over all files before anything is written, every bad file
named with its problem; `--skip-bad` leaves them out and records them in the run folder."""

from __future__ import annotations

import h5py
import numpy as np
import pandas as pd
import pytest

from conftest import runner
from slidemil.cli import app
from slidemil.data.synthetic import make_feature_cohort
from slidemil.features.store import check_feature_file, write_features


def _spoil(features, sid, kind):
    path = features / f"{sid}.h5"
    x = np.random.default_rng(0).normal(size=(20, 16)).astype(np.float32)
    coords = np.zeros((20, 2), np.int64)
    if kind == "nan":
        x[7, 3] = np.nan
    elif kind == "inf":
        x[0, 0] = np.inf
    elif kind in ("empty", "one_d"):
        path.unlink()
        with h5py.File(path, "w") as fh:
            fh.create_dataset("features", data=x[:0] if kind == "empty" else x[0])
        return
    elif kind == "coords":
        coords = coords[:5]
    elif kind == "dim":
        x = np.random.default_rng(0).normal(size=(20, 24)).astype(np.float32)
    path.unlink()
    write_features(path, x, coords, {"encoder": "synthetic"})


KINDS = {"nan": "NaN or infinite values (first at row 7)", "inf": "NaN or infinite values (first at row 0)",
         "empty": "non-empty [N, D]", "one_d": "non-empty [N, D]", "coords": "5 coords but 20 feature rows",
         "dim": "features are 24-d but the other files are 16-d"}


@pytest.fixture()
def cohort(tmp_path):
    table = make_feature_cohort(tmp_path / "c", n_patients=16, dim=16, bag_size=(10, 20), seed=1)
    return tmp_path / "c", list(table["slide_id"])


def test_every_bad_file_is_listed_before_any_folder_is_written(cohort, tmp_path):
    root, ids = cohort
    for sid, kind in zip(ids, KINDS):
        _spoil(root / "features", sid, kind)
    out = tmp_path / "run"
    res = runner.invoke(app, ["train", "--features", str(root / "features"), "--labels", str(root / "labels.csv"),
                              "--out", str(out), "--quiet", "--folds", "2", "--epochs", "1"])
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert f"{len(KINDS)} feature file(s) cannot be trained on" in res.output and "--skip-bad" in res.output
    for sid, kind in zip(ids, KINDS):
        assert f"{sid}.h5: " in res.output and KINDS[kind] in res.output, kind
    assert not out.exists()


@pytest.mark.slow
def test_skip_bad_trains_on_the_rest_and_records_what_it_left_out(cohort, tmp_path):
    root, ids = cohort
    _spoil(root / "features", ids[0], "nan")
    out = tmp_path / "run"
    res = runner.invoke(app, ["train", "--features", str(root / "features"), "--labels", str(root / "labels.csv"),
                              "--out", str(out), "--quiet", "--folds", "2", "--epochs", "1", "--bootstrap", "20",
                              "--skip-bad"])
    assert res.exit_code == 0, res.output
    excluded = pd.read_csv(out / "excluded.csv")
    assert list(excluded["slide_id"]) == [ids[0]] and "NaN" in excluded["reason"][0]
    assert ids[0] not in set(pd.read_csv(out / "predictions.csv")["slide_id"])


def test_the_check_reads_in_chunks(tmp_path):
    x = np.ones((1000, 8), np.float32)
    x[999, 0] = np.nan
    path = write_features(tmp_path / "a.h5", x, None)
    assert check_feature_file(path, chunk_rows=64) == (8, "features contain NaN or infinite values (first at row 999)")
    assert check_feature_file(write_features(tmp_path / "b.h5", x[:999], None), chunk_rows=64) == (8, None)
    with h5py.File(tmp_path / "c.h5", "w") as fh:              # some tools store [1, N, D]
        fh.create_dataset("features", data=x[None])
    nan_at_999 = (8, "features contain NaN or infinite values (first at row 999)")
    assert check_feature_file(tmp_path / "c.h5", chunk_rows=64) == nan_at_999
