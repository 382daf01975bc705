"""The exceptions gptforge raises for problems a user can fix.

Every one derives from `GptforgeError`, and each also derives from the built-in
exception it refines (a bad setting is a `ValueError`, a missing file a
`FileNotFoundError`), so `except ValueError` keeps working. The command line
prints a `GptforgeError` as one line and exits with status 2; any other
exception is a bug and keeps its traceback.
"""

from __future__ import annotations


class GptforgeError(Exception):
    """Base class: the message says what is wrong and what to do about it."""


class BadInputError(GptforgeError, ValueError):
    """A setting, flag, prompt or data file the user gave is not usable."""


class NotFoundError(GptforgeError, FileNotFoundError):
    """A model, run directory or data file that was named does not exist."""


class CheckpointError(GptforgeError, ValueError):
    """Model or run files that do not parse, or that do not fit their config."""


class DownloadError(GptforgeError, RuntimeError):
    """A file could not be fetched from any source; the message says what was tried and what to do."""
