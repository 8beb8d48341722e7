"""Hostile input gets one clear line naming the file, row or field: label spellings, damaged fold
checkpoints, unsafe feature files, markup and control characters in user text."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors.torch import save_file

from conftest import runner, write_text_file
from slidemil import models
from slidemil.cli import app
from slidemil.data.cohort import read_label_table
from slidemil.errors import InputError
from slidemil.features.store import write_features
from slidemil.models.checkpoint import load_model, save_model
from slidemil.utils.io import ensure_writable
from slidemil.utils.text import printable

# --- label spellings --------------------------------------------------------------------------------

@pytest.mark.parametrize("a,b", [("Tumor", "tumor"), ("1", "1.0"), ("pos", "POS")])
def test_label_spelling_variants_are_an_error_naming_the_rows(tmp_path, a, b):
    table = write_text_file(tmp_path, f"slide_id,label\ns1,{a}\ns2,{b}\ns3,other\ns4,other\ns5,{a}\n")
    rows = {a: "2, 6", b: "3"}
    expected = " / ".join(f"{v!r} (row(s) {rows[v]})" for v in sorted([a, b]))
    with pytest.raises(InputError) as err:
        read_label_table(table)
    assert f"spells one label several ways: {expected}" in str(err.value) and "--classes" in str(err.value)


def test_classes_decide_which_spelling_a_variant_means(tmp_path, caplog):
    table = write_text_file(tmp_path, "slide_id,label\ns1,Tumor\ns2,tumor\ns3,normal\ns4,Normal\n")
    with caplog.at_level(logging.INFO):
        cohort = read_label_table(table, classes=["normal", "tumor"])
    assert list(cohort.table["label"]) == ["tumor", "tumor", "normal", "normal"]
    assert "read as class 'tumor'" in caplog.text


def test_spaces_around_labels_are_stripped_with_a_note(tmp_path, caplog):
    table = write_text_file(tmp_path, 'slide_id,label\ns1,"neg "\ns2,pos\ns3,neg\ns4,pos\n')
    with caplog.at_level(logging.INFO):
        cohort = read_label_table(table)
    assert cohort.classes == ["neg", "pos"] and "spaces around the label in row(s) 2" in caplog.text


# --- damaged fold checkpoints -----------------------------------------------------------------------

def _fold(tmp_path):
    folder = tmp_path / "fold_0"
    save_model(folder, models.create("abmil", in_dim=8, n_outputs=2),
               {"model": "abmil", "model_args": {}, "in_dim": 8, "n_outputs": 2})
    return folder


@pytest.mark.parametrize("damage,message", [
    (lambda f: (f / "model.safetensors").write_bytes(b"garbage" * 10), r"model\.safetensors: not a readable safetensors"),
    (lambda f: (f / "model.safetensors").write_bytes((f / "model.safetensors").read_bytes()[:200]),
     r"model\.safetensors: not a readable safetensors"),
    (lambda f: (f / "model.json").write_text("{not json"), r"model\.json: not valid JSON"),
    (lambda f: (f / "model.json").write_text(json.dumps({"model": "abmil", "n_outputs": 2})),
     r"model\.json: 'in_dim' is missing"),
    (lambda f: (f / "model.json").write_text(json.dumps({"model": "abmil", "in_dim": 16, "n_outputs": 2})),
     r"model\.safetensors: does not fit the model described in model\.json \(Error\(s\) in loading"),
    (lambda f: (f / "model.json").write_text(json.dumps({"model": "nope", "in_dim": 8, "n_outputs": 2})),
     r"model\.json: unknown model 'nope'"),
])
def test_a_damaged_fold_is_one_line_naming_its_file(tmp_path, damage, message):
    folder = _fold(tmp_path)
    damage(folder)
    with pytest.raises(InputError, match=message) as err:
        load_model(folder)
    assert "fold_0" in str(err.value) and "\n" not in str(err.value)


def test_predict_with_a_damaged_fold_prints_no_traceback(tmp_path):
    run = tmp_path / "run"
    folder = _fold(run)
    (folder / "done.json").write_text("{}")
    save_file({"x": torch.zeros(1)}, str(folder / "model.safetensors"))
    feats = tmp_path / "feats"
    write_features(feats / "a.h5", torch.randn(5, 8).numpy(), None, {"embedding_dim": 8})
    res = runner.invoke(app, ["predict", str(run), "--features", str(feats), "--out", str(tmp_path / "p.csv")])
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert "fold_0/model.safetensors: does not fit" in res.output


# --- user text is printed as written ----------------------------------------------------------------

def test_markup_and_control_characters_in_user_text_are_printed_literally(tmp_path):
    labels = tmp_path / "lab[red]els.csv"
    labels.write_text("slide_id,label\nbad[/]id,a\nx\x1b[31m,b\n")
    res = runner.invoke(app, ["train", "--features", str(tmp_path), "--labels", str(labels),
                              "--out", str(tmp_path / "o"), "--label-col", "diag[/]nosis"])
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert "lab[red]els.csv" in res.output and "diag[/]nosis" in res.output
    assert printable("x\x1b[31m") == "x\\x1b[31m" and printable("a\nb\tc") == "a\nb\tc"


# --- nothing is written before the inputs are valid; unwritable folders are one line ------------------

def test_a_bad_label_table_leaves_no_run_folder(feature_cohort, tmp_path):
    root, _ = feature_cohort
    out = tmp_path / "run"
    res = runner.invoke(app, ["train", "--features", str(root / "features"), "--labels", str(root / "labels.csv"),
                              "--out", str(out), "--label-col", "nope", "--quiet"])
    assert res.exit_code == 1 and "column 'nope' is missing" in res.output
    assert not out.exists(), "no train.log or config in a folder for a run that never started"


def test_unwritable_output_is_refused_before_any_work(feature_cohort, tmp_path):
    """(A file where the folder should be: unwritable even for root, who writes through permissions.)"""
    blocker = tmp_path / "file"
    blocker.write_text("a file where a folder should be")
    with pytest.raises(InputError, match=r"cannot write to .*file/sub .*choose another --out"):
        ensure_writable(blocker / "sub")
    root, _ = feature_cohort
    res = runner.invoke(app, ["train", "--features", str(root / "features"), "--labels", str(root / "labels.csv"),
                              "--out", str(blocker / "run"), "--quiet"])
    assert res.exit_code == 1 and "cannot write to" in res.output and "Traceback" not in res.output
