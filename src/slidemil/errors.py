"""Errors a user can act on: each names the file, row or field and what to do."""


class SlidemilError(Exception):
    """Base class; the CLI prints these without a traceback."""


class InputError(SlidemilError):
    """A user-supplied file or table is malformed."""


class MissingFeaturesError(InputError):
    """Some slides of the label table have no readable feature file (`problems`), or a file whose content
    cannot be trained on (`bad`); all are listed at once."""

    def __init__(self, problems: dict[str, str], bad: dict[str, str] | None = None):
        self.problems, self.bad = dict(problems), dict(bad or {})
        parts = []
        if self.problems:
            lines = "\n".join(f"  {sid}: {why}" for sid, why in sorted(self.problems.items()))
            parts.append(f"{len(self.problems)} slide(s) have missing or unreadable features:\n{lines}\n"
                         "Extract them, remove them from the label table, or pass --skip-missing.")
        if self.bad:
            lines = "\n".join(f"  {sid}: {why}" for sid, why in sorted(self.bad.items()))
            parts.append(f"{len(self.bad)} feature file(s) cannot be trained on:\n{lines}\n"
                         "Re-extract them, remove them from the label table, or pass --skip-bad.")
        super().__init__("\n".join(parts))


class TrainingError(SlidemilError):
    """Training diverged or could not proceed."""


_FULL = (28, 122)   # ENOSPC, EDQUOT


def disk_full(exc: BaseException) -> bool:
    """True when `exc`, or an exception it was raised from, is a full disk or an exhausted quota (h5py and
    safetensors wrap the OSError, sometimes only in their message)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in _FULL:
            return True
        if "No space left on device" in str(exc) or "Disk quota exceeded" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False
