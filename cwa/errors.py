"""Typed errors raised by the library; `cwa.cli` maps them to one-line messages.

`UsageError` (exit 2) means the user asked for something invalid: an unknown name, an
invalid value, an impossible combination. `CwaError` (exit 1) is a run-time failure: a
missing or corrupt file, a model that cannot be loaded.
"""


class CwaError(Exception):
    """A run-time failure (exit code 1)."""

    exit_code = 1


class UsageError(CwaError):
    """Invalid input from the user (exit code 2)."""

    exit_code = 2


class ArtifactError(CwaError):
    """An artifact is missing, corrupt, of the wrong schema or of another model."""
