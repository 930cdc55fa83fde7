"""Driver and scheduler memory after N epochs: flat if checkpoints cut the lineage.

Trains on a small synthetic set on a LocalCluster for each epoch count in one
run of this script and prints, after training, the RSS of the process that
holds the driver and the LocalCluster's scheduler, and the number of tasks
the scheduler still tracks.

    python scripts/bench_scheduler_memory.py [--epochs 5 100] [--checkpoint-every 1]
"""

from __future__ import annotations

import argparse
import logging
import shutil
from pathlib import Path

import dask
from distributed import Client, LocalCluster

from funkflow.pipeline.app.stages import run_pipeline
from funkflow.pipeline.core.cluster import LOCAL_CLUSTER_CONFIG
from funkflow.pipeline.core.config import load_config


def _scheduler_facts(dask_scheduler) -> tuple[int, int]:
    import psutil

    return psutil.Process().memory_info().rss, len(dask_scheduler.tasks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, nargs="+", default=[5, 100])
    parser.add_argument("--checkpoint-every", type=int, default=1)
    parser.add_argument("--cache", type=Path, default=Path("/tmp/funkflow-bench"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    print("| epochs | driver + scheduler RSS MiB | tasks tracked by the scheduler |")
    print("| ---: | ---: | ---: |")
    for epochs in args.epochs:
        run_dir = args.cache / f"scheduler-memory-{epochs}"
        shutil.rmtree(run_dir, ignore_errors=True)
        with dask.config.set(LOCAL_CLUSTER_CONFIG), LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                                             dashboard_address="127.0.0.1:0") as cluster, \
                Client(cluster) as client:
            run_pipeline(load_config(None, [
                "data.generate.n_users=2000", "data.generate.n_items=500", "data.generate.n_ratings=100000",
                "model.k=16", "train.d=4", f"train.epochs={epochs}", "train.lr_schedule=constant",
                f"train.checkpoint_every={args.checkpoint_every}", f"cluster.scheduler={cluster.scheduler_address}",
                f"output.run_dir={run_dir}"]), last="train")
            rss, n_tasks = client.run_on_scheduler(_scheduler_facts)
        print(f"| {epochs} | {rss / 2**20:.0f} | {n_tasks} |")


if __name__ == "__main__":
    main()
