"""funkflow and LIBMF timed on the same data, k, epochs and threads: the helpers of ``bench_peers.py``.

LIBMF (Chin, Zhuang, Juan, Lin: the FPSGD reference in C++) is used through PyPI's ``libmf`` binding, or
through the shared object named by ``LIBMF_OBJ`` (bench_peers builds one with LIBMF's own AVX flags); its
per-iteration time is ``(T(1 + N) - T(1)) / N`` over whole ``fit`` calls, so its set-up is left out. LIBMF is
timed with ``quiet`` (no per-iteration loss); funkflow's epoch time includes its train and validation RMSE
pass, without checkpoints (LIBMF has none). Both train on the same hash split and are scored on the same
test ratings.
"""

from __future__ import annotations

import json
import shutil
import statistics
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from funkflow.pipeline.app.stages import run_pipeline
from funkflow.pipeline.core.config import SplitConfig, load_config
from funkflow.tasks.blocks import TEST, TRAIN, split_codes


def split_arrays(dataset) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) as float32 arrays of shape (n, 3): user, item, rating (LIBMF's input)."""
    split = SplitConfig()
    train, test = [], []
    for part in dataset.parts:
        t = pq.read_table(part, columns=["user", "item", "rating"])
        u, i, r = (t[c].to_numpy() for c in ("user", "item", "rating"))
        codes = split_codes(u, i, split.test_fraction, split.validation_fraction, split.seed)
        rows = np.stack([u, i, r], axis=1).astype(np.float32)
        train.append(rows[codes == TRAIN])
        test.append(rows[codes == TEST])
    return np.concatenate(train), np.concatenate(test)


def time_libmf(train: np.ndarray, test: np.ndarray, k: int, epochs: int, threads: int) -> dict:
    from libmf import mf

    def fit(iters: int):
        model = mf.MF(k=k, nr_threads=threads, nr_iters=iters, nr_bins=max(26, 2 * threads + 1),
                      lambda_p1=0.05, lambda_q1=0.05, eta=0.1, quiet=True)
        began = time.perf_counter()
        model.fit(train)
        return model, time.perf_counter() - began

    _, setup = fit(1)
    model, total = fit(1 + epochs)
    # The binding's predict() reads the (n, 2) pairs in column-major order.
    prediction = model.predict(np.asfortranarray(test[:, :2]))
    rmse = float(np.sqrt(np.mean((np.clip(prediction, 1, 5) - test[:, 2]) ** 2)))
    return {"epoch_seconds": (total - setup) / epochs, "test_rmse": rmse}


def time_funkflow(dataset, cache: Path, k: int, epochs: int, threads: int, d: int | str = "auto",
                  scheduler: str | None = None) -> dict:
    """``scheduler``: ``cluster.scheduler`` (None: as funkflow chooses by size, in-process below 25M ratings
    and one LocalCluster worker above; ``local``: that worker at any size)."""
    run_dir = cache / f"vs-libmf-{dataset.root.name}-k{k}-t{threads}"
    shutil.rmtree(run_dir, ignore_errors=True)
    config = load_config(None, [
        f"data.source={dataset.root}", "data.generate=null", f"model.k={k}", f"train.epochs={epochs}",
        f"train.d={d}", "cluster.n_workers=1", f"cluster.threads_per_worker={threads}", f"output.run_dir={run_dir}",
        "train.checkpoint_every=0",  # LIBMF cannot checkpoint; compare training alone
        *([f"cluster.scheduler={scheduler}"] if scheduler else []),
    ])
    summary = run_pipeline(config)
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    elapsed = np.cumsum([m["seconds"] for m in metrics])
    return {"epoch_seconds": statistics.median(m["seconds"] for m in metrics[1:]), "test_rmse": summary["test_rmse"],
            "floor_rmse": summary["floor_rmse"],
            "curve": [[float(t), m["val_rmse"]] for t, m in zip(elapsed, metrics)]}
