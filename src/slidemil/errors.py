"""Errors a user can act on: each names the file, row or field and what to do."""


class SlidemilError(Exception):
    """Base class; the CLI prints these without a traceback."""


class InputError(SlidemilError):
    """A user-supplied file or table is malformed."""


class MissingFeaturesError(InputError):
    """Some slides of the label table have no readable feature file."""

    def __init__(self, problems: dict[str, str]):
        self.problems = dict(problems)
        lines = "\n".join(f"  {sid}: {why}" for sid, why in sorted(self.problems.items()))
        super().__init__(
            f"{len(self.problems)} slide(s) have missing or unreadable features:\n{lines}\n"
            "Extract them, remove them from the label table, or pass --skip-missing."
        )


class TrainingError(SlidemilError):
    """Training diverged or could not proceed."""
