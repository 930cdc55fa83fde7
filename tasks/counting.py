"""Counting sorts: where each row goes when rows are laid out by a small integer key.

Scattering the columns to these places reads each column once and writes to as many sequential streams as
there are keys; gathering a group of rows at a time through a sorted order reads every column once per group
on unsorted rows, and numpy's stable argsort of small keys is slower than both.
"""

from __future__ import annotations

import numba
import numpy as np

from funkflow.tasks.hashing import MIX_M1, MIX_M2


@numba.jit(nopython=True, nogil=True, cache=True)
def mix64_one(x: np.uint64) -> np.uint64:
    """:func:`funkflow.tasks.hashing.mix64` of one value, for compiled loops."""
    x = (x ^ (x >> np.uint64(30))) * MIX_M1
    x = (x ^ (x >> np.uint64(27))) * MIX_M2
    return x ^ (x >> np.uint64(31))


@numba.jit(nopython=True, nogil=True, cache=True)
def hashed_keys(n: int, key: np.uint64, n_keys: int) -> np.ndarray:
    """``mix64(i ^ key) % n_keys`` for ``i`` in ``0..n-1``, int32, in one pass: for 2M items numpy's
    temporaries had taken 64 MB on every worker."""
    out = np.empty(n, dtype=np.int32)
    for i in range(n):
        out[i] = np.int32(mix64_one(np.uint64(i) ^ key) % np.uint64(n_keys))
    return out


@numba.jit(nopython=True, nogil=True, cache=True)
def places_by_key(keys: np.ndarray, n_keys: int) -> tuple[np.ndarray, np.ndarray]:
    """Where each row goes when rows are laid out by ``keys`` (``0 <= key < n_keys``), in row order within a
    key, and where each key's rows begin (``n_keys + 1`` bounds)."""
    bounds = np.zeros(n_keys + 1, dtype=np.int64)
    for r in range(keys.shape[0]):
        bounds[keys[r] + 1] += 1
    for k in range(n_keys):
        bounds[k + 1] += bounds[k]
    next_free = bounds[:-1].copy()
    destination = np.empty(keys.shape[0], dtype=np.int64)
    for r in range(keys.shape[0]):
        destination[r] = next_free[keys[r]]
        next_free[keys[r]] += 1
    return destination, bounds


def placed(values: np.ndarray, destination: np.ndarray) -> np.ndarray:
    """``values`` moved to ``destination`` (from :func:`places_by_key`)."""
    out = np.empty_like(values)
    out[destination] = values
    return out
