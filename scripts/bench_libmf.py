"""funkflow against LIBMF on the same data, k, epochs and threads, in one run.

LIBMF (Chin, Zhuang, Juan, Lin: the FPSGD reference in C++) is used through
PyPI's ``libmf`` binding; its per-iteration time is ``(T(1 + N) - T(1)) / N``
over whole ``fit`` calls, so its set-up is left out. LIBMF is timed with
``quiet`` (no per-iteration loss); funkflow's epoch time includes its train and
validation RMSE pass, without checkpoints (LIBMF has none). Both train on the
same hash split and are scored on the same test ratings. funkflow's d is what
``train.d: auto`` picks for the data and thread count unless ``--d`` says otherwise.

The binding builds LIBMF without its SSE/AVX code paths; to compare with the
official build, compile ``mf.cpp`` and ``libmf_interface.cpp`` from the binding's
sdist with LIBMF's Makefile flags and pass the shared object with ``--libmf-obj``.

    python scripts/bench_libmf.py [--scale 0.1] [--k 32] [--epochs 10] [--threads 1 2] [--libmf-obj FILE]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from _bench_data import dataset_at

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


def time_funkflow(dataset, cache: Path, k: int, epochs: int, threads: int, d: int | str = "auto") -> dict:
    run_dir = cache / f"vs-libmf-{dataset.root.name}-k{k}-t{threads}"
    shutil.rmtree(run_dir, ignore_errors=True)
    config = load_config(None, [
        f"data.source={dataset.root}", "data.generate=null", f"model.k={k}", f"train.epochs={epochs}",
        f"train.d={d}", "cluster.scheduler=local", "cluster.n_workers=1", f"cluster.threads_per_worker={threads}",
        f"output.run_dir={run_dir}",
        "train.checkpoint_every=0",  # LIBMF cannot checkpoint; compare training alone
    ])
    summary = run_pipeline(config)
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    elapsed = np.cumsum([m["seconds"] for m in metrics])
    return {"epoch_seconds": statistics.median(m["seconds"] for m in metrics[1:]), "test_rmse": summary["test_rmse"],
            "floor_rmse": summary["floor_rmse"],
            "curve": [[float(t), m["val_rmse"]] for t, m in zip(elapsed, metrics)]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=float, default=0.1)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--d", type=int, help="blocks per side (default: what train.d: auto picks)")
    parser.add_argument("--libmf-obj", type=Path, help="a LIBMF shared object to use instead of the binding's")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/funkflow-bench"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.libmf_obj:
        os.environ["LIBMF_OBJ"] = str(args.libmf_obj)

    dataset = dataset_at(args.scale, args.cache)
    train, test = split_arrays(dataset)
    try:
        import libmf  # noqa: F401
        have_libmf = True
    except ImportError:
        have_libmf = False

    print(f"scale {args.scale:g}: {train.shape[0]:,} training ratings, {test.shape[0]:,} test; k={args.k}, "
          f"{args.epochs} epochs")
    print("| threads | funkflow epoch s | LIBMF epoch s | LIBMF / funkflow time | funkflow test RMSE | "
          "LIBMF test RMSE | floor |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for threads in args.threads:
        ours = time_funkflow(dataset, args.cache, args.k, args.epochs, threads, args.d or "auto")
        if have_libmf:
            theirs = time_libmf(train, test, args.k, args.epochs, threads)
            cells = (f"{theirs['epoch_seconds']:.3f}", f"{theirs['epoch_seconds'] / ours['epoch_seconds']:.2f}",
                     f"{theirs['test_rmse']:.4f}")
        else:
            cells = ("not installed", "-", "-")
        print(f"| {threads} | {ours['epoch_seconds']:.3f} | {cells[0]} | {cells[1]} | {ours['test_rmse']:.4f} | "
              f"{cells[2]} | {ours['floor_rmse']:.4f} |")


if __name__ == "__main__":
    main()
