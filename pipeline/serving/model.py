"""The ``model/`` directory: the factors as .npy blocks, id maps as Parquet, ``model.json``, a manifest.

The factor blocks are those a checkpoint holds (:mod:`funkflow.tasks.model_files`): after training, each
worker writes the blocks it holds, so nothing gathers a whole side. Serving on one machine (``predict``,
``fold-in``, :class:`funkflow.FunkSVD`) reads the blocks back into whole arrays (:func:`read_model`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from funkflow.pipeline.core.cluster import Executor
from funkflow.pipeline.core.errors import DataError
from funkflow.pipeline.core.rundir import built_in_place
from funkflow.tasks.artifacts import MODEL, MODEL_JSON, ArtifactError, FileEntry, verify, write_manifest
from funkflow.tasks.checkpoint_io import BlockWriter, write_factor_state
from funkflow.tasks.hashing import block_layout
from funkflow.tasks.idmap import read_ids, write_ids
from funkflow.tasks.io import read_json, write_json, write_parquet
from funkflow.tasks.model_files import (
    LAYOUT,
    SALTS,
    Side,
    block_file_names,
    block_stem,
    export_block,
    model_layout,
    read_model_block,
)


@dataclass(frozen=True)
class Factors:
    """A trained model in global index order.

    ``P`` (n_users, k) float32, ``Q`` (n_items, k) float32, ``user_bias``
    (n_users,) float32, ``item_bias`` (n_items,) float32; ``global_mean`` is 0.0
    for a k-only model.
    """

    P: np.ndarray
    Q: np.ndarray
    user_bias: np.ndarray
    item_bias: np.ndarray
    global_mean: float



# What the model's folded-in users rated (user and item index pairs, sorted): there are no training blocks for
# them, and recommend must leave those items out.
FOLDED_RATINGS = "folded_ratings.parquet"


def write_model(out: Path, info: dict[str, Any], user_ids: pa.Array, item_ids: pa.Array, write_blocks: BlockWriter,
                layout: tuple[int, int], folded_ratings: tuple[np.ndarray, np.ndarray] | None = None) -> None:
    """Write the model directory whole, or not at all.

    ``write_blocks(url)`` writes the factor blocks (the workers that hold them, after training; or
    :func:`blocks_of` a model in memory), under the block ``layout`` ``(d, seed)``. ``info`` (k, config,
    epochs, ...) goes into ``model.json`` with the layout; ``users.parquet`` and ``items.parquet`` map index
    to raw id (sorted, as in the dataset), so the model answers in raw ids on its own. ``folded_ratings``:
    the (user, item) index pairs its folded-in users rated, sorted.
    """
    with built_in_place(out) as tmp:
        written = write_blocks(str(tmp))
        d, seed = layout
        if sorted(written) != sorted(block_file_names(d)):
            raise RuntimeError(f"the factor blocks written to {tmp} are not the {d} of each side a model has")
        for name, ids in (("users", user_ids), ("items", item_ids)):
            write_ids(ids, tmp / f"{name}.parquet")
        write_json({**info, LAYOUT: {"d": d, "seed": seed}}, tmp / MODEL_JSON)
        extra = []
        if folded_ratings is not None:
            users, items = folded_ratings
            write_parquet(pa.table({"user": pa.array(users, pa.int64()), "item": pa.array(items, pa.int64())}),
                          tmp / FOLDED_RATINGS)
            extra.append(FOLDED_RATINGS)
        write_manifest(tmp, MODEL, [*sorted(written), "users.parquet", "items.parquet", MODEL_JSON, *extra], written)


def blocks_of(factors: Factors, d: int, seed: int) -> BlockWriter:
    """A :data:`BlockWriter` for a model held in memory: its rows cut into the blocks of layout ``(d, seed)``."""
    def write(url: str) -> dict[str, FileEntry]:
        written: dict[str, FileEntry] = {}
        sides: tuple[tuple[Side, np.ndarray, np.ndarray], ...] = (
            ("user", factors.P, factors.user_bias), ("item", factors.Q, factors.item_bias))
        for side, vectors, bias in sides:
            for name, values in ((f"{side} factors", vectors), (f"{side} biases", bias)):
                if not np.isfinite(values).all():
                    raise ValueError(f"refusing to write non-finite {name} to {url}")
            for block, members in enumerate(block_layout(vectors.shape[0], d, seed, SALTS[side])[2]):
                written.update(write_factor_state((np.ascontiguousarray(vectors[members]), bias[members]), url,
                                                  block_stem(side, block)))
        return written

    return write


def write_factors(out: Path, factors: Factors, info: dict[str, Any], user_ids: pa.Array, item_ids: pa.Array,
                  folded_ratings: tuple[np.ndarray, np.ndarray] | None = None) -> None:
    """:func:`write_model` of a model held in memory (a fold-in's, or :meth:`funkflow.FunkSVD.save`'s), in the
    block layout its ``info`` records."""
    d, seed = int(info[LAYOUT]["d"]), int(info[LAYOUT]["seed"])
    kept = {key: value for key, value in info.items() if key != LAYOUT}
    write_model(out, {**kept, "global_mean": factors.global_mean}, user_ids, item_ids, blocks_of(factors, d, seed),
                (d, seed), folded_ratings)


def verify_model(path: Path) -> dict[str, Any]:
    """Check a model directory against its manifest, checksums included, before any work reads it.

    Returns the manifest's file entries (for :func:`funkflow.tasks.artifacts.load_array`); a missing, damaged or
    foreign model is a :class:`DataError` naming the file.
    """
    try:
        return verify(path, MODEL)
    except ArtifactError as exc:
        raise DataError(str(exc)) from None


def read_id_maps(path: Path) -> tuple[pa.Array, pa.Array]:
    """The raw user and item ids of a model (or dataset) directory, in index order."""
    return read_ids(str(path / "users.parquet")), read_ids(str(path / "items.parquet"))


def read_model(path: Path) -> tuple[Factors, dict[str, Any]]:
    """Load a verified model directory whole (no pickle), for serving on one machine: its blocks put back in
    index order, each checked against the manifest and against ``model.json``'s k and the id maps' lengths,
    or a :class:`DataError` names the file."""
    verify_model(path)
    info = read_json(path / MODEL_JSON)
    n = {side: pq.read_metadata(path / f"{side}s.parquet").num_rows for side in ("user", "item")}
    d, seed = model_layout(path)
    arrays: dict[str, np.ndarray] = {}
    try:
        names: tuple[tuple[Side, str, str], ...] = (("user", "P", "user_bias"), ("item", "Q", "item_bias"))
        for side, factors_name, bias_name in names:
            factors = np.empty((n[side], info["k"]), dtype=np.float32)
            bias = np.empty(n[side], dtype=np.float32)
            for block, members in enumerate(block_layout(n[side], d, seed, SALTS[side])[2]):
                block_factors, block_bias = read_model_block(path, side, block)
                stem = path / block_stem(side, block)
                if block_factors.shape != (members.shape[0], info["k"]) or block_bias.shape != members.shape:
                    raise DataError(f"{stem}.factors.npy: shape {block_factors.shape}, but model.json and the id "
                                    f"maps make it {(members.shape[0], info['k'])}")
                factors[members], bias[members] = block_factors, block_bias
            arrays[factors_name], arrays[bias_name] = factors, bias
    except ArtifactError as exc:
        raise DataError(str(exc)) from None
    return Factors(global_mean=float(info["global_mean"]), **arrays), info


def read_folded_ratings(path: Path) -> tuple[np.ndarray, np.ndarray] | None:
    """The (user, item) index pairs a verified model's folded-in users rated, or None if it has none."""
    if not (path / FOLDED_RATINGS).is_file():
        return None
    table = pq.read_table(path / FOLDED_RATINGS)
    return table["user"].to_numpy(), table["item"].to_numpy()


def score_pairs(factors: Factors, users: np.ndarray, items: np.ndarray,
                rating_scale: tuple[float, float] | None = None) -> np.ndarray:
    """Predicted ratings of (user, item) index pairs, float32; an index of -1 (unknown) drops its terms,
    so an unknown user gets μ + b_i, an unknown item μ + b_u, both unknown μ. Clipped to the scale."""
    known_u, known_i = users >= 0, items >= 0
    score = np.full(users.shape[0], factors.global_mean, dtype=np.float64)
    score[known_u] += factors.user_bias[users[known_u]]
    score[known_i] += factors.item_bias[items[known_i]]
    both = known_u & known_i
    score[both] += np.einsum("nk,nk->n", factors.P[users[both]], factors.Q[items[both]], dtype=np.float64)
    if rating_scale is not None:
        score = np.clip(score, *rating_scale)
    return score.astype(np.float32)


def export_model(executor: Executor, model_dir: Path, out: Path) -> dict[str, Any]:
    """The model as Parquet for other systems: ``users.parquet/`` and ``items.parquet/``, each a directory of
    one part per block (a Parquet dataset: ``pyarrow.parquet.read_table`` and Spark read it as one table)
    with the raw ``id``, its ``bias`` and its ``factors`` (a fixed-size list of k float32), plus
    ``model.json``. Each part is written by a task from its block file: no process holds a whole side.
    Written whole or not at all."""
    verify_model(model_dir)
    info = read_json(model_dir / MODEL_JSON)
    d, _ = model_layout(model_dir)
    with built_in_place(out) as tmp:
        for name in ("users", "items"):
            (tmp / f"{name}.parquet").mkdir()
        parts = [executor.submit(export_block, str(model_dir), side, block, str(tmp / f"{side}s.parquet"),
                                 name="export_block")
                 for side in ("user", "item") for block in range(d)]
        rows = executor.gather(parts)
        write_json(info, tmp / MODEL_JSON)
    return {"users": sum(rows[:d]), "items": sum(rows[d:])}
