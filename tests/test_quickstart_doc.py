"""docs/quickstart.md is followed by newcomers literally: every slidemil command and flag it shows must
exist (a renamed flag in the CLI fails this test, not the newcomer)."""

from __future__ import annotations

import re
from pathlib import Path

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
