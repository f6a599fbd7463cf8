"""The one family of errors a user can act on.

Every error that a caller can fix (a wrong path, option, input, or an export that
does not validate) derives from `JobbertOnnxError`, and its message names the fix.
Anything else is a bug and keeps its traceback. Each class also derives from the
built-in it used to be, so ``except ValueError`` keeps working.
"""

from __future__ import annotations


class JobbertOnnxError(Exception):
    """Base class of every error a user of jobbert-onnx can act on."""


class UsageError(JobbertOnnxError, ValueError):
    """An argument or option is out of range or unknown; the message lists what is valid."""


class WrongTypeError(JobbertOnnxError, TypeError):
    """An argument has the wrong type (texts that are not strings, a device that is not a name)."""


class SetupError(JobbertOnnxError, RuntimeError):
    """Something on this machine stops the job (a library that does not load, a port in use,
    a damaged install); the message names the fix."""


class OutputExistsError(JobbertOnnxError, FileExistsError):
    """The output path is taken; the message says how to replace it or where else to write."""


class SourceUnavailableError(JobbertOnnxError, OSError):
    """The model can be neither found in a cache nor fetched (offline, unknown repository or
    revision, no network); the message says what to do."""


class MissingExtraError(JobbertOnnxError, ImportError):
    """A feature needs an optional dependency group that is not installed; names the pip command."""


def missing_extra(feature: str, extra: str, error: ImportError) -> MissingExtraError:
    """The error for `feature` failing to import (`error`): names ``pip install 'jobbert-onnx[extra]'``."""
    return MissingExtraError(f"{feature} needs {error.name or error}: pip install 'jobbert-onnx[{extra}]'")
