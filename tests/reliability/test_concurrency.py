"""Two processes on one output never mix it: advisory locks on run folders and per-slide outputs, locks
of dead processes taken over, half-written files of killed runs cleaned on resume."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pandas as pd
import pytest
import yaml

from conftest import runner
from slidemil.cli import app
from slidemil.errors import InputError
from slidemil.rundir import RunDir
from slidemil.slides.synthetic import make_slide_cohort
from slidemil.utils.lock import Lock, LockedError


def _train_args(root, out, *extra):
    return ["train", "--features", str(root / "features"), "--labels", str(root / "labels.csv"), "--out", str(out),
            "--folds", "2", "--epochs", "2", "--bootstrap", "20", "--quiet", *extra]


def test_a_locked_run_folder_is_refused_naming_its_owner(feature_cohort, tmp_path):
    root, _ = feature_cohort
    out = tmp_path / "run"
    out.mkdir()
    with RunDir(out).lock():
        res = runner.invoke(app, _train_args(root, out))
    assert res.exit_code == 1 and "in use by another slidemil process" in res.output
    assert f"pid {os.getpid()}" in res.output and "Traceback" not in res.output
    assert not (out / "config.yaml").exists()


def test_a_lock_left_by_a_dead_process_is_taken_over(tmp_path, caplog):
    path = tmp_path / ".slidemil.lock"
    path.write_text("pid 999999 on elsewhere, since 2026-01-01 00:00:00")   # no process holds it
    with caplog.at_level(logging.INFO), Lock(path, "run folder x"):
        assert f"pid {os.getpid()}" in path.read_text()
        with pytest.raises(LockedError, match="run folder x is in use"):
            Lock(path, "run folder x").acquire()
    assert "taking over the lock left by pid 999999" in caplog.text
    assert path.read_text() == "" and issubclass(LockedError, InputError)


@pytest.mark.slow
def test_two_trains_on_one_folder_at_once_do_not_mix(feature_cohort, tmp_path):
    root, _ = feature_cohort
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "slidemil"]
    procs = [subprocess.Popen(cmd + _train_args(root, out, "--seed", str(seed)), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for seed in (1, 2)]
    results = [(p.wait(timeout=600), p.stdout.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 1], results
    loser = next(text for code, text in results if code == 1)
    assert "in use by another slidemil process" in loser or "already holds a run" in loser
    seed = yaml.safe_load((out / "config.yaml").read_text())["seed"]
    winner = next(s for s, (code, _) in zip((1, 2), results) if code == 0)
    assert seed == winner   # config, splits and predictions all come from the process that finished
    assert len(pd.read_csv(out / "predictions.csv")) == len(pd.read_csv(out / "splits.csv").query("role == 'test'"))


def test_resume_removes_half_written_files_of_a_killed_run(trained, tmp_path):
    root, run = trained
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    stale = copy / "fold_0" / ".model.safetensors.tmp-424242"
    stale.write_bytes(b"half")
    cfg = yaml.safe_load((copy / "config.yaml").read_text())
    cfg.pop("slidemil")
    cfg["out"] = str(copy)
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    res = runner.invoke(app, ["train", "--config", str(tmp_path / "cfg.yaml"), "--resume", "--quiet"])
    assert res.exit_code == 0, res.output
    assert not stale.exists()


def test_a_slide_another_process_is_working_on_is_left_to_it(tmp_path):
    make_slide_cohort(tmp_path / "c", n_patients=2, slides_per_patient=(1, 1), size=(1024, 1024), seed=1)
    out = tmp_path / "o"
    args = ["segment", "--slides", str(tmp_path / "c" / "slides"), "--out", str(out), "--quiet"]
    with Lock(out / ".locks" / "P000_S0.lock", "slide P000_S0"):
        res = runner.invoke(app, args)
    assert res.exit_code == 0 and "1 in progress in another process" in res.output
    assert not (out / "segmentation" / "P000_S0.geojson").exists()
    assert (out / "segmentation" / "P001_S0.geojson").exists()
    res = runner.invoke(app, args)
    assert res.exit_code == 0 and "1 done, 1 already complete" in res.output


def test_unknown_arguments_fail_before_the_run_folder_exists(feature_cohort, tmp_path):
    root, _ = feature_cohort
    out = tmp_path / "run"
    for extra in (["--model-arg", "hiden_dim=8"], ["--strategy", "mhim", "--strategy-arg", "mask_ratio_hh=0.1"],
                  ["--strategy-arg", "lamda=0.1"], ["--reembed", "rrt", "--reembed-arg", "dimm=8"]):
        res = runner.invoke(app, _train_args(root, out, *extra))
        assert res.exit_code == 1 and "Traceback" not in res.output, extra
        assert not out.exists(), extra
    res = runner.invoke(app, _train_args(root, out, "--model-arg", "hiden_dim=8"))
    assert "did you mean 'hidden_dim'" in res.output


def test_debug_shows_the_traceback_behind_an_input_error(tmp_path):
    res = runner.invoke(app, ["--debug", "train", "--features", str(tmp_path), "--labels", str(tmp_path / "no.csv"),
                              "--out", str(tmp_path / "o")])
    assert res.exit_code == 1 and "Traceback" in res.output and "does not exist" in res.output
    res = runner.invoke(app, ["train", "--features", str(tmp_path), "--labels", str(tmp_path / "no.csv"),
                              "--out", str(tmp_path / "o")])
    assert res.exit_code == 1 and "Traceback" not in res.output
