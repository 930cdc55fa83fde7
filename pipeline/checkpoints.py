"""Checkpoints between epochs: written whole or not at all, verified before use.

``checkpoints/epoch-NNNNNN/`` holds one ``user-RRRR`` factor block per row block
(written by the worker that owns it), one ``item-CCCC`` block per column block,
``state.json`` (epoch, step size, history, early-stopping state) and, last,
``manifest.json`` with the SHA-256 of every file and the config it belongs to.
The directory is built under a temporary name and renamed into place; a
checkpoint without a manifest, or whose checksums fail, does not exist.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.cluster import Executor
from pipeline.errors import ConfigError
from pipeline.rundir import swap_in, temporary_dir
from tasks.checkpoint_io import read_factor_state, write_factor_state
from tasks.io import file_sha256, read_json, write_json

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
STATE = "state.json"


def _differences(saved: Any, current: Any, prefix: str = "") -> list[str]:
    if isinstance(saved, dict) and isinstance(current, dict):
        return [d for key in sorted(set(saved) | set(current))
                for d in _differences(saved.get(key), current.get(key), f"{prefix}{key}.")]
    return [] if saved == current else [f"{prefix.rstrip('.')}: checkpoint has {saved!r}, config has {current!r}"]


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    epoch: int
    state: dict[str, Any]


class CheckpointStore:
    """The checkpoints of one training run.

    ``identity`` is what a checkpoint must match to be resumed from: the config
    sections and data fingerprint that determine the factors (not the epoch
    count, so a finished run can be extended).
    """

    def __init__(self, root: Path, identity: dict[str, Any], keep: int) -> None:
        self.root = root
        self.identity = identity
        self.keep = keep

    def _dirs(self) -> list[Path]:
        return sorted(self.root.glob("epoch-[0-9]*"), reverse=True) if self.root.exists() else []

    def clear(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    def write(self, executor: Executor, owners: list[str | None], epoch: int, user_states: list[Any],
              item_states: list[Any], state: dict[str, Any], protect: int | None = None) -> Checkpoint:
        """Write epoch ``epoch``'s checkpoint; keep the newest ``keep`` and epoch ``protect``."""
        self.root.mkdir(parents=True, exist_ok=True)
        final = self.root / f"epoch-{epoch:06d}"
        tmp = temporary_dir(final)
        try:
            futures = [executor.submit(write_factor_state, s, str(tmp), f"user-{r:04d}", name="write_user_block",
                                       worker=owners[r]) for r, s in enumerate(user_states)]
            futures += [executor.submit(write_factor_state, s, str(tmp), f"item-{c:04d}", name="write_item_block")
                        for c, s in enumerate(item_states)]
            files: dict[str, str] = {}
            for sums in executor.gather(futures):
                files.update(sums)
            write_json({**state, "epoch": epoch}, tmp / STATE)
            files[STATE] = file_sha256(tmp / STATE)
            write_json({"epoch": epoch, "identity": self.identity, "files": files}, tmp / MANIFEST)
            swap_in(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        for old in self._dirs()[self.keep:]:
            if protect is None or old.name != f"epoch-{protect:06d}":
                shutil.rmtree(old)
        return Checkpoint(final, epoch, {**state, "epoch": epoch})

    def _verified(self, path: Path) -> Checkpoint | None:
        manifest_path = path / MANIFEST
        if not manifest_path.is_file():
            log.warning("skipping checkpoint %s: no manifest (it was not finished)", path)
            return None
        try:
            manifest = read_json(manifest_path)
            for name, digest in manifest["files"].items():
                if not (path / name).is_file() or file_sha256(path / name) != digest:
                    log.warning("skipping checkpoint %s: %s is missing or fails its checksum", path, name)
                    return None
        except (ValueError, KeyError) as exc:
            log.warning("skipping checkpoint %s: unreadable manifest (%s)", path, exc)
            return None
        differences = _differences(manifest["identity"], self.identity)
        if differences:
            raise ConfigError(f"cannot resume from {path}: the run has changed since it was written:\n  "
                              + "\n  ".join(differences) + "\nrun without --resume to start afresh")
        return Checkpoint(path, int(manifest["epoch"]), read_json(path / STATE))

    def latest(self) -> Checkpoint | None:
        """The newest checkpoint that verifies, or None."""
        for path in self._dirs():
            checkpoint = self._verified(path)
            if checkpoint is not None:
                return checkpoint
        return None

    def at(self, epoch: int) -> Checkpoint:
        checkpoint = self._verified(self.root / f"epoch-{epoch:06d}")
        if checkpoint is None:
            raise ConfigError(f"the checkpoint of epoch {epoch} in {self.root} is gone or damaged; "
                              "run without --resume to start afresh")
        return checkpoint

    @staticmethod
    def load(executor: Executor, owners: list[str | None], checkpoint: Checkpoint,
             d: int) -> tuple[list[Any], list[Any]]:
        """Futures of the checkpoint's user and item states, each read on the worker that owns it."""
        where = str(checkpoint.path)
        users = [executor.submit(read_factor_state, where, f"user-{r:04d}", name="read_user_block", worker=owners[r])
                 for r in range(d)]
        items = [executor.submit(read_factor_state, where, f"item-{c:04d}", name="read_item_block", worker=owners[c])
                 for c in range(d)]
        return users, items
