"""User-facing errors: one line, naming the file or option at fault.

The CLI turns any :class:`CxrAuditError` into a one-line message and a non-zero exit code;
anything else is a bug and keeps its traceback.
"""


class CxrAuditError(Exception):
    """An error caused by user input (bad file, bad option), not by a bug."""

    exit_code = 1


class UsageError(CxrAuditError):
    """Wrong or inconsistent options/configuration (exit code 2)."""

    exit_code = 2


class BadInputError(CxrAuditError):
    """An input file (image, mask, manifest, checkpoint, scan) cannot be used."""
