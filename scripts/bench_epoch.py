"""Epoch time of DSGD training on a LocalCluster with 1 and with 2 worker processes.

Trains on a Netflix-shaped data set (scale 0.1 = 10M ratings by default) with
each worker count in one run of this script, and prints the median epoch time
(epoch 1 is left out: it includes compiling or loading the kernels) and the
speedup. An epoch's time includes its train and validation RMSE pass. The train
RMSE must agree to the last bit across worker counts.

    python scripts/bench_epoch.py [--scale 0.1] [--k 32] [--epochs 4] [--d 4] [--workers 1 2]

Every worker count runs the same d, so the factors must agree to the last bit.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import statistics
from pathlib import Path

from _bench_data import dataset_at

from funkflow.pipeline.app.stages import run_pipeline
from funkflow.pipeline.core.config import load_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=float, default=0.1)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--d", type=int, default=4)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--cache", type=Path, default=Path("/tmp/funkflow-bench"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    dataset = dataset_at(args.scale, args.cache)
    rows = []
    for n_workers in args.workers:
        run_dir = args.cache / f"epoch-{dataset.root.name}-k{args.k}-d{args.d}-w{n_workers}"
        config = load_config(None, [
            f"data.source={dataset.root}", "data.generate=null", f"model.k={args.k}", f"train.d={args.d}",
            f"train.epochs={args.epochs}", "cluster.scheduler=local", f"cluster.n_workers={n_workers}",
            "cluster.threads_per_worker=1", f"output.run_dir={run_dir}",
        ])
        shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run: stage records would skip training
        run_pipeline(config, last="train")
        metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        epoch_seconds = statistics.median(m["seconds"] for m in metrics[1:] or metrics)
        rate = statistics.median(m["ratings_per_second"] for m in metrics[1:] or metrics)
        rows.append((n_workers, epoch_seconds, rate, metrics[-1]["train_rmse"]))

    print(f"scale {args.scale:g} ({dataset.n_ratings:,} ratings), k={args.k}, d={args.d}, "
          f"median over epochs 2..{args.epochs}")
    print("| workers | epoch seconds | training ratings/s | speedup vs 1 worker | train RMSE |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    base = rows[0][1]
    for n_workers, seconds, rate, train_rmse in rows:
        print(f"| {n_workers} | {seconds:.3f} | {rate:,.0f} | {base / seconds:.2f} | {train_rmse!r} |")


if __name__ == "__main__":
    main()
