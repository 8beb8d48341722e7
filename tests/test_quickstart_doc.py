"""docs/quickstart.md is followed by newcomers literally: every slidemil command and flag it shows must
exist (a renamed flag in the CLI fails this test, not the newcomer)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from conftest import runner
from slidemil.cli import app

DOC = Path(__file__).resolve().parents[1] / "docs" / "quickstart.md"


def _commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", DOC.read_text(), re.S)
    text = "\n".join(blocks).replace("\\\n", " ")
    return [line.split("#")[0].strip() for line in text.splitlines() if line.strip().startswith("slidemil ")]


def test_every_command_and_flag_in_the_quickstart_exists():
    commands = _commands()
    assert len(commands) >= 8
    for line in commands:
        words = line.split()
        verb = words[1:3] if words[1] == "weights" else words[1:2]
        res = runner.invoke(app, [*verb, "--help"])
        assert res.exit_code == 0, f"{line}: {res.output}"
        helptext = " ".join(res.output.split())
        for flag in (w for w in words if w.startswith("--")):
            assert flag in helptext, f"{flag} of `{line}` is not a flag of slidemil {' '.join(verb)}"


def test_the_python_in_the_quickstart_runs(tmp_path, monkeypatch):
    """The pandas lines that make a slide table from TCGA slide files and a patient-level clinical table:
    run as written on files named as the GDC names them, they give a table `train` reads; the lines that name
    IDC's DICOM slide folders by barcode give the ids a TCGA table names."""
    from slidemil.data.cohort import read_label_table

    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)
    assert blocks
    (tmp_path / "slides").mkdir()
    rows = ["#Patient Identifier\tSubtype", "#STRING\tSTRING", "PATIENT_ID\tSUBTYPE"]
    for i in range(4):
        case = f"TCGA-AB-{1000 + i}"
        folder = tmp_path / "slides" / f"{i:08x}-uuid"                   # gdc-client: a folder per slide
        folder.mkdir()
        (folder / f"{case}-01Z-00-DX1.{i:08x}-uuid.svs").write_bytes(b"")
        (tmp_path / "slides" / f"{case}-01A-01-TS1.{i:08x}-frozen.svs").write_bytes(b"")
        rows.append(f"{case}\t{'LUAD' if i % 2 else 'LUSC'}")
    (tmp_path / "clinical.tsv").write_text("\n".join(rows) + "\n")
    from dicom_slides import write_dicom_slide

    image = np.full((256, 256, 3), 200, np.uint8)
    for i in range(2):      # IDC: DICOM slides in folders named by series UID
        write_dicom_slide(tmp_path / "idc" / "TCGA-AB" / f"SM_1.2.826.{i}", image, downsamples=(1,),
                          container=f"TCGA-AB-{1000 + i}-01Z-00-DX1")
    monkeypatch.chdir(tmp_path)
    for block in blocks:
        exec(compile(block, str(DOC), "exec"), {})
    cohort = read_label_table(tmp_path / "labels.csv", label_col="SUBTYPE")
    assert sorted(cohort.table["slide_id"]) == [f"TCGA-AB-{1000 + i}-01Z-00-DX1" for i in range(4)]
    assert cohort.classes == ["LUAD", "LUSC"] and cohort.table["case_id"].nunique() == 4
    from slidemil.slides.reader import slide_files

    assert sorted(slide_files(tmp_path / "idc")) == ["TCGA-AB-1000-01Z-00-DX1", "TCGA-AB-1001-01Z-00-DX1"]
