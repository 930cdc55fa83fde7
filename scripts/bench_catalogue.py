"""What a catalogue costs each worker: the largest worker's peak RSS as the items grow, the rest the same.

Runs the whole chain (block, train, evaluate) on a LocalCluster of single-thread worker processes for two
Netflix-shaped datasets that differ only in their number of items, and reads each worker process's peak RSS
(``getrusage``) at the end. The difference between the two largest peaks is what the catalogue costs a
worker, given as a multiple of Q, the larger catalogue's item factors as a worker holds them (k floats
padded to 16, and a bias). Each worker should hold its share of the item factors (about 2Q/W) and the
blocks in flight, not all of them.

    python scripts/bench_catalogue.py [--users 400000] [--items 20000 2000000] [--ratings 8000000] [--k 64]
        [--workers 4] [--epochs 3] [--last train]
"""

from __future__ import annotations

import argparse
import logging
import resource
import shutil
from pathlib import Path

import dask
from _bench_data import dataset_at
from distributed import Client, LocalCluster

from funkflow.pipeline.app.stages import run_pipeline
from funkflow.pipeline.core.cluster import LOCAL_CLUSTER_CONFIG, DaskExecutor
from funkflow.pipeline.core.config import load_config
from funkflow.pipeline.training.plan import state_bytes


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def peaks(dataset_root: Path, run_dir: Path, k: int, workers: int, epochs: int, last: str) -> dict[str, int]:
    """Peak RSS of each worker process over a run up to stage ``last``, bytes."""
    shutil.rmtree(run_dir, ignore_errors=True)
    config = load_config(None, [f"data.source={dataset_root}", "data.generate=null", f"model.k={k}",
                                f"train.epochs={epochs}", "train.early_stopping_patience=0",
                                f"output.run_dir={run_dir}"])
    with dask.config.set(LOCAL_CLUSTER_CONFIG), LocalCluster(n_workers=workers, threads_per_worker=1,
                                                         dashboard_address="127.0.0.1:0") as cluster, \
            Client(cluster) as client:
        run_pipeline(config, last, executor=DaskExecutor(client))
        return client.run(_peak_rss)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=400_000)
    parser.add_argument("--items", type=int, nargs=2, default=[20_000, 2_000_000])
    parser.add_argument("--ratings", type=int, default=8_000_000)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--last", choices=("train", "evaluate"), default="evaluate",
                        help="the last stage run (train: the epochs alone, without evaluate's rotation)")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/funkflow-bench"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    found = {}
    for n_items in args.items:
        dataset = dataset_at(0.1, args.cache, shape=(args.users, n_items, args.ratings))
        found[n_items] = peaks(dataset.root, args.cache / f"catalogue-{dataset.root.name}", args.k, args.workers,
                               args.epochs, args.last)
    small, large = args.items
    q = large * state_bytes(args.k)
    print(f"{args.users:,} users, {args.ratings:,} ratings, k={args.k}, {args.workers} single-thread workers, "
          f"{args.epochs} epochs{' and evaluate' if args.last == 'evaluate' else ''}; "
          f"Q = {q / 2**20:.0f} MiB at {large:,} items")
    print("| items | peak RSS of each worker, GiB | largest |")
    print("| ---: | --- | ---: |")
    for n_items, by_worker in found.items():
        print(f"| {n_items:,} | {', '.join(f'{v / 2**30:.2f}' for v in sorted(by_worker.values()))} "
              f"| {max(by_worker.values()) / 2**30:.2f} |")
    cost = max(found[large].values()) - max(found[small].values())
    print(f"\nthe catalogue's cost to the largest worker: {cost / 2**30:.2f} GiB = {cost / q:.2f} Q")


if __name__ == "__main__":
    main()
