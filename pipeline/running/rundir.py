"""The run directory: its layout, stage completion records, and directory swaps.

A stage writes its output directory under a temporary name and swaps it into
place, then records its completion in ``stages/NAME.json`` with the fingerprint
of its inputs. A stage whose record matches is up to date and is skipped.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import socket
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from funkflow.pipeline.running.errors import ClusterError, DataError
from funkflow.tasks.artifacts import BLOCKS_JSON, MODEL_JSON
from funkflow.tasks.io import read_json, write_json


def temporary_dir(final: Path) -> Path:
    """A fresh, empty sibling of ``final`` to build it in."""
    tmp = final.with_name(f".{final.name}.tmp-{uuid.uuid4().hex[:12]}")
    tmp.mkdir(parents=True)
    return tmp


@contextlib.contextmanager
def built_in_place(final: Path) -> Iterator[Path]:
    """A fresh sibling of ``final`` to build it in: swapped in whole when the block ends, removed if it fails,
    so ``final`` is the old one or the new one, never half of either."""
    tmp = temporary_dir(final)
    try:
        yield tmp
        swap_in(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def swap_in(tmp: Path, final: Path) -> None:
    """Move the finished ``tmp`` to ``final``, replacing an older ``final`` whole."""
    old = None
    if final.exists():
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

    @property
    def summary(self) -> Path:
        return self.root / "summary.json"

    @property
    def lock_file(self) -> Path:
        return self.root / ".funkflow.lock"

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the run directory for this process; another holder makes it a :class:`ClusterError` (exit 75).

        An advisory ``flock``: the kernel releases it when the process dies, so a
        run killed with SIGKILL leaves no stale lock behind.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "another process"
            os.close(fd)
            raise ClusterError(f"run directory {self.root} is in use by {holder}; wait for it to finish, "
                               "or use another --run-dir") from None
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since "
                          f"{time.strftime('%Y-%m-%dT%H:%M:%S%z')}\n".encode(), 0)
            yield
        finally:
            os.ftruncate(fd, 0)
            os.close(fd)  # closing the descriptor releases the lock

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
