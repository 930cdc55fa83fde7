"""The exception hierarchy and the exit codes (sysexits) that schedulers act on."""

from __future__ import annotations

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_DATAERR = 65
EXIT_SOFTWARE = 70
EXIT_CANTCREAT = 73
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


class TrainingDiverged(FunkflowError):
    """The loss became non-finite or exploded and rollbacks did not recover it."""

    exit_code = EXIT_SOFTWARE


class ClusterError(FunkflowError):
    """The Dask scheduler is unreachable or workers were lost past the retry budget."""

    exit_code = EXIT_TEMPFAIL


class WorkersLost(ClusterError):
    """Workers left while an epoch ran on them; the driver restarts from the newest checkpoint."""
