"""Errors a user can act on. The CLI prints them without a traceback and exits with their code."""

from __future__ import annotations


class GrcError(Exception):
    """Base of every error that is the user's to fix (bad spec, missing tool, failed check)."""

    exit_code = 1


class SpecError(GrcError):
    """One or more problems in a spec; each line reads ``file:line: field.path: message``."""

    exit_code = 2

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


class StageError(GrcError):
    """A build stage failed for a reason it could name (tolerance exceeded, pattern not found, ...)."""

    exit_code = 1


class SettingError(GrcError):
    """A command-line flag or environment variable has a value grc cannot use (exit 2, like a bad spec)."""

    exit_code = 2
