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


def test_file_names_as_scanners_and_copies_make_them_are_usable_ids(tmp_path):
    """"HE (1)" (a second download or a copied file) and "S1+HE" were refused as slide ids; what would break a
    path, a viewer URL, a glob or `--slide-ids a,b` still is."""
    from slidemil.utils.io import is_safe_id

    for good in ("HE (1)", "S12-3456 A1+HE", "case=7 @20x ~v2"):
        assert is_safe_id(good), good
    for bad in ("../x", "a/b", "a#b", "a%20", "a?b", "a,b", "a[1]", "a*", "a$b", "a'b", '"a"', ".hidden", "-x"):
        assert not is_safe_id(bad), bad
    cohort = read_label_table(write_text_file(tmp_path, "slide_id,label\nHE (1),0\nHE (2),1\nS1+HE,0\nS2+HE,1\n"))
    assert list(cohort.table["slide_id"]) == ["HE (1)", "HE (2)", "S1+HE", "S2+HE"]


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


def test_tcga_barcodes_find_features_named_as_the_gdc_names_slides(tmp_path, caplog):
    """The GDC names a slide `<barcode>.<UUID>.svs` and preprocess names its features after the file, while a
    clinical table names the barcode: every slide was "missing". An id now matches the one file named
    `<id>.<suffix>`; two such files, or a file named after another id of the table, are never guessed."""
    bar = [f"TCGA-05-42{i:02d}-01Z-00-DX1" for i in range(5)]
    feats = tmp_path / "feats"
    for i, b in enumerate(bar[:3]):
        write_features(feats / f"{b}.{i:08x}-38cf-40ea-8213-45c2b100ac01.h5", np.full((3, 4), i), np.zeros((3, 2)))
    write_features(feats / f"{bar[3]}.h5", np.ones((3, 4)), np.zeros((3, 2)))           # named exactly
    for uuid in ("aaaa", "bbbb"):                                                         # two candidates
        write_features(feats / f"{bar[4]}.{uuid}.h5", np.ones((3, 4)), np.zeros((3, 2)))
    rows = "".join(f"{b},{b[:12]},{i % 2}\n" for i, b in enumerate(bar))
    cohort = read_label_table(write_text_file(tmp_path, "slide_id,case_id,label\n" + rows))
    with pytest.raises(MissingFeaturesError) as err:
        attach_features(cohort, feats)
    assert list(err.value.problems) == [bar[4]] and "2 files are named" in err.value.problems[bar[4]]
    with caplog.at_level(logging.INFO, logger="slidemil.data.cohort"):
        kept = attach_features(cohort, feats, skip_missing=True)
    paths = dict(zip(kept.table["slide_id"], kept.table["feature_path"]))
    assert [paths[b].split("/")[-1].split(".")[1] for b in bar[:3]] == ["00000000-38cf-40ea-8213-45c2b100ac01",
                                                                        "00000001-38cf-40ea-8213-45c2b100ac01",
                                                                        "00000002-38cf-40ea-8213-45c2b100ac01"]
    assert paths[bar[3]].endswith(f"{bar[3]}.h5") and "3 slide id(s) matched" in caplog.text
    # the two files no row could claim are said to be unused (a forgotten row, or a typo in an id)
    assert "2 feature file(s) under" in caplog.text and "have no row in the label table" in caplog.text


def test_a_file_named_after_another_id_is_that_ids_and_an_extension_is_hinted(tmp_path):
    from slidemil.utils.ids import match_ids

    # "A" has no file; "A.1" is another slide of the table with its own file: "A" must not take it
    assert match_ids(["A", "A.1"], ["A.1"]) == ({"A.1": "A.1"}, {})
    assert match_ids(["A"], ["A.1"]) == ({"A": "A.1"}, {})
    found, problems = match_ids(["A", "A.x"], ["A.x.y"])         # one file two ids could claim
    assert found == {} and set(problems) == {"A", "A.x"}
    assert match_ids(["TCGA-1"], ["TCGA-10.u"]) == ({}, {})        # only at a '.' boundary
    feats = tmp_path / "feats"
    write_features(feats / "s1.h5", np.ones((3, 4)), np.zeros((3, 2)))
    cohort = read_label_table(write_text_file(tmp_path, "slide_id,label\ns1.svs,0\ns1,1\ns2,0\ns3,1\n"))
    with pytest.raises(MissingFeaturesError) as err:
        attach_features(cohort, feats)
    assert "slide_id is the file name without its extension: s1, not s1.svs" in err.value.problems["s1.svs"]


@pytest.mark.parametrize("name, sep", [("labels.tsv", "\t"), ("labels.csv", "\t"), ("labels.csv", ";")])
def test_tab_and_semicolon_tables_are_read_as_such(tmp_path, name, sep):
    """A GDC clinical `.tsv`, or a CSV saved by Excel where ',' is the decimal mark (';' between columns),
    was one column named 'slide_id;case_id;label': "column 'slide_id' is missing"."""
    rows = [["slide_id", "case_id", "label"]] + [[f"s{i}", f"p{i}", "ab"[i % 2]] for i in range(4)]
    path = tmp_path / name
    path.write_text("\n".join(sep.join(r) for r in rows) + "\n")
    cohort = read_label_table(path)
    assert list(cohort.table["slide_id"]) == ["s0", "s1", "s2", "s3"] and cohort.classes == ["a", "b"]


def test_an_excel_workbook_and_a_decimal_comma_are_one_line_each(tmp_path):
    from slidemil.tasks import TaskConfig, create_task

    book = tmp_path / "clinical.xlsx"
    book.write_bytes(b"PK\x03\x04" + bytes(60))           # what every .xlsx (a zip) starts with
    with pytest.raises(InputError, match=r"clinical.xlsx is an Excel workbook; save it as CSV"):
        read_label_table(book)
    path = write_text_file(tmp_path, "slide_id;case_id;time;event\na;p1;12,5;1\nb;p2;3;0\n")
    task = create_task(TaskConfig(task="survival"))
    with pytest.raises(InputError, match=r"row\(s\) 2 hold '12,5' \(write the decimal point as '.', not ','\)"):
        task.read(path)


def test_features_of_another_encoder_or_resolution_are_not_mixed_in_silently(tmp_path, caplog):
    """UNI and CLAM's ResNet-50 both give 1024-d features, so the dimension check let a cohort mix them; and a
    slide extracted at another resolution trained beside the rest without a word."""
    feats = tmp_path / "feats"
    for i in range(6):
        attrs = {"encoder": "resnet50_trunc" if i == 5 else "uni_v1", "target_mpp": 0.25 if i == 4 else 0.5,
                 "patch_size": 256}
        write_features(feats / f"p{i}_s0.h5", np.ones((3, 4)), np.zeros((3, 2)), attrs)
    cohort = read_label_table(label_csv(tmp_path, n_patients=6, slides=1))
    with pytest.raises(MissingFeaturesError) as err:
        attach_features(cohort, feats)
    assert list(err.value.bad) == ["p5_s0"] and "--skip-bad" in str(err.value)
    assert "made by encoder 'resnet50_trunc', the other files by 'uni_v1'" in err.value.bad["p5_s0"]
    with caplog.at_level(logging.WARNING, logger="slidemil.data.cohort"):
        kept = attach_features(cohort, feats, skip_bad=True)
    assert len(kept.table) == 5
    assert ("1 of 5 feature files (e.g. p4_s0.h5) were made with a resolution of 0.25 µm/px, the others with a "
            "resolution of 0.5 µm/px") in caplog.text
