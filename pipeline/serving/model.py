"""The ``model/`` directory: trained factors as .npy, id maps as Parquet, ``model.json``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from funkflow.pipeline.running.errors import DataError
from funkflow.pipeline.running.rundir import built_in_place
from funkflow.tasks.artifacts import MODEL, MODEL_JSON, ArtifactError, load_array, verify, write_manifest
from funkflow.tasks.idmap import read_ids, write_ids
from funkflow.tasks.io import read_json, write_json, write_npy, write_parquet


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



ARRAYS = {"P": "P.npy", "Q": "Q.npy", "user_bias": "user_bias.npy", "item_bias": "item_bias.npy"}
# What the model's folded-in users rated (user and item index pairs, sorted): there are no training blocks for
# them, and recommend must leave those items out.
FOLDED_RATINGS = "folded_ratings.parquet"


def write_model(out: Path, factors: Factors, info: dict[str, Any], user_ids: pa.Array, item_ids: pa.Array,
                folded_ratings: tuple[np.ndarray, np.ndarray] | None = None) -> None:
    """Write the model directory whole, or not at all.

    ``info`` (k, config, epochs, ...) goes into ``model.json``; ``users.parquet``
    and ``items.parquet`` map row index to raw id (sorted, as in the dataset),
    so the model answers in raw ids on its own. ``folded_ratings``: the (user,
    item) index pairs its folded-in users rated, sorted.
    """
    for name in ARRAYS:
        if not np.isfinite(getattr(factors, name)).all():
            raise ValueError(f"refusing to write non-finite {name} to {out}")
    with built_in_place(out) as tmp:
        for name, filename in ARRAYS.items():
            write_npy(getattr(factors, name), tmp / filename)
        for name, ids in (("users", user_ids), ("items", item_ids)):
            write_ids(ids, tmp / f"{name}.parquet")
        write_json({"global_mean": factors.global_mean, **info}, tmp / MODEL_JSON)
        extra = []
        if folded_ratings is not None:
            users, items = folded_ratings
            write_parquet(pa.table({"user": pa.array(users, pa.int64()), "item": pa.array(items, pa.int64())}),
                          tmp / FOLDED_RATINGS)
            extra.append(FOLDED_RATINGS)
        write_manifest(tmp, MODEL, [*ARRAYS.values(), "users.parquet", "items.parquet", MODEL_JSON, *extra])


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
    """Load a verified model directory (no pickle): the arrays agree with the manifest, with ``model.json``'s
    k and with the id maps' lengths, or a :class:`DataError` names the file."""
    files = verify_model(path)
    info = read_json(path / MODEL_JSON)
    try:
        arrays = {name: load_array(path, filename, files) for name, filename in ARRAYS.items()}
    except ArtifactError as exc:
        raise DataError(str(exc)) from None
    n_users, n_items = (pq.read_metadata(path / f"{side}.parquet").num_rows for side in ("users", "items"))
    expected = {"P": (n_users, info["k"]), "Q": (n_items, info["k"]), "user_bias": (n_users,),
                "item_bias": (n_items,)}
    for name, shape in expected.items():
        if arrays[name].shape != shape:
            raise DataError(f"{path / ARRAYS[name]}: shape {arrays[name].shape}, but model.json and the id maps "
                            f"make it {shape}")
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


def export_model(model_dir: Path, out: Path) -> dict[str, Any]:
    """The model as two Parquet tables for other systems: ``users.parquet`` and ``items.parquet`` with the
    raw ``id``, its ``bias`` and its ``factors`` (a fixed-size list of k float32), plus ``model.json``.
    Written whole or not at all."""
    factors, info = read_model(model_dir)
    with built_in_place(out) as tmp:
        for name, vectors, bias in (("users", factors.P, factors.user_bias), ("items", factors.Q, factors.item_bias)):
            ids = pq.read_table(model_dir / f"{name}.parquet", columns=["id"])["id"]
            k = vectors.shape[1]
            lists = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1), pa.float32()), k)
            write_parquet(pa.table({"id": ids, "bias": pa.array(bias, pa.float32()), "factors": lists}),
                          tmp / f"{name}.parquet")
        write_json({"global_mean": factors.global_mean, **info}, tmp / MODEL_JSON)
    return {"users": int(factors.P.shape[0]), "items": int(factors.Q.shape[0])}
