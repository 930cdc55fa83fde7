"""``funkflow recommend``: top-N unseen items for every user (or some), computed on the workers.

Each row block's users are scored against all items by the worker that owns
the block, a chunk of users at a time (:mod:`funkflow.tasks.recommend`); items a user
rated in training (or validation) are excluded. The lists, in raw ids, go to
one Parquet file (``user``, ``rank``, ``item``, ``score``), written whole or not
at all.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from funkflow.pipeline.blocking import open_blocks
from funkflow.pipeline.cluster import open_executor
from funkflow.pipeline.config import ClusterConfig, load_config
from funkflow.pipeline.errors import DataError, UsageError
from funkflow.pipeline.model import read_id_maps, verify_model
from funkflow.pipeline.train import BlockPlacement
from funkflow.tasks.ingest import index_of
from funkflow.tasks.io import write_parquet
from funkflow.tasks.recommend import positions_in_runs, recommend_row

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RecommendReport:
    n_users: int
    n_rows: int
    unknown_users: int
    seconds: float
    out: Path


def _wanted_users(path: Path, user_ids: pa.Array) -> tuple[np.ndarray, int]:
    """Global indices of the raw user ids in ``path`` (Parquet ``user`` column, or the first field of each
    text line, a header line allowed), and how many the model does not know."""
    if path.suffix == ".parquet":
        table = pq.read_table(path)
        values = table["user" if "user" in table.column_names else table.column_names[0]].combine_chunks()
    else:
        fields = [line.replace("\t", ",").split(",")[0].strip() for line in path.read_text().splitlines()]
        fields = [f for f in fields if f]
        if fields and fields[0].lower() in ("user", "userid", "user_id", "customerid"):
            fields = fields[1:]
        values = pa.array(fields, pa.large_string())
    if len(values) == 0:
        raise DataError(f"{path}: no user ids")
    found = index_of(values, user_ids)
    if not (found >= 0).any():
        raise DataError(f"{path}: none of its {len(values):,} user ids is in the model; fold them in first "
                        "(funkflow fold-in), then recommend from the folded model")
    return np.unique(found[found >= 0]), int((found < 0).sum())


def recommend(run_dir: Path, top: int, out: Path, users: Path | None = None,
              cluster: ClusterConfig | None = None) -> RecommendReport:
    """Write the top-``top`` unseen items of every user of ``run_dir`` (or those in ``users``) to ``out``."""
    import time

    if top < 1:
        raise UsageError(f"--top must be at least 1, got {top}")
    if out.suffix != ".parquet":
        raise UsageError(f"--out must be a .parquet file, got {out}")
    model_dir = run_dir / "model"
    if not (model_dir / "model.json").is_file() or not (run_dir / "blocks" / "blocks.json").is_file():
        raise DataError(f"{run_dir}: no trained model and blocks; run `funkflow train` first")
    config = load_config(run_dir / "config.yaml") if (run_dir / "config.yaml").is_file() else None
    cluster = cluster or (config.cluster if config else ClusterConfig())
    blocks = open_blocks(run_dir / "blocks")
    verify_model(model_dir)
    user_ids, item_ids = read_id_maps(model_dir)
    wanted, unknown = (None, 0) if users is None else _wanted_users(users, user_ids)
    began = time.perf_counter()
    with open_executor(cluster) as executor:
        placement = BlockPlacement(executor, blocks)
        row_blocks = placement.load_row_blocks()
        futures = [executor.submit(recommend_row, row_blocks[r], str(model_dir), blocks.n_items, blocks.d,
                                   blocks.seed, top, wanted, name="recommend_row", worker=placement.owner(r))
                   for r in range(blocks.d)]
        parts = executor.gather(futures)
    seconds = time.perf_counter() - began
    table = recommendation_table(*(np.concatenate(x) for x in zip(*parts)), user_ids, item_ids)
    write_parquet(table, out)
    if unknown:
        log.warning("%s user ids in %s are not in the model; fold them in first (funkflow fold-in)",
                    f"{unknown:,}", users)
    return RecommendReport(len(pc.unique(table["user"])), table.num_rows, unknown, seconds, out)


def recommendation_table(users: np.ndarray, items: np.ndarray, scores: np.ndarray, user_ids: pa.Array,
                         item_ids: pa.Array) -> pa.Table:
    """Lists of (user, item, score) index rows, each user's best first, as ``user``, ``rank``, ``item``,
    ``score`` in raw ids, ordered by user index."""
    order = np.lexsort((np.arange(users.shape[0]), users))  # stable: each list stays best first
    users, items, scores = users[order], items[order], scores[order]
    return pa.table({"user": user_ids.take(pa.array(users)),
                     "rank": pa.array(positions_in_runs(users) + 1, pa.int32()),
                     "item": item_ids.take(pa.array(items)), "score": pa.array(scores, pa.float32())})
