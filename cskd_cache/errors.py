"""The one error family: everything cskd raises for a problem the user can fix derives from `CskdError`.

The CLI catches `CskdError` alone and prints its message as one line (exit ``exit_code``); any other exception is
a bug in cskd and keeps its traceback. Each subclass also derives from the builtin it replaces (``ValueError``,
``FileNotFoundError``), so code written against the builtins keeps working. A message names the file or option at
fault and the fix.

The roots live here, below every subpackage, so any layer can raise them; a stage's own subclasses (e.g.
``AlignError``, ``StalePredictions``) live beside the code that raises them.
"""

from __future__ import annotations

__all__ = ["CskdError", "ConfigError", "MissingFile", "CacheError", "DataError", "LabelError", "ModelError",
           "TrainError", "EvaluateError"]


class CskdError(Exception):
    """A problem with the user's input or files, not with cskd; ``str(e)`` is the one line to show."""

    exit_code = 1


class ConfigError(CskdError, ValueError):
    """A bad option or config file: the command line is wrong, nothing was read or written (exit 2)."""

    exit_code = 2


class MissingFile(CskdError, FileNotFoundError):
    """A file or folder named by the user does not exist."""


class CacheError(CskdError):
    """A feature or predictions cache that is missing, corrupt, locked, foreign or stale."""


class DataError(CskdError, ValueError):
    """Images or image sources that cannot be read as asked."""


class LabelError(CskdError, ValueError):
    """A label file or dataset spec that cannot be read as asked."""


class ModelError(CskdError, ValueError):
    """A model spec, checkpoint or run directory that cannot be built or loaded as asked."""


class TrainError(CskdError, ValueError):
    """A training request (options, labels, run directory) that cannot run as asked."""


class EvaluateError(CskdError, ValueError):
    """An evaluation, prediction, export or diagnosis request that cannot run as asked."""
