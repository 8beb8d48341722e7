"""`slidemil doctor` says what is ready and what to do otherwise; `slidemil weights fetch` fails offline in
one line with the file to get by hand and where it goes."""

from __future__ import annotations

import hashlib

from conftest import runner
from slidemil.cli import app
from slidemil.doctor import run_checks
from slidemil.features.encoders import registry


def test_doctor_finds_weights_in_place_and_names_the_fix_for_missing_ones(tmp_path, monkeypatch):
    monkeypatch.setenv("SLIDEMIL_WEIGHTS", str(tmp_path / "w"))
    (tmp_path / "w" / "uni_v1").mkdir(parents=True)
    blob = b"not really a checkpoint"
    (tmp_path / "w" / "uni_v1" / "pytorch_model.bin").write_bytes(blob)
    checks = {c.name: c for c in run_checks(tmp_path, hash_files=True)}
    assert checks["OpenSlide"].ok and checks["python"].ok
    assert checks["weights uni_v1"].ok and hashlib.sha256(blob).hexdigest() in checks["weights uni_v1"].detail
    missing = checks["weights virchow2"]
    assert not missing.ok and not missing.required and "slidemil weights fetch virchow2" in missing.fix
    assert "gated" in missing.fix and "handcrafted" not in " ".join(checks)       # no weights needed there
    # a GitHub release (GPFM, Lunit) named no place to download by hand from
    assert "or download from https://github.com/birkhoffkiki/GPFM/releases" in checks["weights gpfm"].fix
    res = runner.invoke(app, ["doctor", "--out", str(tmp_path)])
    assert res.exit_code == 0 and "ready" in res.output and "fix: slidemil weights fetch uni_v2" in res.output
    # slide encoders too: CHIEF's file is fetched by hand from the authors' page
    chief = checks["slide weights chief"]
    assert not chief.ok and "download CHIEF_pretraining.pth from https://drive.google.com" in chief.fix
    (tmp_path / "w" / "chief").mkdir()
    (tmp_path / "w" / "chief" / "CHIEF_pretraining.pth").write_bytes(blob)
    assert {c.name: c for c in run_checks(tmp_path)}["slide weights chief"].ok


def test_doctor_fails_when_the_output_disk_is_nearly_full(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10 * 2**30, 9.5 * 2**30, 0.5 * 2**30))
    res = runner.invoke(app, ["doctor", "--out", str(tmp_path)])
    assert res.exit_code == 1 and "not ready: disk" in res.output and "Traceback" not in res.output


def test_weights_fetch_offline_is_one_line_naming_the_file_and_where_it_goes(tmp_path, monkeypatch):
    monkeypatch.setenv("SLIDEMIL_WEIGHTS", str(tmp_path / "w"))
    monkeypatch.setattr(registry, "hub_reachable", lambda *a, **k: False)
    res = runner.invoke(app, ["weights", "fetch", "uni_v1"])
    assert res.exit_code == 1 and "Traceback" not in res.output
    text = " ".join(res.output.split())
    assert "cannot reach" in text and "pytorch_model.bin" in text and "huggingface.co/MahmoodLab/UNI" in text
    assert str(tmp_path / "w" / "uni_v1") in text
    res = runner.invoke(app, ["weights", "fetch", "handcrafted"])
    assert res.exit_code == 1 and "no weights to fetch" in res.output
    # a file already in place is not fetched again
    (tmp_path / "w" / "uni_v1").mkdir(parents=True)
    (tmp_path / "w" / "uni_v1" / "pytorch_model.bin").write_bytes(b"x")
    res = runner.invoke(app, ["weights", "fetch", "uni_v1"])
    assert res.exit_code == 0 and "pytorch_model.bin" in res.output


def test_report_check_without_chromium_is_one_line_with_the_fix(tmp_path):
    """scripts/check_report.py crashed with a FileNotFoundError traceback where Chromium is not installed."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "check_report.py"
    page = tmp_path / "report.html"
    page.write_text("<html></html>")
    res = subprocess.run([sys.executable, str(script), str(page), "--chromium", str(tmp_path / "no-chromium")],
                         capture_output=True, text=True)
    assert res.returncode == 2 and "Traceback" not in res.stderr and "apt-get install chromium" in res.stdout
