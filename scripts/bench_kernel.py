"""One-thread throughput of the SGD block task, in ratings per second, at several k.

Runs the block task exactly as a worker does (copy of the factor blocks, seeded
visiting order, kernel) over every training block of one row block of a
Netflix-shaped data set (scale 0.1 = 10M ratings by default; scale 1 has
Netflix-sized blocks), for each visiting order, interleaved so that the
machine's drift hits them alike; the best of ``--repeat`` passes counts.

    python scripts/bench_kernel.py [--scale 0.1] [--k 32 50 64 128] [--d 4] [--repeat 3] [--variants ...]

Variants: ``tiles`` (the default: runs of 1024 users in tiles of 1024 items),
``runs32`` (runs of 32 users, one tile: the default before tiles, same
factors bit for bit as any tiling of the same runs), ``users1`` (1-user runs),
``ratings`` (random order), ``sorted``.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from _bench_data import blocks_of, dataset_at

from funkflow.tasks.blocks import TRAIN, load_row_block
from funkflow.tasks.training import Hyper, init_factors, sgd_update

VARIANTS = {  # name: (column title, train.order, train.users_per_run, train.tile_items)
    "tiles": ("runs of 1024 users, tiles of 1024 items (default)", "user_runs", 1024, 1024),
    "runs32": ("runs of 32 users, one tile", "user_runs", 32, 0),
    "users1": ("1-user runs", "user_runs", 1, 0),
    "ratings": ("random ratings", "ratings", 1, 0),
    "sorted": ("sorted", "sorted", 1, 0),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=float, default=0.1)
    parser.add_argument("--k", type=int, nargs="+", default=[32, 50, 64, 128])
    parser.add_argument("--d", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--cache", type=Path, default=Path("/tmp/funkflow-bench"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")

    blocks = blocks_of(dataset_at(args.scale, args.cache), args.d, args.cache)
    row = load_row_block(str(blocks.root), 0, blocks.d, blocks.n_users, blocks.n_items, blocks.seed)
    train = row.split(TRAIN)
    n = sum(b.n for b in train)
    n_items = [int(b.items.max()) + 1 if b.n else 0 for b in train]
    print(f"scale {args.scale:g}: row block 0 of d={args.d}: {n:,} training ratings, {row.n_users:,} users, "
          f"{max(n_items):,} items a block; best of {args.repeat}, ratings/s")
    print("| k | " + " | ".join(VARIANTS[v][0] for v in args.variants) + " |")
    print("| ---: |" + " ---: |" * len(args.variants))
    for k in args.k:
        hypers = {v: Hyper(lr=0.005, reg=0.05, bias_reg=0.01, use_bias=True, global_mean=blocks.global_mean,
                           order=VARIANTS[v][1], users_per_run=VARIANTS[v][2], tile_items=VARIANTS[v][3])
                  for v in args.variants}
        user = init_factors(row.n_users, k, 0.1, 1)
        items = [init_factors(m, k, 0.1, 2 + c) for c, m in enumerate(n_items)]
        sgd_update(row, 0, user, items[0], hypers[args.variants[0]], 0, "warm-up")  # compile (or load the cache)
        best = dict.fromkeys(args.variants, 0.0)
        for rep in range(args.repeat):
            for v in args.variants:  # interleaved: a slow spell of the machine hits every variant
                began = time.perf_counter()
                for c in range(len(train)):
                    sgd_update(row, c, user, items[c], hypers[v], rep * 100 + c, "bench")
                best[v] = max(best[v], n / (time.perf_counter() - began))
        print(f"| {k} | " + " | ".join(f"{best[v] / 1e6:.1f}M" for v in args.variants) + " |", flush=True)


if __name__ == "__main__":
    main()
