"""Does an epoch get slower as d and the workers grow? Dask epochs against in-process ones at the same d.

Trains the embedded demo's data (1M ratings, 3,000 users × 1,000 items) for a
few epochs at each (workers, d) of the grid on a LocalCluster of single-thread
worker processes, and at each d in this process without Dask. The factors are
the same bits either way, so the difference is coordination: scheduler tasks,
round trips and item blocks moving between processes. Oversubscribing the 2
cores with 8 or 16 workers is deliberate: it shows what coordination costs as
the workers grow while the SGD stays small. Checkpoints are off.

Columns: the median epoch after the first, the in-process one, their ratio, and
the scheduler's tasks per epoch (counted from Dask's task stream over the whole
training, loading and collecting included, divided by the epochs). Last, the
hand-off cost and the fixed cost per epoch that `funkflow plan` uses, fitted on
the 2-worker rows.

    python scripts/bench_scale.py [--epochs 6] [--k 32] [--grid 2:2 2:4 2:8 2:16 2:32 8:8 8:16 16:16 16:32]
"""

from __future__ import annotations

import argparse
import logging
import statistics
from pathlib import Path

import dask
import numpy as np
from distributed import Client, LocalCluster, get_task_stream

from funkflow.pipeline.data.blocking import block_dataset, open_blocks
from funkflow.pipeline.data.dataset import generate_dataset, open_dataset
from funkflow.pipeline.running.cluster import SCHEDULER_CONFIG, DaskExecutor, Executor, InProcessExecutor
from funkflow.pipeline.running.config import load_config
from funkflow.pipeline.running.stages import synthetic_spec
from funkflow.pipeline.training.placement import BlockPlacement
from funkflow.pipeline.training.train import train

log = logging.getLogger("bench")


def median_epoch(executor: Executor, blocks_root: Path, k: int, epochs: int) -> float:
    config = load_config(None, [f"model.k={k}", f"train.epochs={epochs}"])
    placement = BlockPlacement(executor, open_blocks(blocks_root))
    result = train(executor, placement, placement.load_row_blocks(), config.model, config.train)
    return statistics.median(r.seconds for r in result.history[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--ratings", type=int, default=1_000_000, help="the demo's 1M; smaller for a smoke run")
    parser.add_argument("--grid", nargs="+", default=["2:2", "2:4", "2:8", "2:16", "2:32", "8:8", "8:16", "16:16",
                                                      "16:32"], help="workers:d pairs")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/funkflow-bench"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    grid = [tuple(int(x) for x in cell.split(":")) for cell in args.grid]

    config = load_config(None, [f"data.generate.n_ratings={args.ratings}"])
    data_root = args.cache / f"demo-{args.ratings}"
    if not (data_root / "dataset.json").exists():
        generate_dataset(InProcessExecutor(), synthetic_spec(config.data.generate), data_root, 500_000)
    dataset = open_dataset(data_root)

    def blocks_at(d: int) -> Path:
        root = args.cache / f"demo-{args.ratings}-blocks-d{d}"
        if not (root / "blocks.json").exists():
            block_dataset(InProcessExecutor(), dataset, root, d, config.split, config.train.seed)
        return root

    in_process = {d: median_epoch(InProcessExecutor(), blocks_at(d), args.k, args.epochs)
                  for d in sorted({d for _, d in grid})}
    print(f"{dataset.n_ratings:,} ratings, k={args.k}, {args.epochs} epochs, median epoch after the first")
    print("| workers | d | Dask epoch s | in-process epoch s | Dask / in-process | scheduler tasks per epoch |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    beyond_sgd: dict[int, float] = {}  # 2 workers: d → Dask epoch minus the in-process one spread over them
    for workers in dict.fromkeys(w for w, _ in grid):
        with dask.config.set(SCHEDULER_CONFIG), LocalCluster(n_workers=workers, threads_per_worker=1,
                                                             dashboard_address=":0") as cluster, \
                Client(cluster) as client:
            for d in [d for w, d in grid if w == workers]:
                with get_task_stream(client) as stream:
                    seconds = median_epoch(DaskExecutor(client), blocks_at(d), args.k, args.epochs)
                tasks = len(stream.data) / args.epochs
                if workers == 2:
                    beyond_sgd[d] = seconds - in_process[d] / min(workers, d)
                print(f"| {workers} | {d} | {seconds:.3f} | {in_process[d]:.3f} | {seconds / in_process[d]:.2f} "
                      f"| {tasks:.1f} |", flush=True)
    if len(beyond_sgd) >= 2:
        # An epoch waits d hand-offs on its critical path (pipeline/training/plan.py): fit seconds = fixed + d × hop.
        hop, fixed = np.polyfit(list(beyond_sgd), list(beyond_sgd.values()), 1)
        print(f"fit over the 2-worker rows, for pipeline/training/plan.py: HOP_SECONDS = {hop:.4f}, "
              f"EPOCH_SECONDS = {max(fixed, 0.0):.4f}")


if __name__ == "__main__":
    main()
