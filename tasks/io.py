"""Atomic file writes and checksums, shared by worker tasks and the driver.

Every artifact is written under a temporary name in its destination directory
and renamed into place, so a crash never leaves a file that looks complete.
No pickle: Parquet, npy (``allow_pickle=False``) and JSON only.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


@dataclass(frozen=True)
class WrittenPart:
    """A dataset part a task wrote: its file, its rows and their SHA-256."""

    path: str
    n_ratings: int
    sha256: str

    @classmethod
    def of(cls, path: str | os.PathLike, n_ratings: int) -> WrittenPart:
        return cls(str(path), n_ratings, file_sha256(path))

    def entry(self) -> dict[str, Any]:
        """The part as a dataset manifest lists it, relative to the dataset's root."""
        return {"path": f"ratings/{Path(self.path).name}", "n_ratings": self.n_ratings, "sha256": self.sha256}


def _temporary_sibling(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:12]}")


@contextlib.contextmanager
def naming(path: str | os.PathLike) -> Iterator[None]:
    """An ``OSError`` that names no file (a full disk's, from a write) is raised again naming ``path``."""
    try:
        yield
    except OSError as exc:
        if exc.filename is None:
            raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from exc
        raise


@contextlib.contextmanager
def _atomically(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary sibling of ``path`` to write, renamed to ``path`` if the block ends normally and removed
    otherwise (:func:`naming` ``path``)."""
    path = Path(path)
    tmp = _temporary_sibling(path)
    try:
        with naming(path):
            yield tmp
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_parquet(table: pa.Table, path: str | os.PathLike, use_dictionary: bool | list[str] = True) -> None:
    """Write ``table`` to ``path`` atomically (``use_dictionary``: as :func:`pyarrow.parquet.write_table`'s)."""
    with _atomically(path) as tmp:
        pq.write_table(table, tmp, use_dictionary=use_dictionary)


def write_arrow(table: pa.Table, path: str | os.PathLike) -> None:
    """Write ``table`` to ``path`` as an Arrow IPC file, atomically: for intermediate files that this run
    reads back once, where Parquet's encoding costs more than it saves."""
    with _atomically(path) as tmp, pa.ipc.new_file(tmp, table.schema) as writer:
        writer.write_table(table)


def read_arrow(path: str | os.PathLike) -> pa.Table:
    """An Arrow IPC file written by :func:`write_arrow` (or an IPC file writer), memory-mapped: no copy of a
    file that the page cache still holds. Removing the file
    while the table lives is safe on POSIX systems: the mapping keeps its pages."""
    return pa.ipc.open_file(pa.memory_map(str(path))).read_all()


def npy_bytes(array: np.ndarray) -> bytes:
    """``array`` serialised as .npy; an object array (which would need pickle) is refused."""
    if array.dtype.hasobject:
        raise TypeError("refusing to serialise an object array: it would need pickle")
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def write_bytes(data: bytes, path: str | os.PathLike, durable: bool = True) -> None:
    """Write ``data`` to ``path`` atomically; ``durable``: flushed to disk before the rename (else the caller
    makes it durable later, :func:`flush_files`)."""
    with _atomically(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
        if durable:
            f.flush()
            os.fsync(f.fileno())


def _local(fs: Any) -> bool:
    return "file" in fs.protocol or "local" in fs.protocol


def put_bytes(fs: Any, path: str, data: bytes, durable: bool = True) -> None:
    """Write ``data`` to ``path`` of the fsspec filesystem ``fs`` so that no reader sees it half-written: on a
    local disk under a temporary name, then renamed (:func:`write_bytes`, ``durable`` as there); an object
    store's put is whole."""
    if _local(fs):
        write_bytes(data, path, durable)
    else:
        fs.pipe_file(path, data)


def flush_files(fs: Any, paths: Iterable[str]) -> None:
    """Make files written with ``durable=False`` durable: fsync each (on a local disk; an object store's put
    already is). A writer that others wait on writes everything first and flushes afterwards."""
    if not _local(fs):
        return
    for path in paths:
        with naming(path):
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def write_npy(array: np.ndarray, path: str | os.PathLike) -> None:
    """Write ``array`` to ``path`` as .npy atomically."""
    write_bytes(npy_bytes(array), path)


def write_text(text: str, path: str | os.PathLike) -> None:
    """Write ``text`` to ``path`` as UTF-8, atomically."""
    write_bytes(text.encode("utf-8"), path)


def write_json(obj: Any, path: str | os.PathLike) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", path)


def update_text(text: str, path: str | os.PathLike) -> None:
    """:func:`write_text`, unless ``path`` already holds ``text``: an up-to-date re-run touches nothing."""
    path = Path(path)
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        write_text(text, path)


def restore_text(text: str, path: str | os.PathLike) -> None:
    """Put ``text`` back at ``path``: atomically where the disk has room, else over the file in place (on a
    full disk, the space of the text being replaced is what there is)."""
    try:
        write_text(text, path)
    except OSError:
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)


def read_json(path: str | os.PathLike) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def file_sha256(path: str | os.PathLike, chunk_bytes: int = 1 << 22) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()
