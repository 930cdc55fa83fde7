"""``funkflow recommend``: top-N unseen items for every user (or some), computed on the workers.

The model's column blocks pass each worker's rows once, as in training, and each
worker keeps a running top-N of its users (:mod:`funkflow.tasks.measure`): a
worker holds its users × N and the blocks in flight, never the whole catalogue.
Items a user rated in training (or validation) are excluded. Users added by ``fold-in`` have
no blocks: their ratings are kept in the folded model and they are scored on
the client. The lists, in raw ids, go to one Parquet file (``user``, ``rank``,
``item``, ``score``), written whole or not at all.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from funkflow.pipeline.core.cluster import Executor, open_executor
from funkflow.pipeline.core.config import ClusterConfig, load_config
from funkflow.pipeline.core.errors import DataError, UsageError
from funkflow.pipeline.core.rundir import RunDir
from funkflow.pipeline.data.blocking import open_blocks
from funkflow.pipeline.serving.evaluate import measure
from funkflow.pipeline.serving.model import Factors, read_folded_ratings, read_id_maps, read_model, verify_model
from funkflow.pipeline.training.placement import BlockPlacement
from funkflow.tasks.artifacts import MODEL_JSON
from funkflow.tasks.idmap import index_of, sorted_distinct
from funkflow.tasks.io import read_json, write_parquet
from funkflow.tasks.measure import MeasurePlan
from funkflow.tasks.recommend import positions_in_runs, recommend_users

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
    return sorted_distinct(found[found >= 0]), int((found < 0).sum())


def recommend(run_dir: Path, top: int, out: Path, users: Path | None = None,
              cluster: ClusterConfig | None = None) -> RecommendReport:
    """Write the top-``top`` unseen items of every user of ``run_dir``'s model (or those in ``users``) to
    ``out``. ``run_dir`` is a trained run or a ``fold-in`` output."""
    import time

    if top < 1:
        raise UsageError(f"--top must be at least 1, got {top}")
    if out.suffix != ".parquet":
        raise UsageError(f"--out must be a .parquet file, got {out}")
    model_dir = RunDir(run_dir).trained_model()
    config = load_config(run_dir / "config.yaml") if (run_dir / "config.yaml").is_file() else None
    cluster = cluster or (config.cluster if config else ClusterConfig())
    verify_model(model_dir)
    user_ids, item_ids = read_id_maps(model_dir)
    wanted, unknown = (None, 0) if users is None else _wanted_users(users, user_ids)
    began = time.perf_counter()
    # By the size rule `run` follows: small models serve in this process, where starting a LocalCluster
    # would take far longer than the work.
    run = RunDir(run_dir)
    n_ratings = int(open_blocks(run.blocks).counts.sum()) if run.blocks_json.is_file() else None
    with open_executor(cluster, n_ratings) as executor:
        lists = recommendation_lists(model_dir, wanted, top, executor)
    seconds = time.perf_counter() - began
    table = recommendation_table(lists.users, lists.items, lists.scores, user_ids, item_ids,
                                 read_json(model_dir / MODEL_JSON).get("rating_scale"))
    if table.num_rows == 0:
        raise DataError(f"{run_dir}: no recommendations for any of the {lists.unserved:,} users asked for "
                        f"({lists.why_unserved})")
    write_parquet(table, out)
    if unknown:
        log.warning("%s user ids in %s are not in the model; fold them in first (funkflow fold-in)",
                    f"{unknown:,}", users)
    if lists.unserved:
        log.warning("%s users left out: %s", f"{lists.unserved:,}", lists.why_unserved)
    return RecommendReport(len(pc.unique(table["user"])), table.num_rows, unknown, seconds, out)


@dataclass(frozen=True)
class RecommendationLists:
    """Each served user's list as index rows (per user best first) and the users that could not be served."""

    users: np.ndarray
    items: np.ndarray
    scores: np.ndarray
    unserved: int = 0
    why_unserved: str = ""


def recommendation_lists(model_dir: Path, wanted: np.ndarray | None, top: int,
                         executor: Executor) -> RecommendationLists:
    """Top-``top`` lists of the model's users (all, or the sorted indices ``wanted``), leaving out what each
    rated: trained users' ratings are in their run's blocks, scored on the workers that hold them; folded-in
    users' ratings are in the model (``folded_ratings.parquet``), scored here."""
    info = read_json(model_dir / MODEL_JSON)
    if info.get("folded_in", {}).get("items"):
        raise UsageError(f"{model_dir}: recommend cannot serve a model with folded-in items yet (what the "
                         "trained users rated is indexed by the items before the fold); retrain with the new items")
    folded = read_folded_ratings(model_dir)
    if folded is None:  # a trained model: its run's blocks hold every user's ratings
        return _from_blocks(model_dir.parent, wanted, top, executor)
    factors, _ = read_model(model_dir)
    user_ids = read_id_maps(model_dir)[0]
    everyone = np.arange(len(user_ids)) if wanted is None else wanted
    is_folded = np.isin(everyone, folded[0])
    parts = [recommend_users(everyone[is_folded], factors.P, factors.user_bias, factors.Q, factors.item_bias,
                             factors.global_mean, top, *folded)]
    trained = everyone[~is_folded]
    base = Path(info["folded_from"]) if info.get("folded_from") else None
    unserved, why = 0, ""
    if trained.shape[0] and base is not None and _same_trained_model(RunDir(base), factors):
        base_index = index_of(user_ids.take(pa.array(trained)), read_id_maps(RunDir(base).model)[0])
        lists = _from_blocks(base, np.sort(base_index), top, executor)
        # Trained users keep their factors in a fold of users, so their lists are the base run's, re-indexed.
        by_base = np.argsort(base_index)
        parts.append((trained[by_base][np.searchsorted(base_index[by_base], lists.users)], lists.items,
                      lists.scores))
    elif trained.shape[0]:
        unserved = int(trained.shape[0])
        why = (f"they were trained in {base}, whose blocks or model are gone or changed; recommend them there"
               if base is not None else "the model has no record of its training run's blocks")
    users, items, scores = (np.concatenate(column) for column in zip(*parts))
    return RecommendationLists(users, items, scores, unserved, why)


def _same_trained_model(base: RunDir, factors: Factors) -> bool:
    if not base.blocks_json.is_file() or not base.model_json.is_file():
        return False
    try:
        base_factors, _ = read_model(base.model)
    except DataError:
        return False
    return np.array_equal(base_factors.Q, factors.Q) and base_factors.global_mean == factors.global_mean


def _from_blocks(run_dir: Path, wanted: np.ndarray | None, top: int, executor: Executor) -> RecommendationLists:
    """Top-``top`` lists of a trained run's users (all, or the sorted indices ``wanted``): the model's column
    blocks pass the workers that hold the users' rating blocks once, each keeping its users' running lists."""
    run = RunDir(run_dir)
    if not run.blocks_json.is_file():
        raise DataError(f"{run_dir}: no blocks/ beside the model, so what its users rated is unknown; recommend "
                        "from the run directory that trained it")
    blocks = open_blocks(run.blocks)
    placement = BlockPlacement(executor, blocks)
    info = read_json(run.model / MODEL_JSON)
    plan = MeasurePlan(run_id=uuid.uuid4().hex, workers=tuple(executor.workers), d=blocks.d, block_seed=blocks.seed,
                       n_items=blocks.n_items, k=info["k"], global_mean=float(info["global_mean"]), errors=False,
                       top=top, users=wanted)
    measured = measure(executor, placement, placement.load_row_blocks(), run.model, plan)
    users, items, scores = (np.concatenate(column) for column in zip(*((m.users, m.items, m.scores)
                                                                       for m in measured)))
    return RecommendationLists(users, items, scores)


def recommendation_table(users: np.ndarray, items: np.ndarray, scores: np.ndarray, user_ids: pa.Array,
                         item_ids: pa.Array, rating_scale: Sequence[float] | None = None) -> pa.Table:
    """Lists of (user, item, score) index rows, each user's best first, as ``user``, ``rank``, ``item``,
    ``score`` in raw ids, ordered by user index. Scores are clipped to ``rating_scale`` as ``predict``
    clips them, after ranking (which uses the unclipped scores, so two items over the top stay ordered)."""
    order = np.lexsort((np.arange(users.shape[0]), users))  # stable: each list stays best first
    users, items, scores = users[order], items[order], scores[order]
    if rating_scale is not None:
        low, high = rating_scale
        scores = np.clip(scores, low, high)
    return pa.table({"user": user_ids.take(pa.array(users)),
                     "rank": pa.array(positions_in_runs(users) + 1, pa.int32()),
                     "item": item_ids.take(pa.array(items)), "score": pa.array(scores, pa.float32())})
