"""Logging for people (one short line each) or for machines (``--log-format json``: one JSON object a line).

A JSON line carries ``time`` (ISO 8601, UTC), ``level``, ``logger``, ``message``,
the ``stage`` running when it was logged, and, for an epoch's line, ``epoch``
and ``metrics`` (the row that also goes to ``metrics.jsonl``).
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import sys
import time
from collections.abc import Iterator

_stage: contextvars.ContextVar[str | None] = contextvars.ContextVar("funkflow_stage", default=None)


@contextlib.contextmanager
def stage_context(name: str) -> Iterator[None]:
    """Tag the log records made inside with ``stage``."""
    token = _stage.set(name)
    try:
        yield
    finally:
        _stage.reset(token)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "stage": _stage.get(),
            "message": record.getMessage(),
        }
        for key in ("epoch", "metrics"):
            if hasattr(record, key):
                line[key] = getattr(record, key)
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time (it may be swapped, e.g. by a test's capture)."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


class _InterruptRace(logging.Filter):
    """Drops one traceback of distributed's ``sync()`` (2026.8): on Ctrl-C it cancels its future from a
    callback on the event loop, which raises NameError when the interrupt came before the future existed.
    The interrupt itself is reported (one line, exit 130); the race in its clean-up is not the user's news."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return not (isinstance(error, NameError) and "'future'" in str(error))


_json_lines = False  # --log-format json: every line a command writes is a JSON object, results too


def say(text: str, error: bool = False) -> None:
    """A command's result (stdout) or its error (``error``: stderr), one line each: as text, or with
    ``--log-format json`` as JSON objects of level ``result`` or ``error``, like the log lines, so that
    ``>> nightly.jsonl 2>&1`` gives a file of JSON lines."""
    stream = sys.stderr if error else sys.stdout
    if not _json_lines:
        print(text, file=stream)
        return
    for line in text.splitlines():
        record = logging.makeLogRecord({"name": "funkflow", "msg": line, "levelname": "ERROR" if error else "RESULT"})
        print(JsonFormatter().format(record), file=stream)


def configure(log_format: str, quiet: bool) -> None:
    """Set up the root handler and the levels of funkflow's and distributed's loggers."""
    global _json_lines
    _json_lines = log_format == "json"
    handler = _StderrHandler()
    handler.name = "funkflow"
    handler.setFormatter(JsonFormatter() if log_format == "json"
                         else logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
    root = logging.getLogger()
    # Replace only our own handler (a second main() in one process, as in tests); leave any other.
    root.handlers[:] = [h for h in root.handlers if h.name != "funkflow"] + [handler]
    logging.getLogger("funkflow").setLevel(logging.WARNING if quiet else logging.INFO)
    import distributed  # noqa: F401  (configures its loggers on import; quieten them after)

    for name in ("distributed", "dask", "tornado", "tornado.application"):
        logger = logging.getLogger(name)
        if name in ("distributed", "dask"):
            logger.setLevel(logging.WARNING)
        logger.handlers[:] = []  # through the root handler, in the chosen format
        logger.propagate = True
    tornado_errors = logging.getLogger("tornado.application")
    if not any(isinstance(f, _InterruptRace) for f in tornado_errors.filters):
        tornado_errors.addFilter(_InterruptRace())
