"""Checkpoints between epochs, at any fsspec URL: verified before use, or they do not exist.

``<url>/epoch-NNNNNN/`` holds one ``user-RRRR`` factor block per row block
(written by the worker that owns it), one ``item-CCCC`` block per column block
(written by the worker that holds it between epochs),
``state.json`` (epoch, step size, history, early-stopping state) and, last,
``manifest.json`` with the SHA-256 of every file, the run's identity and the
arrays' layout. Each file is written whole (renamed into place on a local disk;
an object store's put is whole), and a checkpoint without a manifest, or whose
checksums fail, does not exist. Only epoch directories that carry funkflow's
mark are ever replaced or removed, whatever else lives under the URL.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass
from typing import Any

import fsspec

from funkflow.pipeline.core.config import differences
from funkflow.pipeline.core.errors import ConfigError, OutputError
from funkflow.pipeline.core.rundir import MARK
from funkflow.pipeline.training.records import LoopState
from funkflow.tasks.io import put_bytes

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
STATE = "state.json"
_EPOCH_DIR = re.compile(r"epoch-(\d{6})$")


def open_storage(url: str, key: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem and path of ``url``; an unknown protocol or a missing driver is a config error at ``key``."""
    try:
        return fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as exc:
        raise ConfigError(f"{key}: cannot open {url!r}: {exc}") from None


@dataclass(frozen=True)
class Checkpoint:
    url: str
    state: LoopState

    @property
    def epoch(self) -> int:
        return self.state.epoch


class CheckpointStore:
    """The checkpoints of one training run.

    ``identity`` is what a checkpoint must match to be resumed from: the config
    sections and data fingerprint that determine the factors (not the epoch
    count, so a finished run can be extended); ``force`` resumes despite
    differences. ``layout`` fixes the arrays' shapes (k, blocks) and must
    always match.
    """

    def __init__(self, url: str, identity: dict[str, Any], layout: dict[str, Any], keep: int,
                 force: bool = False) -> None:
        self.fs, self.root = open_storage(url, "output.checkpoints")
        self.identity = identity
        self.layout = layout
        self.keep = keep
        self.force = force

    def _url(self, path: str) -> str:
        return self.fs.unstrip_protocol(path)

    def _epoch_dirs(self) -> list[str]:
        """Epoch directories, newest first."""
        if not self.fs.exists(self.root):
            return []
        paths = [p for p in self.fs.ls(self.root, detail=False) if _EPOCH_DIR.search(p.rstrip("/"))]
        return sorted(paths, reverse=True)

    def _sha256(self, path: str) -> str:
        digest = hashlib.sha256()
        with self.fs.open(path, "rb") as f:
            while chunk := f.read(1 << 22):
                digest.update(chunk)
        return digest.hexdigest()

    def _ours(self, path: str) -> bool:
        """Whether the epoch directory ``path`` is funkflow's to replace: it holds funkflow's mark, or nothing
        (made by a run killed before it wrote the mark)."""
        return self.fs.isfile(f"{path}/{MARK}") or not self.fs.ls(path, detail=False)

    def _remove(self, path: str) -> None:
        """Remove an epoch directory that is funkflow's (:meth:`_ours`); leave anything else."""
        if self._ours(path):
            self.fs.rm(path, recursive=True)

    def clear(self) -> None:
        """Remove this run's checkpoints (never another file that happens to be under the URL)."""
        for path in self._epoch_dirs():
            self._remove(path)

    def prepare(self, epoch: int) -> str:
        """An empty directory for epoch ``epoch``'s checkpoint, whose URL the workers write their blocks to."""
        path = f"{self.root}/epoch-{epoch:06d}"
        if self.fs.exists(path):  # left by a crash before its manifest, or superseded
            if not self._ours(path):
                raise OutputError(f"{self._url(path)}: exists and was not made by funkflow; funkflow never writes "
                                  "over what it did not make: move it away, or choose another output.checkpoints")
            self.fs.rm(path, recursive=True)
        self.fs.makedirs(path, exist_ok=True)
        # Not through put_bytes: the mark's existence is what counts, so it must not pass through a temporary name.
        self.fs.pipe_file(f"{path}/{MARK}", b"made by funkflow; it may replace or remove this directory\n")
        return self._url(path)

    def commit(self, files: dict[str, str], state: LoopState, protect: int | None = None) -> Checkpoint:
        """Finish the checkpoint of epoch ``state.epoch``, whose blocks the workers wrote (``files``: name →
        SHA-256): ``state.json``, then the manifest that makes it exist. Keep the newest ``keep`` and epoch
        ``protect``."""
        epoch = state.epoch
        path = f"{self.root}/epoch-{epoch:06d}"
        state_bytes = json.dumps(state.as_json(), indent=2, sort_keys=True).encode()
        put_bytes(self.fs, f"{path}/{STATE}", state_bytes)
        files = {**files, STATE: hashlib.sha256(state_bytes).hexdigest()}
        manifest = {"epoch": epoch, "identity": self.identity, "layout": self.layout, "files": files}
        put_bytes(self.fs, f"{path}/{MANIFEST}", json.dumps(manifest, indent=2, sort_keys=True).encode())
        for old in self._epoch_dirs()[self.keep:]:
            if protect is None or not old.rstrip("/").endswith(f"epoch-{protect:06d}"):
                self._remove(old)
        return Checkpoint(self._url(path), state)

    def _verified(self, path: str, strict: bool = True) -> Checkpoint | None:
        url = self._url(path)
        try:
            manifest = json.loads(self.fs.cat_file(f"{path}/{MANIFEST}"))
        except FileNotFoundError:
            log.warning("skipping checkpoint %s: no manifest (it was not finished)", url)
            return None
        except ValueError as exc:
            log.warning("skipping checkpoint %s: unreadable manifest (%s)", url, exc)
            return None
        try:
            for name, digest in manifest["files"].items():
                if not self.fs.isfile(f"{path}/{name}") or self._sha256(f"{path}/{name}") != digest:
                    log.warning("skipping checkpoint %s: %s is missing or fails its checksum", url, name)
                    return None
            saved_identity, saved_layout = manifest["identity"], manifest["layout"]
            state = LoopState.from_json(json.loads(self.fs.cat_file(f"{path}/{STATE}")))
            if state.epoch != int(manifest["epoch"]):
                raise ValueError(f"{STATE} is of epoch {state.epoch}, the manifest of {manifest['epoch']}")
        except (KeyError, AttributeError, TypeError, ValueError) as exc:
            log.warning("skipping checkpoint %s: malformed manifest or state (%r)", url, exc)
            return None
        layout = differences(saved_layout, self.layout, "checkpoint has")
        changed = differences(saved_identity, self.identity, "checkpoint has")
        if not strict and (layout or changed):
            log.info("checkpoint %s belongs to another run configuration; not resuming from it", url)
            return None
        if layout:
            raise ConfigError(f"cannot resume from {url}: its arrays have another shape:\n  " + "\n  ".join(layout)
                              + "\nrun without --resume to start afresh")
        if changed and not self.force:
            raise ConfigError(f"cannot resume from {url}: the run has changed since it was written:\n  "
                              + "\n  ".join(changed)
                              + "\nrun without --resume to start afresh, or add --force to resume anyway")
        if changed:
            log.warning("--force: resuming from %s despite:\n  %s", url, "\n  ".join(changed))
        return Checkpoint(url, state)

    def latest(self, max_epoch: int | None = None, strict: bool = True) -> Checkpoint | None:
        """The newest checkpoint that verifies (up to ``max_epoch``), or None.

        ``strict``: a checkpoint of another configuration is an error (``--resume``);
        otherwise it is passed over.
        """
        for path in self._epoch_dirs():
            found = _EPOCH_DIR.search(path.rstrip("/"))
            if max_epoch is not None and found is not None and int(found[1]) > max_epoch:
                continue
            checkpoint = self._verified(path, strict)
            if checkpoint is not None:
                return checkpoint
        return None

    def at(self, epoch: int) -> Checkpoint:
        checkpoint = self._verified(f"{self.root}/epoch-{epoch:06d}")
        if checkpoint is None:
            raise ConfigError(f"the checkpoint of epoch {epoch} in {self._url(self.root)} is gone or damaged; "
                              "run without --resume to start afresh")
        return checkpoint
