"""A model directory's factor blocks, as worker tasks read them.

A model holds its factors as the checkpoints do: one ``user-RRRR`` pair of .npy
files (factors and biases) per row block and one ``item-CCCC`` pair per column
block (:func:`funkflow.tasks.checkpoint_io.write_factor_state`), written by the
workers that hold the blocks, so no process ever gathers a whole side. A block's
rows are its members in increasing index order under the layout ``model.json``
records (``"blocks": {"d", "seed"}``, see :func:`funkflow.tasks.hashing.block_layout`).
The driver verified the checksums before it submitted the task; a worker checks
each array's shape and dtype against the manifest and never reads a pickle.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import numpy as np

from funkflow.tasks.artifacts import MANIFEST, MODEL_JSON, ArtifactError, load_array, refuse_non_finite
from funkflow.tasks.checkpoint_io import FACTOR_PARTS
from funkflow.tasks.hashing import SALT_COLUMNS, SALT_ROWS, block_layout
from funkflow.tasks.training import FactorState, init_factors

Side = Literal["user", "item"]
LAYOUT = "blocks"  # the model.json key of the block layout: {"d": d, "seed": seed}
SALTS = {"user": SALT_ROWS, "item": SALT_COLUMNS}


def block_stem(side: Side, block: int) -> str:
    return f"{side}-{block:04d}"


def block_file_names(d: int) -> list[str]:
    """Every factor-block file of a model with ``d`` blocks a side."""
    return [f"{block_stem(side, b)}.{part}.npy" for side in ("user", "item") for b in range(d) for part in FACTOR_PARTS]


def model_layout(model_dir: str | Path) -> tuple[int, int]:
    """``(d, seed)`` of a model directory's blocks."""
    layout = json.loads((Path(model_dir) / MODEL_JSON).read_text(encoding="utf-8"))[LAYOUT]
    return int(layout["d"]), int(layout["seed"])


def _manifest_files(model_dir: str | Path) -> dict[str, Any]:
    try:
        return json.loads((Path(model_dir) / MANIFEST).read_text(encoding="utf-8"))["files"]
    except (OSError, ValueError, KeyError) as exc:
        raise ArtifactError(f"{Path(model_dir) / MANIFEST}: unreadable ({exc})") from None


def read_model_block(model_dir: str | Path, side: Side, block: int, mmap: bool = False,
                     whole: bool = True) -> FactorState:
    """One row block's (``side="user"``) or column block's (``"item"``) factors and biases, refused if they
    hold NaN or inf. ``whole=False``: the caller uses a few rows of it and checks those itself."""
    files = _manifest_files(model_dir)
    stem = block_stem(side, block)
    factors, bias = (load_array(model_dir, f"{stem}.{part}.npy", files, mmap) for part in FACTOR_PARTS)
    if whole:
        for part, values in zip(FACTOR_PARTS, (factors, bias)):
            refuse_non_finite(values, f"{Path(model_dir) / stem}.{part}.npy")
    return factors, bias


def read_model_rows(model_dir: str | Path, side: Side, n: int, rows: np.ndarray) -> FactorState:
    """The factors and biases of the users (or items) with global indices ``rows`` in a model of ``n`` of them,
    whatever its block layout: each of its blocks that holds one is read (memory-mapped) for those rows only."""
    d, seed = model_layout(model_dir)
    block_of, local_of, _ = block_layout(n, d, seed, SALTS[side])
    k = json.loads((Path(model_dir) / MODEL_JSON).read_text(encoding="utf-8"))["k"]
    factors = np.empty((rows.shape[0], k), dtype=np.float32)
    bias = np.empty(rows.shape[0], dtype=np.float32)
    blocks = block_of[rows]
    for block in np.unique(blocks):
        wanted = np.flatnonzero(blocks == block)
        block_factors, block_bias = read_model_block(model_dir, side, int(block), mmap=True, whole=False)
        factors[wanted] = block_factors[local_of[rows[wanted]]]
        bias[wanted] = block_bias[local_of[rows[wanted]]]
    stem = f"{Path(model_dir)}/{side}-*"
    refuse_non_finite(factors, f"{stem}.factors.npy")
    refuse_non_finite(bias, f"{stem}.bias.npy")
    return factors, bias


def warm_factors(n: int, k: int, init_std: float, seed: int, model_dir: str, side: Side, n_previous: int,
                 previous: np.ndarray) -> FactorState:
    """Initial state of one block from a previous model of ``n_previous`` users (or items): row j takes that
    model's row ``previous[j]`` (factors and bias), or, where ``previous[j]`` is -1 (new since), the seeded
    ``N(0, init_std²)`` start."""
    factors, bias = init_factors(n, k, init_std, seed)
    known = previous >= 0
    if known.any():
        factors[known], bias[known] = read_model_rows(model_dir, side, n_previous, previous[known])
    return factors, bias


def export_block(model_dir: str, side: Side, block: int, out_dir: str) -> int:
    """Write one block of a model as a Parquet part ``out_dir/part-BBBB.parquet``: the members' raw ``id``,
    ``bias`` and ``factors`` (a fixed-size list of k float32). Returns its rows."""
    import pyarrow as pa

    from funkflow.tasks.idmap import read_ids
    from funkflow.tasks.io import write_parquet

    d, seed = model_layout(model_dir)
    ids = read_ids(str(Path(model_dir) / f"{side}s.parquet"))
    members = block_layout(len(ids), d, seed, SALTS[side])[2][block]
    factors, bias = read_model_block(model_dir, side, block)
    lists = pa.FixedSizeListArray.from_arrays(pa.array(factors.reshape(-1), pa.float32()), factors.shape[1])
    write_parquet(pa.table({"id": ids.take(pa.array(members)), "bias": pa.array(bias, pa.float32()),
                            "factors": lists}), Path(out_dir) / f"part-{block:04d}.parquet")
    return int(members.shape[0])
