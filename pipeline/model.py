"""The ``model/`` directory: trained factors as .npy, id maps as Parquet, ``model.json``."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.rundir import swap_in, temporary_dir
from pipeline.train import Factors
from tasks.io import read_json, write_json, write_npy

ARRAYS = {"P": "P.npy", "Q": "Q.npy", "user_bias": "user_bias.npy", "item_bias": "item_bias.npy"}


def write_model(out: Path, factors: Factors, info: dict[str, Any], id_maps: Path) -> None:
    """Write the model directory whole, or not at all.

    ``info`` (k, config, epochs, ...) goes into ``model.json``; ``users.parquet``
    and ``items.parquet`` are copied from the dataset ``id_maps`` so the model
    answers in raw ids on its own.
    """
    for name in ARRAYS:
        if not np.isfinite(getattr(factors, name)).all():
            raise ValueError(f"refusing to write non-finite {name} to {out}")
    tmp = temporary_dir(out)
    try:
        for name, filename in ARRAYS.items():
            write_npy(getattr(factors, name), tmp / filename)
        for filename in ("users.parquet", "items.parquet"):
            shutil.copyfile(id_maps / filename, tmp / filename)
        write_json({"global_mean": factors.global_mean, **info}, tmp / "model.json")
        swap_in(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_model(path: Path) -> tuple[Factors, dict[str, Any]]:
    """Load a model directory (``allow_pickle=False`` throughout)."""
    info = read_json(path / "model.json")
    arrays = {name: np.load(path / filename, allow_pickle=False) for name, filename in ARRAYS.items()}
    return Factors(global_mean=float(info["global_mean"]), **arrays), info
