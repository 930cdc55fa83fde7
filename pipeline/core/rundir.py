"""The run directory: its layout, stage completion records, and the rules for what funkflow may replace.

A stage writes its output directory under a temporary name and swaps it into
place, then records its completion in ``stages/NAME.json`` with the fingerprint
of its inputs. A stage whose record matches is up to date and is skipped.

Every directory funkflow makes carries a mark (``.funkflow``). Only a marked
directory is ever moved aside, replaced or removed, and a directory held for a
command (a run directory, an ingest's ``--out``) must be new, empty, or marked:
anything else belongs to the user and is refused (exit 73) naming the path.
Temporary directories a killed command left behind are marked too; the next
command that holds the place removes them.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import socket
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from funkflow.pipeline.core.errors import ClusterError, DataError, OutputError
from funkflow.tasks.artifacts import BLOCKS_JSON, MODEL_JSON
from funkflow.tasks.io import read_json, write_json

MARK = ".funkflow"
LOCK = ".funkflow.lock"
_LEFTOVERS = (".tmp-", ".old-")  # the infixes of the temporary names below


def mark(directory: Path) -> None:
    """Record that funkflow made ``directory``, so that it may later replace or remove it."""
    (directory / MARK).write_text("made by funkflow; it may replace or remove this directory\n", encoding="utf-8")


def made_by_funkflow(directory: Path) -> bool:
    return (directory / MARK).is_file()


def _users_files(directory: Path) -> list[Path]:
    """What ``directory`` holds besides funkflow's own mark and lock."""
    return [p for p in directory.iterdir() if p.name not in (MARK, LOCK)]


def claim(directory: Path) -> None:
    """Make ``directory`` funkflow's: create and mark it, or mark an empty one; one that holds files and
    that funkflow did not make is the user's, and is refused (:class:`OutputError`)."""
    if directory.exists() and not directory.is_dir():
        raise OutputError(f"{directory}: exists and is not a directory")
    if directory.is_dir() and not made_by_funkflow(directory):
        if _users_files(directory):
            raise OutputError(f"{directory}: exists, holds files, and was not made by funkflow; funkflow never "
                              "writes over what it did not make: choose a new directory, or empty this one")
    directory.mkdir(parents=True, exist_ok=True)
    if not made_by_funkflow(directory):
        mark(directory)


def remove_owned(path: Path) -> None:
    """Remove the directory ``path`` if funkflow made it (or it is empty); anything else is left alone."""
    if path.is_dir() and (made_by_funkflow(path) or not any(path.iterdir())):
        shutil.rmtree(path)


def remove_leftovers(directory: Path) -> None:
    """Remove the temporary directories that a killed command left in and beside ``directory``
    (``.NAME.tmp-*``, ``.NAME.old-*``, marked as funkflow's); call it while holding ``directory``."""
    inside = [p for p in directory.glob(".*") if any(infix in p.name for infix in _LEFTOVERS)]
    beside = [p for infix in _LEFTOVERS for p in directory.parent.glob(f".{directory.name}{infix}*")]
    for path in inside + beside:
        remove_owned(path)


@contextlib.contextmanager
def locked(directory: Path) -> Iterator[None]:
    """Hold ``directory`` for this process: claim it (:func:`claim`), lock it, and clear the leftovers of
    killed commands. Another holder makes it a :class:`ClusterError` naming the holder (exit 75).

    An advisory ``flock``: the kernel releases it when the process dies, so a command killed with SIGKILL
    leaves no stale lock behind.
    """
    claim(directory)
    fd = os.open(directory / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "another process"
        os.close(fd)
        raise ClusterError(f"{directory} is in use by {holder}; wait for it to finish, or choose another "
                           "directory") from None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since "
                      f"{time.strftime('%Y-%m-%dT%H:%M:%S%z')}\n".encode(), 0)
        remove_leftovers(directory)
        yield
    finally:
        os.ftruncate(fd, 0)
        os.close(fd)  # closing the descriptor releases the lock


@contextlib.contextmanager
def new_output(directory: Path) -> Iterator[None]:
    """Hold ``directory`` (:func:`locked`) for a command that makes it from nothing: one that already holds
    a finished output (a dataset, say) is refused, never replaced. If the command fails, a directory that
    it created is removed again."""
    created = not directory.exists()
    try:
        with locked(directory):
            if _users_files(directory):
                raise OutputError(f"{directory}: exists and is not empty; choose a new directory")
            yield
    except BaseException:
        if created and directory.is_dir() and not _users_files(directory):
            shutil.rmtree(directory, ignore_errors=True)
        raise


def temporary_dir(final: Path) -> Path:
    """A fresh, empty, marked sibling of ``final`` to build it in."""
    tmp = final.with_name(f".{final.name}.tmp-{uuid.uuid4().hex[:12]}")
    tmp.mkdir(parents=True)
    mark(tmp)
    return tmp


@contextlib.contextmanager
def built_in_place(final: Path, replace: bool = True) -> Iterator[Path]:
    """A fresh sibling of ``final`` to build it in: swapped in whole when the block ends, removed if it fails,
    so ``final`` is the old one or the new one, never half of either. ``replace=False``: a ``final`` that
    holds anything but funkflow's mark and lock by then is refused rather than replaced."""
    tmp = temporary_dir(final)
    try:
        yield tmp
        swap_in(tmp, final, replace)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def swap_in(tmp: Path, final: Path, replace: bool = True) -> None:
    """Move the finished ``tmp`` to ``final``, replacing an older ``final`` whole, if funkflow made it."""
    old = None
    if final.exists():
        if final.is_dir() and not _users_files(final):
            pass  # empty but for funkflow's own files: nothing of anyone's is lost
        elif not replace:
            raise OutputError(f"{final}: was written by another command meanwhile; not replaced")
        elif not (final.is_dir() and made_by_funkflow(final)):
            raise OutputError(f"{final}: exists and was not made by funkflow; funkflow never replaces what it "
                              "did not make: move it away, or choose another directory")
        old = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:12]}")
        final.rename(old)
    tmp.rename(final)
    if old is not None:
        shutil.rmtree(old)


@dataclass(frozen=True)
class RunDir:
    root: Path

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def test_data(self) -> Path:
        """A given test set (``split.test_source``) ingested from raw files with the training id maps."""
        return self.root / "test_data"

    @property
    def blocks(self) -> Path:
        return self.root / "blocks"

    @property
    def model(self) -> Path:
        return self.root / "model"

    @property
    def model_json(self) -> Path:
        return self.model / MODEL_JSON

    def trained_model(self) -> Path:
        """The model directory, refused as a :class:`DataError` if no model was trained here."""
        if not self.model_json.is_file():
            raise DataError(f"{self.root}: no trained model (model/{MODEL_JSON}); run `funkflow train` first")
        return self.model

    @property
    def blocks_json(self) -> Path:
        return self.blocks / BLOCKS_JSON

    @property
    def selection(self) -> Path:
        """``train.refit``'s run with validation, whose early stopping chose the epochs of the final model."""
        return self.root / "selection"

    @property
    def export(self) -> Path:
        return self.root / "export"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    def metrics_rows(self) -> list[dict[str, Any]]:
        """The rows of ``metrics.jsonl``, one an epoch."""
        return [json.loads(line) for line in self.metrics.read_text(encoding="utf-8").splitlines() if line.strip()]

    @property
    def summary(self) -> Path:
        return self.root / "summary.json"

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the run directory for this process (:func:`locked`): it must be new, empty or funkflow's."""
        with locked(self.root):
            yield

    def stage_record(self, stage: str) -> Path:
        return self.root / "stages" / f"{stage}.json"

    def completed(self, stage: str, fingerprint: str) -> dict[str, Any] | None:
        """The stage's record if it finished with these inputs, else None."""
        path = self.stage_record(stage)
        if not path.exists():
            return None
        record = read_json(path)
        return record if record.get("fingerprint") == fingerprint else None

    def mark_complete(self, stage: str, fingerprint: str, seconds: float, **facts: Any) -> None:
        self.stage_record(stage).parent.mkdir(parents=True, exist_ok=True)
        write_json({"stage": stage, "fingerprint": fingerprint, "seconds": seconds, **facts},
                   self.stage_record(stage))


def package_version(name: str) -> str:
    """The installed version of ``name``, for a run's manifest and ``--version``."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"
