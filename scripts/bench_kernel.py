"""One-thread throughput of the SGD kernel, in ratings per second, at several k.

Runs the block task exactly as a worker does (copy of the factor blocks, seeded
visiting order, kernel) over every training block of one row block of a
Netflix-shaped data set (scale 0.1 = 10M ratings by default), for each
``train.order``; the best of ``--repeat`` passes counts.

    python scripts/bench_kernel.py [--scale 0.1] [--k 32 64 128] [--d 4] [--repeat 3]
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from _bench_data import blocks_of, dataset_at

from tasks.blocks import TRAIN, load_row_block
from tasks.training import Hyper, init_factors, sgd_update


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=float, default=0.1)
    parser.add_argument("--k", type=int, nargs="+", default=[32, 64, 128])
    parser.add_argument("--d", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--cache", type=Path, default=Path("/tmp/funkflow-bench"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")

    blocks = blocks_of(dataset_at(args.scale, args.cache), args.d, args.cache)
    row = load_row_block(str(blocks.root), 0, blocks.d, blocks.n_users, blocks.n_items, blocks.seed)
    train = row.split(TRAIN)
    n = sum(b.n for b in train)
    n_items = [int(b.items.max()) + 1 if b.n else 0 for b in train]
    print(f"scale {args.scale:g}: row block 0 of d={args.d}: {n:,} training ratings, {row.n_users:,} users")
    orders = [("user_runs", 32), ("user_runs", 1), ("ratings", 1), ("sorted", 1)]
    print("| k | " + " | ".join(f"{o}" + (f" ({m} users)" if o == "user_runs" else "") for o, m in orders) + " |")
    print("| ---: |" + " ---: |" * len(orders))
    for k in args.k:
        cells = []
        for order, users_per_run in orders:
            hyper = Hyper(lr=0.005, reg=0.05, bias_reg=0.01, use_bias=True, global_mean=blocks.global_mean,
                          order=order, users_per_run=users_per_run)
            user = init_factors(row.n_users, k, 0.1, 1)
            items = [init_factors(m, k, 0.1, 2 + c) for c, m in enumerate(n_items)]
            sgd_update(row, 0, user, items[0], hyper, 0, "warm-up")  # compile (or load the cache)
            seconds = []
            for rep in range(args.repeat):
                began = time.perf_counter()
                for c in range(len(train)):
                    user, items[c], _ = sgd_update(row, c, user, items[c], hyper, rep * 100 + c, "bench")
                seconds.append(time.perf_counter() - began)
            cells.append(n / min(seconds))
        print(f"| {k} | " + " | ".join(f"{c:,.0f}" for c in cells) + " |")

if __name__ == "__main__":
    main()
