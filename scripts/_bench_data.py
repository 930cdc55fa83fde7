"""Shared set-up of the benchmarks: a synthetic dataset and its blocks, made once and cached."""

from __future__ import annotations

import logging
from pathlib import Path

from funkflow.pipeline.core.cluster import open_executor
from funkflow.pipeline.core.config import ClusterConfig, SplitConfig
from funkflow.pipeline.data.blocking import Blocks, block_dataset, open_blocks
from funkflow.pipeline.data.dataset import Dataset, generate_dataset, open_dataset
from funkflow.tasks.synthetic import SyntheticSpec

log = logging.getLogger("bench")


def dataset_at(scale: float, cache: Path, seed: int = 0, shape: tuple[int, int, int] | None = None) -> Dataset:
    """The Netflix-shaped dataset at ``scale`` (or of ``shape``: users, items, ratings, with Netflix's heavy
    tails), generated on a LocalCluster unless cached."""
    overrides = {} if shape is None else dict(zip(("n_users", "n_items", "n_ratings"), shape))
    name = f"scale-{scale:g}" if shape is None else "shape-" + "x".join(map(str, shape))
    root = cache / f"{name}-seed-{seed}"
    if not (root / "dataset.json").exists():
        log.info("generating %s into %s", name, root)
        spec = SyntheticSpec.netflix_shaped(scale, seed=seed, **overrides)
        with open_executor(ClusterConfig(), spec.n_ratings) as executor:  # small data: in this process
            generate_dataset(executor, spec, root, 2_000_000)
    return open_dataset(root)


def blocks_of(dataset: Dataset, d: int, cache: Path, seed: int = 0) -> Blocks:
    root = cache / f"{dataset.root.name}-blocks-d{d}"
    if not (root / "blocks.json").exists():
        with open_executor(ClusterConfig(), dataset.n_ratings) as executor:
            block_dataset(executor, dataset, root, d, SplitConfig(), seed)
    return open_blocks(root)
