"""Canonical datasets: generating a synthetic one, and opening one from disk.

A canonical dataset directory holds ``ratings/part-NNNNN.parquet`` (columns
``user:int32, item:int32, rating:float32`` over dense indices, plus
``expected:float32`` for synthetic data), ``users.parquet`` / ``items.parquet``
(``index:int32`` ↔ raw ``id``) and ``dataset.json``.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from funkflow.pipeline.core.cluster import Executor
from funkflow.pipeline.core.errors import DataError
from funkflow.pipeline.core.rundir import built_in_place
from funkflow.tasks.idmap import write_ids
from funkflow.tasks.io import read_json, write_json
from funkflow.tasks.synthetic import (
    SyntheticSpec,
    chunk_bounds,
    generate_chunk,
    make_true_model,
)

log = logging.getLogger(__name__)

DATASET_JSON = "dataset.json"


@dataclass(frozen=True)
class Dataset:
    """An opened canonical dataset (metadata only; ratings stay on disk)."""

    root: Path
    meta: dict[str, Any]

    @property
    def n_users(self) -> int:
        return int(self.meta["n_users"])

    @property
    def n_items(self) -> int:
        return int(self.meta["n_items"])

    @property
    def n_ratings(self) -> int:
        return int(self.meta["n_ratings"])

    @property
    def fingerprint(self) -> str:
        return str(self.meta["fingerprint"])

    @property
    def parts(self) -> list[Path]:
        return [self.root / p["path"] for p in self.meta["parts"]]


def open_dataset(root: str | Path) -> Dataset:
    """Open a canonical dataset directory, checking that its metadata and parts are there."""
    root = Path(root)
    meta_path = root / DATASET_JSON
    if not meta_path.is_file():
        raise DataError(f"{root}: not a canonical dataset (no {DATASET_JSON}); create one with "
                        "`funkflow generate` or `funkflow ingest`")
    try:
        meta = read_json(meta_path)
        missing = [k for k in ("n_users", "n_items", "n_ratings", "parts", "fingerprint") if k not in meta]
    except ValueError as exc:
        raise DataError(f"{meta_path}: not valid JSON: {exc}") from exc
    if missing:
        raise DataError(f"{meta_path}: missing keys {', '.join(missing)}")
    dataset = Dataset(root, meta)
    absent = [str(p) for p in dataset.parts if not p.is_file()]
    if absent:
        raise DataError(f"{root}: parts listed in {DATASET_JSON} are missing: {', '.join(absent[:3])}")
    # Row counts from the Parquet footers: a part cut short or swapped for another is caught here, before
    # any task reads it, at the cost of a footer each.
    expected = [(p, int(part["n_ratings"])) for p, part in zip(dataset.parts, meta["parts"]) if "n_ratings" in part]
    expected += [(root / f"{name}.parquet", int(meta[f"n_{name}"])) for name in ("users", "items")
                 if (root / f"{name}.parquet").is_file()]
    for path, rows in expected:
        try:
            found = pq.read_metadata(path).num_rows
        except (OSError, pa.ArrowInvalid) as exc:
            raise DataError(f"{path}: not a readable Parquet file ({exc})") from None
        if found != rows:
            raise DataError(f"{path}: {found:,} rows, {meta_path} says {rows:,}")
    return dataset


def _synthetic_ids(n: int) -> pa.Array:
    # Synthetic raw ids are 1-based, like Netflix's.
    return pa.array(np.arange(1, n + 1, dtype=np.int64))


def progress_log(what: str, unit: str, every_seconds: float = 2.0) -> Callable[[int, int], None]:
    """A ``report(done, total)`` that logs progress with an ETA at most every ``every_seconds``, and at the end."""
    began = time.monotonic()
    last = -every_seconds

    def report(done: int, total: int) -> None:
        nonlocal last
        now = time.monotonic() - began
        if done == total or now - last >= every_seconds:
            last = now
            eta = now / done * (total - done) if done else 0.0
            log.info("%s: %d of %d %s (%d%%)  ETA %.0fs", what, done, total, unit, 100 * done // max(total, 1), eta)

    return report


def generate_dataset(executor: Executor, spec: SyntheticSpec, out: Path, ratings_per_part: int,
                     replace: bool = True) -> Dataset:
    """Generate synthetic ratings for ``spec`` into the canonical dataset ``out`` (``replace``: as
    :func:`funkflow.pipeline.data.ingest.ingest`).

    The true model is drawn by one task; chunks of users are generated and written
    by parallel tasks, each holding only its own chunk in memory.
    """
    with built_in_place(out, replace) as tmp:
        (tmp / "ratings").mkdir()
        model = executor.submit(make_true_model, spec, name="make_true_model")
        bounds = executor.gather([executor.submit(chunk_bounds, model, ratings_per_part, name="chunk_bounds")])[0]
        parts = [
            executor.submit(generate_chunk, spec, model, j, int(bounds[j]), int(bounds[j + 1]),
                            str(tmp / "ratings" / f"part-{j:05d}.parquet"), name="generate_chunk")
            for j in range(len(bounds) - 1)
        ]
        executor.watch(parts, progress_log("generate", "parts"))
        results = executor.gather(parts)
        del model, parts
        write_ids(_synthetic_ids(spec.n_users), tmp / "users.parquet")
        write_ids(_synthetic_ids(spec.n_items), tmp / "items.parquet")
        digest = hashlib.sha256()
        for result in results:
            digest.update(result.sha256.encode())
        meta = {
            "source": "synthetic",
            "generator": spec.as_dict(),
            "n_users": spec.n_users,
            "n_items": spec.n_items,
            "n_ratings": sum(r.n_ratings for r in results),
            "rating_scale": list(spec.rating_scale),
            "has_expected": True,
            "has_time": False,
            "user_partitioned": True,  # each part holds whole users (chunks of users)
            "parts": [r.entry() for r in results],
            "fingerprint": digest.hexdigest(),
        }
        write_json(meta, tmp / DATASET_JSON)
    log.info("generated %s ratings of %s users × %s items in %s", f"{meta['n_ratings']:,}",
             f"{spec.n_users:,}", f"{spec.n_items:,}", out)
    return Dataset(out, meta)
