"""Worker side of checkpoints: write and read one factor block as .npy (never pickle)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tasks.io import file_sha256, write_npy
from tasks.training import FactorState


def write_factor_state(state: FactorState, directory: str, stem: str) -> dict[str, str]:
    """Write ``(factors, bias)`` as ``{stem}.factors.npy`` and ``{stem}.bias.npy``.

    Returns
    -------
    dict
        File name → SHA-256 of what was written, for the manifest.
    """
    sums = {}
    for suffix, array in zip(("factors", "bias"), state):
        name = f"{stem}.{suffix}.npy"
        write_npy(array, Path(directory) / name)
        sums[name] = file_sha256(Path(directory) / name)
    return sums


def read_factor_state(directory: str, stem: str) -> FactorState:
    """Read a factor block written by :func:`write_factor_state`."""
    return tuple(np.load(Path(directory) / f"{stem}.{suffix}.npy", allow_pickle=False)  # type: ignore[return-value]
                 for suffix in ("factors", "bias"))
