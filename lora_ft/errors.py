"""Typed errors. The library raises them; only the CLI edge turns them into one line and exit 2."""


class LoraFtError(Exception):
    """A user-facing problem: bad recipe, missing file, wrong column. The message names the culprit and the fix."""


class RecipeError(LoraFtError):
    """One or more recipe problems, reported all at once."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


class DataError(LoraFtError):
    """A dataset problem: missing file, split or column, labels outside the set, empty split."""


class RunDirError(LoraFtError):
    """A run directory that is missing, incomplete or holds a different run."""


class TrainingInterrupted(LoraFtError):
    """Ctrl-C during training: a checkpoint was saved; the CLI exits 130."""
