"""Artifacts funkflow writes and reads back, verified before use.

A directory funkflow writes whole (a model) gets ``manifest.json``, written
after every other file: each file's size and SHA-256, and for a ``.npy`` its
shape and dtype. :func:`verify` checks a directory against its manifest and
:func:`load_array` is the one way an array of such a directory is read: it
refuses a pickle, a truncated file, and a shape or dtype other than the
manifest's. A missing, damaged or foreign file raises :class:`ArtifactError`
naming the file and what is wrong; the CLI reports it as bad input (exit 65).

Checksums cost a read of every byte (about 1 s a GB here), so the driver checks
them once before the work, and worker tasks that read parts of the same files
check sizes, shapes and dtypes only.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from funkflow.tasks.io import file_sha256, write_json

MANIFEST = "manifest.json"
FORMAT = "funkflow"


class ArtifactError(ValueError):
    """A file funkflow reads back is missing, damaged or not funkflow's; the message names it."""


@dataclass(frozen=True)
class FileEntry:
    """What a manifest says of one file: its size and SHA-256, and for an array its shape and dtype."""

    size: int
    sha256: str
    shape: tuple[int, ...] | None = None
    dtype: str | None = None

    @classmethod
    def of_bytes(cls, data: bytes, array: np.ndarray | None = None) -> FileEntry:
        """The entry of ``data`` as written (the .npy bytes of ``array``, if given)."""
        return cls(len(data), hashlib.sha256(data).hexdigest(), None if array is None else tuple(array.shape),
                   None if array is None else str(array.dtype))

    @classmethod
    def of_file(cls, path: Path) -> FileEntry:
        """The entry of a file on disk, read whole for its checksum."""
        if path.name.endswith(".npy"):
            header = np.load(path, mmap_mode="r", allow_pickle=False)
            return cls(path.stat().st_size, file_sha256(path), tuple(header.shape), str(header.dtype))
        return cls(path.stat().st_size, file_sha256(path))

    def as_json(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"bytes": self.size, "sha256": self.sha256}
        if self.shape is not None:
            entry.update(shape=list(self.shape), dtype=self.dtype)
        return entry


def write_manifest(directory: Path, kind: str, files: list[str], written: dict[str, FileEntry] | None = None) -> None:
    """Describe ``files`` of ``directory`` in its manifest; call it after they are all written. ``written``:
    entries of files whose writers described them as they wrote them (worker tasks), not read again here."""
    written = written or {}
    entries = {name: (written[name] if name in written else FileEntry.of_file(directory / name)).as_json()
               for name in files}
    write_json({"format": FORMAT, "kind": kind, "files": entries}, directory / MANIFEST)


def verify(directory: str | Path, kind: str, checksums: bool = True) -> dict[str, Any]:
    """The manifest's file entries of ``directory``, once every file is there with its size (and checksum).

    Raises
    ------
    ArtifactError
        No manifest, a manifest of another kind, a file missing, truncated or
        grown, or (with ``checksums``) one whose bytes changed.
    """
    directory = Path(directory)
    try:
        manifest = json.loads((directory / MANIFEST).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ArtifactError(f"{directory}: no {MANIFEST}, so not a complete funkflow {kind} (copied half-way, "
                            f"written by something else, or by a funkflow older than manifests)") from None
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"{directory / MANIFEST}: unreadable ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or manifest.get("kind") != kind:
        raise ArtifactError(f"{directory / MANIFEST}: not the manifest of a funkflow {kind}")
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise ArtifactError(f"{directory / MANIFEST}: no file list")
    for name, entry in files.items():
        path = directory / name
        if not path.is_file():
            raise ArtifactError(f"{path}: missing (the manifest lists it)")
        size = path.stat().st_size
        if size != entry.get("bytes"):
            what = "truncated" if size < entry.get("bytes", 0) else "longer than written"
            raise ArtifactError(f"{path}: {what}: {size:,} bytes, the manifest says {entry.get('bytes'):,}")
        if checksums and file_sha256(path) != entry.get("sha256"):
            raise ArtifactError(f"{path}: checksum mismatch: its bytes changed since funkflow wrote it")
    return files


def load_array(directory: str | Path, name: str, files: dict[str, Any], mmap: bool = False) -> np.ndarray:
    """The array ``name`` of a verified directory (``files``: what :func:`verify` returned), never a pickle.

    ``mmap``: map the file instead of reading it (a task that needs a few rows).
    """
    path = Path(directory) / name
    entry = files.get(name)
    if entry is None:
        raise ArtifactError(f"{path}: not in {Path(directory) / MANIFEST}")
    try:
        array = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except ValueError as exc:
        reason = "holds a pickle, which funkflow never reads" if "pickle" in str(exc) else f"unreadable ({exc})"
        raise ArtifactError(f"{path}: {reason}") from None
    except (OSError, EOFError) as exc:
        raise ArtifactError(f"{path}: unreadable ({exc})") from None
    if list(array.shape) != entry.get("shape") or str(array.dtype) != entry.get("dtype"):
        raise ArtifactError(f"{path}: {array.dtype}{list(array.shape)}, the manifest says "
                            f"{entry.get('dtype')}{entry.get('shape')}")
    return array


def refuse_non_finite(array: np.ndarray, where: str) -> np.ndarray:
    """``array``, unless it holds NaN or inf: funkflow never writes a model or checkpoint that does, so such a
    file was damaged or made elsewhere, and using it would answer NaN or fail as a divergence."""
    if not np.isfinite(array).all():
        raise ArtifactError(f"{where}: holds non-finite values (NaN or inf); funkflow never writes them, so the "
                            "file is damaged or not funkflow's")
    return array


MODEL = "model"
MODEL_JSON = "model.json"  # a model's global mean, k, id types, rating scale and provenance
BLOCKS_JSON = "blocks.json"  # the blocks' metadata, written last by the driver


def read_model_array(model_dir: str | Path, name: str, mmap: bool = False) -> np.ndarray:
    """An array of a model directory, for a worker task: sizes, shape and dtype checked against the
    manifest (the driver checked the checksums before it submitted the task)."""
    return load_array(model_dir, name, verify(model_dir, MODEL, checksums=False), mmap)
