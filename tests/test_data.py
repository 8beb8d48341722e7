"""Label table, feature store and splits: formats read, bad input named, no patient leaks."""

from __future__ import annotations

import logging

import h5py
import numpy as np
import pandas as pd
import pytest
import torch

from slidemil.data.cohort import attach_features, read_label_table
from slidemil.data.splits import check_splits, make_splits, read_splits
from slidemil.errors import InputError, MissingFeaturesError
from slidemil.features.store import find_feature_file, read_features, write_features


def _csv(tmp_path, text, name="labels.csv"):
    path = tmp_path / name
    path.write_text(text)
    return path


def _cohort_csv(tmp_path, n_patients=12, slides=2, classes=("neg", "pos")):
    rows = ["slide_id,case_id,label"]
    for p in range(n_patients):
        for s in range(slides):
            rows.append(f"p{p}_s{s},p{p},{classes[p % len(classes)]}")
    return _csv(tmp_path, "\n".join(rows) + "\n")


# --- label table -------------------------------------------------------------------------------

def test_missing_column_is_named(tmp_path):
    path = _csv(tmp_path, "slide_id,case_id,diagnosis\na,a,x\n")
    with pytest.raises(InputError, match=r"column 'label' is missing \(found: slide_id, case_id, diagnosis\)"):
        read_label_table(path)
    assert read_label_table(_csv(tmp_path, "slide_id,diagnosis\na,x\nb,y\nc,x\nd,y\n"), label_col="diagnosis").classes == ["x", "y"]


def test_duplicated_slide_ids_name_rows(tmp_path):
    path = _csv(tmp_path, "slide_id,label\na,0\nb,1\na,1\nc,0\n")
    with pytest.raises(InputError, match=r"repeats slide id\(s\) a in rows 2, 4"):
        read_label_table(path)


def test_nan_labels_warn_and_drop(tmp_path, caplog):
    path = _csv(tmp_path, "slide_id,label\na,0\nb,\nc,1\nd,0\ne,1\n")
    with caplog.at_level(logging.WARNING):
        cohort = read_label_table(path)
    assert list(cohort.table["slide_id"]) == ["a", "c", "d", "e"]
    assert "row(s) 3" in caplog.text


def test_single_patient_class_is_an_error(tmp_path):
    path = _csv(tmp_path, "slide_id,case_id,label\na,p1,neg\nb,p2,neg\nc,p3,pos\nd,p3,pos\n")
    with pytest.raises(InputError, match=r"class 'pos' of column 'label' has 1 patient\(s\) \(row\(s\) 4, 5\)"):
        read_label_table(path)


def test_label_outside_classes_is_named(tmp_path):
    path = _csv(tmp_path, "slide_id,label\na,neg\nb,pos\nc,maybe\n")
    with pytest.raises(InputError, match=r"label\(s\) maybe in row\(s\) 4"):
        read_label_table(path, classes=["neg", "pos"])


def test_classes_fix_output_order_and_case_defaults_to_slide(tmp_path):
    path = _csv(tmp_path, "slide_id,label\na,pos\nb,neg\nc,pos\nd,neg\n")
    cohort = read_label_table(path, classes=["pos", "neg"])
    assert cohort.classes == ["pos", "neg"]
    assert list(cohort.table["y"]) == [0, 1, 0, 1]
    assert list(cohort.table["case_id"]) == list(cohort.table["slide_id"])


def test_missing_and_unreadable_features_are_listed_together(tmp_path):
    labels = _cohort_csv(tmp_path, n_patients=4, slides=1)
    feats = tmp_path / "feats"
    write_features(feats / "p0_s0.h5", np.ones((3, 4)), np.zeros((3, 2)))
    write_features(feats / "p1_s0.h5", np.ones((3, 4)), np.zeros((3, 2)))
    (feats / "p2_s0.h5").write_bytes(b"not an hdf5 file")
    cohort = read_label_table(labels)
    with pytest.raises(MissingFeaturesError) as err:
        attach_features(cohort, feats)
    assert set(err.value.problems) == {"p2_s0", "p3_s0"}
    assert "unreadable" in err.value.problems["p2_s0"] and "--skip-missing" in str(err.value)
    kept = attach_features(cohort, feats, skip_missing=True)
    assert list(kept.table["slide_id"]) == ["p0_s0", "p1_s0"]


# --- feature store -----------------------------------------------------------------------------

def test_write_read_roundtrip_is_atomic(tmp_path):
    x = np.random.default_rng(0).normal(size=(50, 8)).astype(np.float32)
    coords = np.arange(100).reshape(50, 2)
    path = write_features(tmp_path / "s.h5", x, coords, {"encoder": "enc", "patch_size": 256})
    assert [p.name for p in tmp_path.iterdir()] == ["s.h5"]
    bag = read_features(path)
    np.testing.assert_array_equal(bag.features, x)
    np.testing.assert_array_equal(bag.coords, coords)
    assert bag.attrs["encoder"] == "enc" and bag.attrs["embedding_dim"] == 8
    with h5py.File(path) as fh:
        assert fh["coords"].dtype == np.int64 and fh["coords"].attrs["patch_size"] == 256


def test_reads_trident_and_clam_layouts(tmp_path):
    x = np.random.default_rng(0).normal(size=(7, 5)).astype(np.float32)
    # TRIDENT: features + coords with attributes on coords only, one-row chunks
    trident = tmp_path / "trident" / "features_uni_v1"
    trident.mkdir(parents=True)
    with h5py.File(trident / "s1.h5", "w") as fh:
        fh.create_dataset("features", data=x, chunks=(1, 5))
        c = fh.create_dataset("coords", data=np.zeros((7, 2), np.int64))
        c.attrs["patch_size_level0"] = 512
        fh.attrs["encoder"] = "uni_v1"
    bag = read_features(find_feature_file(trident, "s1"))
    assert bag.attrs["patch_size_level0"] == 512 and bag.attrs["encoder"] == "uni_v1"
    # CLAM: feat_dir/h5_files (int32 coords, no attributes) and feat_dir/pt_files
    clam = tmp_path / "clam"
    (clam / "pt_files").mkdir(parents=True)
    torch.save(torch.from_numpy(x), clam / "pt_files" / "s2.pt")
    assert find_feature_file(clam, "s2").name == "s2.pt"
    np.testing.assert_allclose(read_features(clam / "pt_files" / "s2.pt").features, x)
    (clam / "h5_files").mkdir()
    with h5py.File(clam / "h5_files" / "s3.h5", "w") as fh:
        fh.create_dataset("features", data=x)
        fh.create_dataset("coords", data=np.zeros((7, 2), np.int32))
    assert read_features(find_feature_file(clam, "s3")).coords.dtype == np.int64


def test_pt_file_with_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("executed",))

    path = tmp_path / "evil.pt"
    torch.save({"features": Evil()}, path)
    with pytest.raises(Exception, match="(?i)weights_only|unsupported"):
        read_features(path)


def test_nan_features_are_rejected_with_the_file(tmp_path):
    path = write_features(tmp_path / "bad.h5", np.full((3, 2), np.nan), None)
    with pytest.raises(ValueError, match=r"bad\.h5: features contain NaN"):
        read_features(path)


# --- splits ------------------------------------------------------------------------------------

def test_kfold_never_shares_a_patient_across_roles(tmp_path):
    cohort = read_label_table(_cohort_csv(tmp_path, n_patients=30, slides=3))
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
    cohort = read_label_table(_cohort_csv(tmp_path, n_patients=20))
    a, b = make_splits(cohort, 4, seed=1), make_splits(cohort, 4, seed=1)
    pd.testing.assert_frame_equal(a, b)
    assert not make_splits(cohort, 4, seed=2).equals(a)


def test_check_splits_catches_a_leak(tmp_path):
    leaky = pd.DataFrame({"slide_id": ["a", "b", "c"], "case_id": ["p", "p", "q"], "fold": 0,
                          "role": ["train", "test", "test"]})
    with pytest.raises(InputError, match=r"fold 0: patient\(s\) p appear in more than one"):
        check_splits(leaky)


def test_predefined_split_column_and_splits_file(tmp_path):
    path = _csv(tmp_path, "slide_id,label,split\na,0,train\nb,1,train\nc,0,val\nd,1,test\ne,0,test\nf,1,train\n")
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
    cohort = read_label_table(_csv(tmp_path, "\n".join(rows) + "\n"), site_col="site")
    splits = make_splits(cohort, folds=3, preserve_site=True)
    site = dict(zip(cohort.table["slide_id"], cohort.table["site"]))
    tests = splits[splits["role"] == "test"].assign(site=lambda d: d["slide_id"].map(site))
    assert (tests.groupby("site")["fold"].nunique() == 1).all()


def test_slide_ids_cannot_escape_the_feature_folder(tmp_path):
    (tmp_path / "secret.h5").write_bytes(b"x")
    feats = tmp_path / "feats"
    feats.mkdir()
    labels = _csv(tmp_path, "slide_id,label\n../secret,0\nb,1\nc,0\nd,1\n")
    with pytest.raises(MissingFeaturesError) as err:
        attach_features(read_label_table(labels), feats)
    assert "cannot be used as a file name" in err.value.problems["../secret"]
