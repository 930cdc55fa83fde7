"""``funkflow fold-in``: add users (or items) that arrived after training, without a retrain.

Their factors and biases come from their ratings against the model's fixed
item (or user) factors in closed form (:mod:`funkflow.tasks.foldin`). The result is a
new model directory with them merged into the id maps in sorted order, which
``predict`` and the Python API use like any other.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from funkflow.pipeline.core.errors import DataError, OutputError, UsageError
from funkflow.pipeline.core.rundir import RunDir, locked
from funkflow.pipeline.data.sources import IngestOptions, rating_file_format, read_rating_rows
from funkflow.pipeline.serving.model import Factors, read_folded_ratings, read_id_maps, read_model, write_factors
from funkflow.tasks.artifacts import MODEL_JSON
from funkflow.tasks.foldin import fold_in
from funkflow.tasks.idmap import in_id_type, index_of
from funkflow.tasks.io import read_json

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FoldInReport:
    added: int
    ratings_used: int
    ratings_of_known: int
    ratings_of_unknown_other_side: int


@dataclass(frozen=True)
class FoldedModel:
    """A model with new users (or items) folded in, as :func:`funkflow.pipeline.serving.model.write_model` takes it."""

    factors: Factors
    info: dict
    user_ids: pa.Array
    item_ids: pa.Array
    folded_ratings: tuple[np.ndarray, np.ndarray] | None  # what the folded-in users rated, by index
    report: FoldInReport

    def write(self, out: Path) -> None:
        write_factors(out, self.factors, self.info, self.user_ids, self.item_ids, self.folded_ratings)


def _merged_ratings(earlier: tuple[np.ndarray, np.ndarray] | None, new: tuple[np.ndarray, np.ndarray] | None,
                    new_position: np.ndarray, side: str) -> tuple[np.ndarray, np.ndarray] | None:
    """The folded-in users' (user, item) pairs after a merge that moved old index j to ``new_position[j]`` on
    ``side``: the earlier pairs moved, the new ones added (already in merged indices), sorted and unique."""
    if earlier is not None:
        users, items = earlier
        earlier = (new_position[users], items) if side == "users" else (users, new_position[items])
    parts = [pair for pair in (earlier, new) if pair is not None]
    if not parts:
        return None
    users, items = (np.concatenate(column) for column in zip(*parts))
    pairs = np.unique(np.stack([users, items], axis=1), axis=0)
    return pairs[:, 0].copy(), pairs[:, 1].copy()


def _sorted_merge(old_ids: pa.Array, new_ids: pa.Array) -> np.ndarray:
    """Positions that put old then new ids in sorted order (ints by value, strings by text)."""
    if pa.types.is_integer(old_ids.type) and pa.types.is_integer(new_ids.type):
        both = np.concatenate([old_ids.to_numpy(), new_ids.to_numpy()])
        return np.argsort(both, kind="stable")
    both = pa.concat_arrays([pc.cast(old_ids, pa.large_string()), pc.cast(new_ids, pa.large_string())])
    return pc.sort_indices(both).to_numpy()


def fold_in_model(model_dir: Path, rows: pa.Table, side: str = "users", base_run: Path | None = None) -> FoldedModel:
    """The model of ``model_dir`` with the ``side`` entities of ``rows`` (raw ``user``, ``item``, ``rating``)
    that it does not know folded in, in sorted id order. ``base_run``: the run whose blocks hold what the
    model's trained users rated, recorded so that ``recommend`` can serve them from the folded model too."""
    if side not in ("users", "items"):
        raise UsageError(f"--side must be users or items, got {side!r}")
    factors, info = read_model(model_dir)
    model_cfg = info["config"]["model"]
    user_ids, item_ids = read_id_maps(model_dir)
    mine, other = ("user", "item") if side == "users" else ("item", "user")
    my_ids, other_ids = (user_ids, item_ids) if side == "users" else (item_ids, user_ids)
    my_values = rows[mine].combine_chunks()
    known_mine = index_of(my_values, my_ids) >= 0
    other_index = index_of(rows[other].combine_chunks(), other_ids)
    use = ~known_mine & (other_index >= 0)
    if not use.any():
        raise DataError(f"no ratings of new {side} against known {other}s to fold in")
    new_values = pc.filter(my_values, pa.array(use))
    as_ids = in_id_type(new_values, my_ids)
    new_values = new_values if as_ids is None else as_ids  # text that is not an integer stays text
    new_ids = pc.unique(new_values)
    new_ids = new_ids.take(pc.sort_indices(new_ids))
    new_index = index_of(new_values, new_ids)
    fixed_factors, fixed_bias = (factors.Q, factors.item_bias) if side == "users" else (factors.P, factors.user_bias)
    added_factors, added_bias = fold_in(new_index, other_index[use], rows["rating"].to_numpy()[use], fixed_factors,
                                        fixed_bias, factors.global_mean, model_cfg["reg"], model_cfg["bias_reg"],
                                        len(new_ids), info["use_bias"])
    if not info["use_bias"]:
        added_bias = np.zeros_like(added_bias)
    old_factors, old_bias = (factors.P, factors.user_bias) if side == "users" else (factors.Q, factors.item_bias)
    order = _sorted_merge(my_ids, new_ids)
    new_position = np.empty_like(order)
    new_position[order] = np.arange(order.shape[0])
    merged_ids = pa.concat_arrays([my_ids.cast(new_ids.type) if my_ids.type != new_ids.type else my_ids,
                                   new_ids]).take(pa.array(order))
    merged_factors = np.vstack([old_factors, added_factors])[order]
    merged_bias = np.concatenate([old_bias, added_bias])[order]
    if side == "users":
        result = Factors(merged_factors, factors.Q, merged_bias, factors.item_bias, factors.global_mean)
        user_ids = merged_ids
        rated = (new_position[len(my_ids) + new_index], other_index[use])
    else:
        result = Factors(factors.P, merged_factors, factors.user_bias, merged_bias, factors.global_mean)
        item_ids = merged_ids
        rated = None
    if "folded_from" not in info and base_run is not None and RunDir(base_run).blocks_json.is_file():
        info = {**info, "folded_from": str(base_run.resolve())}
    info = {**info, "folded_in": {**info.get("folded_in", {}), side: len(new_ids)}}
    report = FoldInReport(len(new_ids), int(use.sum()), int(known_mine.sum()),
                          int((~known_mine & (other_index < 0)).sum()))
    folded_ratings = _merged_ratings(read_folded_ratings(model_dir), rated, new_position[:len(my_ids)], side)
    return FoldedModel(result, info, user_ids, item_ids, folded_ratings, report)


def fold_in_run(run_dir: Path, ratings: str, out: Path, side: str = "users",
                rating_scale: tuple[float, float] | None = None) -> FoldInReport:
    """Fold the new ``side`` of the ratings file into the model of ``run_dir``; write ``out/model``."""
    model_dir = RunDir(run_dir).trained_model()
    folded_dir = RunDir(out).model
    info_scale = read_json(model_dir / MODEL_JSON).get("rating_scale")
    scale = rating_scale or (tuple(info_scale) if info_scale else None)
    rows = read_rating_rows(ratings, IngestOptions(format=rating_file_format(ratings), rating_scale=scale))
    folded = fold_in_model(model_dir, rows, side, base_run=run_dir)
    report = folded.report
    with locked(out):
        if folded_dir.exists():
            raise OutputError(f"{folded_dir}: exists; choose a new --out")
        folded.write(folded_dir)
    if report.ratings_of_known or report.ratings_of_unknown_other_side:
        log.warning("fold-in left out %s ratings of %s the model knows and %s against unknown %s",
                    f"{report.ratings_of_known:,}", side, f"{report.ratings_of_unknown_other_side:,}",
                    "items" if side == "users" else "users")
    return report
