"""One-thread throughput of the SGD kernel, in ratings per second, at several k.

Runs the block task exactly as a worker does (copy of the factor blocks, seeded
visiting order, kernel) over every training block of one row block of a
Netflix-shaped data set (scale 0.1 = 10M ratings by default).

    python scripts/bench_kernel.py [--scale 0.1] [--k 32 64 128] [--d 4] [--repeat 3]
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import numpy as np

from tasks import kernels
from tasks.blocks import TRAIN, load_row_block
from tasks.training import Hyper, init_factors, sgd_update

from _bench_data import blocks_of, dataset_at


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
    print("| k | task, order=user_runs | task, order=ratings | kernel only, sequential |")
    print("| ---: | ---: | ---: | ---: |")
    for k in args.k:
        cells = []
        for order in ("user_runs", "ratings"):
            hyper = Hyper(lr=0.005, reg=0.05, bias_reg=0.01, use_bias=True, global_mean=blocks.global_mean,
                          order=order)
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
        P, ub = (a.copy() for a in user)
        seconds = []
        for _ in range(args.repeat):
            began = time.perf_counter()
            for c, b in enumerate(train):
                Q, ib = (a.copy() for a in items[c])
                kernels.sgd_block_biased(b.users, b.items, b.ratings, np.array([0, b.n]), np.zeros(1, np.int64),
                                         P, Q, ub, ib, np.float32(hyper.global_mean), np.float32(hyper.lr),
                                         np.float32(hyper.reg), np.float32(hyper.bias_reg))
            seconds.append(time.perf_counter() - began)
        cells.append(n / min(seconds))
        print(f"| {k} | " + " | ".join(f"{c:,.0f}" for c in cells) + " |")

if __name__ == "__main__":
    main()
