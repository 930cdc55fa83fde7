"""What an epoch costs as the workers grow, counted: tasks, messages and bytes per worker, against the plan.

Trains the embedded demo's data (1M ratings, 3,000 users × 1,000 items, k=32; ``--shape`` for
Netflix-shaped data of another size) at one d for a few epochs
in this process and on LocalClusters of 2, 4 and 8 single-thread worker processes (the factors are the
same bits everywhere, so the differences are coordination). For each it counts, over the epochs after the
first: the scheduler's tasks per epoch, and for each worker the messages of column blocks and the bytes it
received, per epoch, against what `funkflow plan` says (``Plan.received_bytes``); Q is the catalogue's
factors as they travel (k floats and a bias a row). Then, on 2 workers, every hand-off is held for an
injected delay: an epoch whose hand-offs hide behind computation grows by far less than d × delay. Last,
the latency of one message between two idle workers, the figure `funkflow plan` takes as its hop.
Oversubscribing the 2 cores with 8 workers is deliberate: the counts do not depend on it, the seconds do.

    python scripts/bench_scale.py [--d 16] [--epochs 5] [--workers 2 4 8] [--delays-ms 0 5 20]
        [--shape 480189 17770 10000000]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from pathlib import Path

import dask
import numpy as np
from _bench_data import dataset_at
from distributed import Client, LocalCluster, get_task_stream

from funkflow.pipeline.app.stages import synthetic_spec
from funkflow.pipeline.core.cluster import LOCAL_CLUSTER_CONFIG, DaskExecutor, Executor, InProcessExecutor
from funkflow.pipeline.core.config import load_config
from funkflow.pipeline.data.blocking import block_dataset, open_blocks
from funkflow.pipeline.data.dataset import generate_dataset, open_dataset
from funkflow.pipeline.training.exchange import received_bytes, received_messages, set_hand_off_delay
from funkflow.pipeline.training.placement import BlockPlacement
from funkflow.pipeline.training.plan import Plan
from funkflow.pipeline.training.train import train

log = logging.getLogger("bench")


def epochs_of(executor: Executor, blocks_root: Path, k: int, epochs: int) -> list[float]:
    """Seconds of each epoch of a training run (checkpoints off, early stopping off, no model written)."""
    config = load_config(None, [f"model.k={k}", f"train.epochs={epochs}", "train.checkpoint_every=0",
                                "train.early_stopping_patience=0"])
    placement = BlockPlacement(executor, open_blocks(blocks_root))
    result = train(executor, placement, placement.load_row_blocks(), config.model, config.train,
                   save=lambda result, write_blocks: None)
    return [r.seconds for r in result.history]


async def _round_trips(peer: str, n: int, dask_worker=None) -> list[float]:
    seconds = []
    for _ in range(n):
        began = time.perf_counter()
        await dask_worker.rpc(peer).identity()
        seconds.append(time.perf_counter() - began)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--d", type=int, default=16)
    parser.add_argument("--ratings", type=int, default=1_000_000, help="the demo's 1M; smaller for a smoke run")
    parser.add_argument("--shape", type=int, nargs=3, metavar=("USERS", "ITEMS", "RATINGS"),
                        help="Netflix-shaped data of this size instead of the demo's")
    parser.add_argument("--workers", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--delays-ms", type=float, nargs="+", default=[0, 5, 20])
    parser.add_argument("--cache", type=Path, default=Path("/tmp/funkflow-bench"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    config = load_config(None, [f"data.generate.n_ratings={args.ratings}"])
    if args.shape:
        dataset = dataset_at(0.1, args.cache, shape=tuple(args.shape))
    else:
        data_root = args.cache / f"demo-{args.ratings}"
        if not (data_root / "dataset.json").exists():
            generate_dataset(InProcessExecutor(), synthetic_spec(config.data.generate), data_root, 500_000)
        dataset = open_dataset(data_root)
    blocks_root = args.cache / f"{dataset.root.name}-blocks-d{args.d}"
    if not (blocks_root / "blocks.json").exists():
        block_dataset(InProcessExecutor(), dataset, blocks_root, args.d, config.split, config.train.seed)
    q = dataset.n_items * (args.k + 1) * 4

    in_process = statistics.median(epochs_of(InProcessExecutor(), blocks_root, args.k, args.epochs)[1:])
    print(f"{dataset.n_ratings:,} ratings, {dataset.n_users:,} users × {dataset.n_items:,} items, k={args.k}, "
          f"d={args.d}; Q = {q / 2**20:.2f} MiB; median epoch after the first; in-process {in_process:.3f} s")
    print("| workers | epoch s | / in-process | scheduler tasks per epoch | messages per worker per epoch "
          "| received per worker per epoch (max) | plan says |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for workers in args.workers:
        with dask.config.set(LOCAL_CLUSTER_CONFIG), LocalCluster(n_workers=workers, threads_per_worker=1,
                                                             dashboard_address="127.0.0.1:0") as cluster, \
                Client(cluster) as client:
            epochs_of(DaskExecutor(client), blocks_root, args.k, 1)  # start the workers' kernels and extension
            bytes_before = {w: sum(e[2] for e in entries) for w, entries in client.run(received_bytes).items()}
            messages_before = client.run(received_messages)
            with get_task_stream(client) as stream:
                seconds = epochs_of(DaskExecutor(client), blocks_root, args.k, args.epochs)
            got = {w: sum(e[2] for e in entries) - bytes_before[w] for w, entries in client.run(received_bytes).items()}
            messages = {w: n - messages_before[w] for w, n in client.run(received_messages).items()}
            tasks = sum(1 for t in stream.data if t["key"].startswith("epoch_share")) / args.epochs
            plan = Plan(dataset.n_ratings, dataset.n_users, dataset.n_items, args.k, args.d, workers, 1, 0.85, 1.0)
            epoch = statistics.median(seconds[1:])
            print(f"| {workers} | {epoch:.3f} | {epoch / in_process:.2f} | {tasks:.1f} "
                  f"| {statistics.mean(messages.values()) / args.epochs:.0f} "
                  f"| {max(got.values()) / args.epochs / q:.2f} Q | {plan.received_bytes() / q:.2f} Q |", flush=True)
            if workers != 2:
                continue
            delayed = []
            for delay_ms in args.delays_ms:
                client.run(set_hand_off_delay, delay_ms / 1e3)
                delayed.append((delay_ms, statistics.median(epochs_of(DaskExecutor(client), blocks_root, args.k,
                                                                      args.epochs)[1:])))
            client.run(set_hand_off_delay, 0.0)
            first, second = sorted(client.nthreads())
            trips = client.run(_round_trips, second, 200, workers=[first])[first]
    print("\nEvery hand-off between the 2 workers held for a delay:")
    print("| delay ms | epoch s | growth over no delay, s | d × delay, s |")
    print("| ---: | ---: | ---: | ---: |")
    for delay_ms, epoch in delayed:
        print(f"| {delay_ms:g} | {epoch:.3f} | {epoch - delayed[0][1]:.3f} | {args.d * delay_ms / 1e3:.3f} |")
    print(f"\nOne message between two idle workers (half a round trip, median of 200): "
          f"{np.median(trips) / 2 * 1e3:.3f} ms (pipeline/training/plan.py: HOP_SECONDS)")


if __name__ == "__main__":
    main()
