"""Patient-grouped splits: no patient in two roles, reproducible, predefined splits checked, sites kept whole."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from conftest import label_csv, write_text_file
from slidemil.data.cohort import read_label_table
from slidemil.data.splits import check_splits, make_splits, read_splits
from slidemil.errors import InputError


def test_kfold_never_shares_a_patient_across_roles(tmp_path):
    cohort = read_label_table(label_csv(tmp_path, n_patients=30, slides=3))
    splits = make_splits(cohort, folds=5, val_fraction=0.2, seed=7)
    for _, part in splits.groupby("fold"):
        assert (part.groupby("case_id")["role"].nunique() == 1).all()
        assert set(part["role"]) == {"train", "val", "test"}
    tests = splits[splits["role"] == "test"]
    assert tests["slide_id"].is_unique and set(tests["slide_id"]) == set(cohort.table["slide_id"])
    label = dict(zip(cohort.table["slide_id"], cohort.table["label"]))
    for _, part in tests.groupby("fold"):  # stratified: each test fold holds both classes
        assert {label[s] for s in part["slide_id"]} == {"neg", "pos"}


def test_same_seed_same_splits(tmp_path):
    cohort = read_label_table(label_csv(tmp_path, n_patients=20))
    a, b = make_splits(cohort, 4, seed=1), make_splits(cohort, 4, seed=1)
    pd.testing.assert_frame_equal(a, b)
    assert not make_splits(cohort, 4, seed=2).equals(a)


def test_check_splits_catches_a_leak(tmp_path):
    leaky = pd.DataFrame({"slide_id": ["a", "b", "c"], "case_id": ["p", "p", "q"], "fold": 0,
                          "role": ["train", "test", "test"]})
    with pytest.raises(InputError, match=r"fold 0: patient\(s\) p appear in more than one"):
        check_splits(leaky)


def test_predefined_split_column_and_splits_file(tmp_path):
    path = write_text_file(tmp_path, "slide_id,label,split\na,0,train\nb,1,train\nc,0,val\nd,1,test\ne,0,test\nf,1,train\n")
    cohort = read_label_table(path)
    splits = make_splits(cohort)
    assert list(splits["role"]) == ["train", "train", "val", "test", "test", "train"]
    splits.to_csv(tmp_path / "splits.csv", index=False)
    again = read_splits(tmp_path / "splits.csv", cohort)
    assert list(again["role"]) == list(splits["role"])


def test_site_preserving_splits_keep_sites_whole(tmp_path):
    rows = ["slide_id,case_id,label,site"]
    for p in range(24):
        rows.append(f"s{p},p{p},{'pos' if p % 2 else 'neg'},site{p % 6}")
    cohort = read_label_table(write_text_file(tmp_path, "\n".join(rows) + "\n"), site_col="site")
    splits = make_splits(cohort, folds=3, preserve_site=True)
    site = dict(zip(cohort.table["slide_id"], cohort.table["site"]))
    tests = splits[splits["role"] == "test"].assign(site=lambda d: d["slide_id"].map(site))
    assert (tests.groupby("site")["fold"].nunique() == 1).all()


def _sited(tmp_path, n=24, sites=3):
    rows = ["slide_id,case_id,label,site"]
    for p in range(n):
        rows.append(f"s{p},p{p},{'pos' if p % 2 else 'neg'},site{(p // 2) % sites}")
    return read_label_table(write_text_file(tmp_path, "\n".join(rows) + "\n"), site_col="site")


def test_leave_site_out_tests_each_site_once_and_never_trains_on_it(tmp_path):
    cohort = _sited(tmp_path)
    splits = make_splits(cohort, folds=5, val_fraction=0.25, cv="leave-site-out")
    site = dict(zip(cohort.table["slide_id"], cohort.table["site"]))
    splits["site"] = splits["slide_id"].map(site)
    assert sorted(splits["fold"].unique()) == [0, 1, 2]            # one fold per site; --folds ignored
    for fold, part in splits.groupby("fold"):
        test_sites = set(part.loc[part["role"] == "test", "site"])
        assert test_sites == {f"site{fold}"}                        # sites sorted by name
        assert not test_sites & set(part.loc[part["role"] != "test", "site"])   # train and val from other sites
        assert (part["role"] == "val").any()


def test_leave_site_out_needs_sites(tmp_path):
    with pytest.raises(InputError, match="--site-col"):
        make_splits(read_label_table(label_csv(tmp_path, n_patients=10)), cv="leave-site-out")
    with pytest.raises(InputError, match="at least two sites"):
        make_splits(_sited(tmp_path, sites=1), cv="leave-site-out")


def test_a_validation_split_larger_than_asked_is_said(caplog):
    """With 2 patients of a class in a training fold the inner split must take half of them to keep the class
    in validation: the user asked for 20%, so the log says what it holds instead (it was silent)."""
    from slidemil.data.splits import _inner_val

    y = np.r_[np.zeros(20, int), np.ones(2, int)]
    groups = np.array([f"p{i}" for i in range(22)])
    with caplog.at_level("WARNING", logger="slidemil.data.splits"):
        mask = _inner_val(y, groups, 0.2, seed=0)
    assert set(y[mask]) == {0, 1} and mask.sum() == 11
    assert "holds 50% of the patients (--val-fraction 0.2)" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="slidemil.data.splits"):
        mask = _inner_val(np.r_[np.zeros(20, int), np.ones(10, int)], np.arange(30).astype(str), 0.2, seed=0)
    assert mask.sum() == 6 and "validation split holds" not in caplog.text
