"""The label table: formats read, bad rows and columns named, features missing or unsafe listed."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from conftest import label_csv, write_text_file
from slidemil.data.cohort import attach_features, read_label_table
from slidemil.errors import InputError, MissingFeaturesError
from slidemil.features.store import write_features


def test_missing_column_is_named(tmp_path):
    path = write_text_file(tmp_path, "slide_id,case_id,diagnosis\na,a,x\n")
    with pytest.raises(InputError, match=r"column 'label' is missing \(found: slide_id, case_id, diagnosis\)"):
        read_label_table(path)
    table = write_text_file(tmp_path, "slide_id,diagnosis\na,x\nb,y\nc,x\nd,y\n")
    assert read_label_table(table, label_col="diagnosis").classes == ["x", "y"]


def test_duplicated_slide_ids_name_rows(tmp_path):
    path = write_text_file(tmp_path, "slide_id,label\na,0\nb,1\na,1\nc,0\n")
    with pytest.raises(InputError, match=r"repeats slide id\(s\) a in rows 2, 4"):
        read_label_table(path)


def test_nan_labels_warn_and_drop(tmp_path, caplog):
    path = write_text_file(tmp_path, "slide_id,label\na,0\nb,\nc,1\nd,0\ne,1\n")
    with caplog.at_level(logging.WARNING):
        cohort = read_label_table(path)
    assert list(cohort.table["slide_id"]) == ["a", "c", "d", "e"]
    assert "row(s) 3" in caplog.text


def test_single_patient_class_is_an_error(tmp_path):
    path = write_text_file(tmp_path, "slide_id,case_id,label\na,p1,neg\nb,p2,neg\nc,p3,pos\nd,p3,pos\n")
    with pytest.raises(InputError, match=r"class 'pos' of column 'label' has 1 patient\(s\) \(row\(s\) 4, 5\)"):
        read_label_table(path)


def test_label_outside_classes_is_named(tmp_path):
    path = write_text_file(tmp_path, "slide_id,label\na,neg\nb,pos\nc,maybe\n")
    with pytest.raises(InputError, match=r"label\(s\) maybe in row\(s\) 4"):
        read_label_table(path, classes=["neg", "pos"])


def test_classes_fix_output_order_and_case_defaults_to_slide(tmp_path):
    path = write_text_file(tmp_path, "slide_id,label\na,pos\nb,neg\nc,pos\nd,neg\n")
    cohort = read_label_table(path, classes=["pos", "neg"])
    assert cohort.classes == ["pos", "neg"]
    assert list(cohort.table["y"]) == [0, 1, 0, 1]
    assert list(cohort.table["case_id"]) == list(cohort.table["slide_id"])


def test_missing_and_unreadable_features_are_listed_together(tmp_path):
    labels = label_csv(tmp_path, n_patients=4, slides=1)
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


def test_slide_ids_cannot_escape_the_feature_folder(tmp_path):
    (tmp_path / "secret.h5").write_bytes(b"x")
    feats = tmp_path / "feats"
    feats.mkdir()
    labels = write_text_file(tmp_path, "slide_id,label\n../secret,0\nb,1\nc,0\nd,1\n")
    with pytest.raises(InputError, match=r"slide id\(s\) '../secret' in row\(s\) 2 that cannot be file names"):
        read_label_table(labels)
    # a table that bypasses the reader meets the same wall when its features are looked up
    cohort = read_label_table(write_text_file(tmp_path, "slide_id,label\na,0\nb,1\nc,0\nd,1\n"))
    cohort.table.loc[0, "slide_id"] = "../secret"
    with pytest.raises(MissingFeaturesError) as err:
        attach_features(cohort, feats)
    assert "cannot be used as a file name" in err.value.problems["../secret"]


def test_without_a_case_column_slides_are_patients_said_and_tcga_siblings_refused(tmp_path, caplog):
    """No case_id column made every slide its own patient without a word, so two slides of one patient could
    be trained on and tested on in one fold. Now the log says so, and slides whose TCGA barcodes name the same
    patient are refused with the fix."""
    path = write_text_file(tmp_path, "slide_id,label\na,x\nb,y\nc,x\nd,y\n")
    with caplog.at_level(logging.WARNING):
        cohort = read_label_table(path)
    assert list(cohort.table["case_id"]) == ["a", "b", "c", "d"] and "every slide is taken as its own patient" in caplog.text
    tcga = write_text_file(tmp_path, "slide_id,label\nTCGA-A1-0001-01Z-00-DX1,x\nTCGA-A1-0001-01Z-00-DX2,x\n"
                                     "TCGA-A1-0002-01Z-00-DX1,y\nTCGA-A1-0003-01Z-00-DX1,y\nTCGA-A1-0004-01Z-00-DX1,x\n",
                           name="tcga.csv")
    with pytest.raises(InputError, match=r"2 slides share a TCGA patient barcode .*TCGA-A1-0001-01Z-00-DX1.*add a case_id"):
        read_label_table(tcga)
