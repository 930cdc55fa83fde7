"""The ``block`` stage: split the ratings and cut them into d row blocks on disk.

One task per Parquet part (on the workers) assigns each rating to its split and
row block and writes it out; the driver only adds up counts, in part order.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from funkflow.pipeline.core.cluster import Executor
from funkflow.pipeline.core.config import SplitConfig
from funkflow.pipeline.core.errors import DataError
from funkflow.pipeline.core.rundir import built_in_place
from funkflow.pipeline.data.dataset import Dataset, open_dataset
from funkflow.tasks.artifacts import BLOCKS_JSON
from funkflow.tasks.blocks import SPLIT_NAMES, TRAIN, SplitRule, split_part
from funkflow.tasks.io import read_json, write_json

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class Blocks:
    """Row-block files of a dataset, with the facts training needs."""

    root: Path
    meta: dict[str, Any]

    @property
    def d(self) -> int:
        return int(self.meta["d"])

    @property
    def seed(self) -> int:
        return int(self.meta["seed"])

    @property
    def n_users(self) -> int:
        return int(self.meta["n_users"])

    @property
    def n_items(self) -> int:
        return int(self.meta["n_items"])

    @property
    def global_mean(self) -> float:
        return float(self.meta["global_mean"])

    @property
    def counts(self) -> np.ndarray:
        """Ratings per row block and split, array of shape (d, 3), int64."""
        return np.asarray(self.meta["counts"], dtype=np.int64)

    def n_split(self, code: int) -> int:
        return int(self.counts[:, code].sum())


def open_blocks(root: Path) -> Blocks:
    return Blocks(root, read_json(root / BLOCKS_JSON))


def given_test_set(source: str | Path, dataset: Dataset) -> Dataset:
    """The canonical test set at ``source`` (``split.method: given``), checked to be indexed like ``dataset``."""
    test_set = open_dataset(source)
    if test_set.meta.get("id_maps_of") != dataset.fingerprint:
        raise DataError(f"{source}: not indexed like {dataset.root}; ingest it with "
                        f"`funkflow ingest ... --id-maps {dataset.root}`, or give the raw files as "
                        "split.test_source")
    return test_set


def block_dataset(executor: Executor, dataset: Dataset, out: Path, d: int, split: SplitConfig, seed: int,
                  test_set: Dataset | None = None) -> Blocks:
    """Split ``dataset`` and write its ``d`` row blocks to ``out``; ``test_set``: the test ratings of
    ``split.method: given``, indexed like ``dataset``."""
    if split.method == "per_user" and not dataset.meta.get("user_partitioned"):
        raise DataError(f"{dataset.root}: split.method per_user needs every user's ratings in one part, as "
                        "`funkflow ingest` and `funkflow generate` write them")
    if split.method == "time" and not dataset.meta.get("has_time"):
        raise DataError(f"{dataset.root}: split.method time needs rating times, and this dataset has none")
    rule = SplitRule(split.method, split.test_fraction, split.validation_fraction, split.seed, split.test_per_user,
                     split.validation_per_user, split.cutoff_seconds())
    parts = [(part, rule) for part in dataset.parts]
    if split.method == "given":
        if test_set is None:
            raise ValueError("split.method given needs the test set")
        parts += [(part, SplitRule("test_set")) for part in test_set.parts]
    with built_in_place(out) as tmp:
        futures = [
            executor.submit(split_part, str(part), j, str(tmp), d, dataset.n_users, part_rule, seed,
                            name="split_part")
            for j, (part, part_rule) in enumerate(parts)
        ]
        results = executor.gather(futures)
        counts = np.sum([r.counts for r in results], axis=0)
        n_train = int(counts[:, TRAIN].sum())
        if n_train == 0:
            raise DataError(f"{dataset.root}: the split leaves no training ratings")
        train_sum = 0.0
        for r in results:  # part order: the mean must not depend on task timing
            train_sum += r.train_sum
        meta = {
            "d": d,
            "seed": seed,
            "n_users": dataset.n_users,
            "n_items": dataset.n_items,
            "dataset_fingerprint": dataset.fingerprint,
            "split": split.model_dump(mode="json"),
            "counts": counts.tolist(),
            "global_mean": train_sum / n_train,
            "has_expected": bool(dataset.meta.get("has_expected", False)),
        }
        write_json(meta, tmp / BLOCKS_JSON)
    sizes = ", ".join(f"{name} {int(counts[:, code].sum()):,}" for code, name in enumerate(SPLIT_NAMES))
    log.info("blocked %s ratings into %d×%d blocks (%s)", f"{int(counts.sum()):,}", d, d, sizes)
    return Blocks(out, meta)
