"""Id maps: the sorted raw ids of a dataset's users (or items), whose positions are their dense indices.

Integers when every raw id is one, else strings; ``users.parquet`` and ``items.parquet`` hold them. Every
stage that meets raw ids (ingest, predict, recommend, fold-in, warm starts, the API) goes through here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from funkflow.tasks import parse
from funkflow.tasks.io import write_parquet


def sorted_distinct(values: np.ndarray) -> np.ndarray:
    """``np.unique(values)`` of a 1-D array by a sort and a mask: numpy 2.4's ``np.unique`` takes many times
    as long on large int64 arrays."""
    ordered = np.sort(values)
    if ordered.shape[0] < 2:
        return ordered
    first = np.empty(ordered.shape[0], dtype=bool)
    first[0] = True
    np.not_equal(ordered[1:], ordered[:-1], out=first[1:])
    return ordered[first]


def _dense(low: int, high: int, n: int) -> bool:
    """Whether ``n`` distinct integer ids from ``low`` to ``high`` are dense enough for a direct table (a slot
    per value in the range): a store or lookup each, where hashing or a binary search over ids in random order
    costs a cache miss each."""
    return high - low < 4 * n + (1 << 16)


def _as_strings(ids: pa.Array) -> pa.Array:
    return ids if pa.types.is_large_string(ids.type) else pc.cast(ids, pa.large_string())


def distinct_ids(arrays: list[Any]) -> pa.Array:
    """The distinct ids of ``arrays`` (int64, or strings when any array holds strings), in no set order."""
    arrays = [a for a in arrays if a is not None and len(a)]
    if not arrays:
        return pa.array([], type=pa.int64())
    if any(not pa.types.is_integer(a.type) for a in arrays):
        return pc.unique(pa.concat_arrays([_as_strings(a) for a in arrays]))
    values = np.concatenate([pc.cast(a, pa.int64()).to_numpy(zero_copy_only=False) for a in arrays])
    low, high = int(values.min()), int(values.max())
    if _dense(low, high, values.shape[0]):
        present = np.zeros(high - low + 1, dtype=bool)
        present[values - low] = True
        return pa.array(np.flatnonzero(present) + low, type=pa.int64())
    return pc.unique(pa.array(values))


def merge_ids(*arrays: pa.Array) -> pa.Array:
    """Distinct ids of several chunks (a node of the merge tree)."""
    return distinct_ids(list(arrays))


def sorted_ids(ids: pa.Array, as_int: bool) -> pa.Array:
    """The final id map: distinct ids in sorted order (numeric when ``as_int``), index = position."""
    if as_int:
        values = sorted_distinct(pc.cast(ids, pa.int64()).to_numpy(zero_copy_only=False))
        return pa.array(values, type=pa.int64())
    ids = _as_strings(ids)
    return pc.take(ids, pc.sort_indices(ids))


def index_of(values: pa.Array, ids: pa.Array) -> np.ndarray:
    """Position of each raw id in the sorted id map ``ids``, int64, or -1 when the map lacks it.

    Integer maps match integer-looking strings by value; string maps match
    integers by their decimal text.
    """
    if pa.types.is_integer(ids.type):
        if pa.types.is_integer(values.type):
            good = np.ones(len(values), dtype=bool)
            wanted = pc.cast(values, pa.int64()).to_numpy(zero_copy_only=False)
        else:
            digits, overflow = parse.int_like(values)
            good = digits & ~overflow
            wanted = np.full(len(values), -1, dtype=np.int64)
            wanted[good] = pc.cast(pc.filter(values, pa.array(good)), pa.int64()).to_numpy()
        sorted_ids = ids.to_numpy()
        if sorted_ids.shape[0] == 0:
            return np.full(len(values), -1, dtype=np.int64)
        low, high = int(sorted_ids[0]), int(sorted_ids[-1])
        if _dense(low, high, sorted_ids.shape[0]):
            table = np.full(high - low + 1, -1, dtype=np.int64)
            table[sorted_ids - low] = np.arange(sorted_ids.shape[0])
            if len(values) and good.all() and low <= wanted.min() and wanted.max() <= high:
                return table[wanted - low]  # every value in the map's range: one gather, no masks
            found = np.full(len(values), -1, dtype=np.int64)
            inside = good & (wanted >= low) & (wanted <= high)
            found[inside] = table[wanted[inside] - low]
            return found
        pos = np.minimum(np.searchsorted(sorted_ids, wanted), sorted_ids.shape[0] - 1)
        return np.where(good & (sorted_ids[pos] == wanted), pos, -1)
    found = pc.index_in(_as_strings(values), value_set=_as_strings(ids))
    return pc.fill_null(found, -1).to_numpy(zero_copy_only=False).astype(np.int64)


def write_ids(ids: pa.Array, path: str | Path) -> None:
    """Write an id map: ``index`` (int32, the dense index) and the raw ``id`` at that index."""
    write_parquet(pa.table({"index": pa.array(np.arange(len(ids), dtype=np.int32)), "id": ids}), path)


def read_ids(path: str) -> pa.Array:
    """The ``id`` column of an id map (``users.parquet`` / ``items.parquet``), in index order."""
    return pq.read_table(path, columns=["id"])["id"].combine_chunks()


def in_id_type(values: pa.Array, ids: pa.Array) -> pa.Array | None:
    """``values`` in the id map's type: raw ids read from text become integers when the map's are (None if
    one of them is not an integer); against a string map, or already integers, they stay as they are."""
    if pa.types.is_integer(ids.type) and not pa.types.is_integer(values.type):
        try:
            return pc.cast(values, ids.type)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            return None
    return values
