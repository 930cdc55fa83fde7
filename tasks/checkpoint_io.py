"""Worker side of checkpoints: one factor block as .npy at any fsspec URL (never pickle).

Checkpoints may live on object storage (``s3://``, ``gs://``) where there is
no rename; a file is written whole (:func:`funkflow.tasks.io.put_bytes`), and the
checkpoint's manifest, written last by the driver, is what makes it exist.
"""

from __future__ import annotations

import hashlib
import io

import fsspec
import numpy as np

from funkflow.tasks.io import npy_bytes, put_bytes
from funkflow.tasks.training import FactorState

FACTOR_PARTS = ("factors", "bias")


def write_factor_state(state: FactorState, directory: str, stem: str) -> dict[str, str]:
    """Write ``(factors, bias)`` as ``{stem}.factors.npy`` and ``{stem}.bias.npy`` under the URL ``directory``.

    Returns
    -------
    dict
        File name → SHA-256 of the bytes written, for the manifest.
    """
    fs, root = fsspec.core.url_to_fs(directory)
    sums = {}
    for part, array in zip(FACTOR_PARTS, state):
        name = f"{stem}.{part}.npy"
        data = npy_bytes(array)
        put_bytes(fs, f"{root}/{name}", data)
        sums[name] = hashlib.sha256(data).hexdigest()
    return sums


def read_factor_state(directory: str, stem: str) -> FactorState:
    """Read a factor block written by :func:`write_factor_state`."""
    fs, root = fsspec.core.url_to_fs(directory)
    parts = (np.load(io.BytesIO(fs.cat_file(f"{root}/{stem}.{part}.npy")), allow_pickle=False) for part in FACTOR_PARTS)
    return tuple(parts)  # type: ignore[return-value]
