"""The exception hierarchy and the exit codes (sysexits) that schedulers act on, and the faults from outside
funkflow (a full disk, a lost scheduler) told as one of them."""

from __future__ import annotations

import errno
from collections.abc import Iterator

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_DIVERGED = 3  # not a sysexits code: neither the input, the config's syntax nor the software is at fault
EXIT_DATAERR = 65
EXIT_SOFTWARE = 70  # a bug in funkflow: report it
EXIT_CANTCREAT = 73
EXIT_IOERR = 74
EXIT_TEMPFAIL = 75
EXIT_CONFIG = 78


class FunkflowError(Exception):
    """Base of every error funkflow reports to a user; ``exit_code`` is its sysexits code."""

    exit_code = EXIT_SOFTWARE


class UsageError(FunkflowError):
    """The command line asks for something that cannot be done as asked."""

    exit_code = EXIT_USAGE


class ConfigError(FunkflowError):
    """A config key is unknown or its value is invalid; the message names the key."""

    exit_code = EXIT_CONFIG


class DataError(FunkflowError):
    """Input data are malformed or missing; the message names the file (and line)."""

    exit_code = EXIT_DATAERR


class OutputError(FunkflowError):
    """An output cannot be created where asked without losing what is there; the message names the path."""

    exit_code = EXIT_CANTCREAT


class StorageError(FunkflowError):
    """A file could not be written or read for a reason of the storage's (full, read-only, failing); the
    message names the path."""

    exit_code = EXIT_IOERR


class TrainingDiverged(FunkflowError):
    """The loss became non-finite or exploded and rollbacks did not recover it."""

    exit_code = EXIT_DIVERGED


class ClusterError(FunkflowError):
    """The Dask scheduler is unreachable or workers were lost past the retry budget."""

    exit_code = EXIT_TEMPFAIL


class WorkersLost(ClusterError):
    """Workers left while an epoch ran on them; the driver restarts from the newest checkpoint."""


# Errors of the storage rather than of funkflow or its input.
STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS, errno.EFBIG})
# pyarrow reports them as an OSError without an errno, the system's message in its text.
STORAGE_MESSAGES = ("No space left on device", "Disk quota exceeded", "Read-only file system",
                    "Input/output error", "File too large")


def _causes(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        yield cause
        cause = cause.__cause__ or cause.__context__


def outside_fault(exc: BaseException) -> FunkflowError | None:
    """``exc`` as the :class:`FunkflowError` of a fault outside funkflow, if it is one: a full or failing disk
    (:class:`StorageError`) or a Dask scheduler that went away (:class:`ClusterError`). ``None`` otherwise."""
    if isinstance(exc, FunkflowError):
        return exc
    for cause in _causes(exc):
        if isinstance(cause, OSError) and (cause.errno in STORAGE_ERRNOS
                                           or any(m in str(cause) for m in STORAGE_MESSAGES)):
            where = f" at {cause.filename}" if cause.filename else ""
            reason = next((m for m in STORAGE_MESSAGES if m in str(cause)), cause.strerror or str(cause))
            return StorageError(f"storage error{where}: {reason}")
    return None
