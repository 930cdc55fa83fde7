"""Worker side of checkpoints: one factor block as .npy at any fsspec URL (never pickle).

Checkpoints may live on object storage (``s3://``, ``gs://``) where there is
no rename; a file is written whole (:func:`funkflow.tasks.io.put_bytes`), and the
checkpoint's manifest, written last by the driver, is what makes it exist.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterable

import fsspec
import numpy as np

from funkflow.tasks.artifacts import FileEntry, refuse_non_finite
from funkflow.tasks.io import flush_files, npy_bytes, put_bytes
from funkflow.tasks.training import FactorState

FACTOR_PARTS = ("factors", "bias")
BlockWriter = Callable[[str], dict[str, FileEntry]]
"""``write_blocks(url)``: factor blocks written under ``url`` (:func:`write_factor_state`), file name → entry."""


def write_factor_state(state: FactorState, directory: str, stem: str, durable: bool = True) -> dict[str, FileEntry]:
    """Write ``(factors, bias)`` as ``{stem}.factors.npy`` and ``{stem}.bias.npy`` under the URL ``directory``
    (``durable=False``: not yet flushed to disk; :func:`flush_factor_files` does it).

    Returns
    -------
    dict
        File name → its entry (size, SHA-256, shape, dtype), for the manifest.
    """
    fs, root = fsspec.core.url_to_fs(directory)
    entries = {}
    for part, array in zip(FACTOR_PARTS, state):
        name = f"{stem}.{part}.npy"
        data = npy_bytes(array)
        put_bytes(fs, f"{root}/{name}", data, durable)
        entries[name] = FileEntry.of_bytes(data, array)
    return entries


def flush_factor_files(directory: str, names: Iterable[str]) -> None:
    """Flush to disk the files ``names`` under the URL ``directory`` written with ``durable=False``."""
    fs, root = fsspec.core.url_to_fs(directory)
    flush_files(fs, (f"{root}/{name}" for name in names))


def read_factor_state(directory: str, stem: str) -> FactorState:
    """Read a factor block written by :func:`write_factor_state`."""
    fs, root = fsspec.core.url_to_fs(directory)
    parts = (refuse_non_finite(np.load(io.BytesIO(fs.cat_file(f"{root}/{stem}.{part}.npy")), allow_pickle=False),
                               f"{directory}/{stem}.{part}.npy") for part in FACTOR_PARTS)
    return tuple(parts)  # type: ignore[return-value]
