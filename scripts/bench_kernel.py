"""One-thread throughput of the SGD block task, in ratings per second, at several k.

Runs the block task exactly as a worker does (seeded visiting order, kernel,
updating the factor blocks in place) over every training block of one row block
of a Netflix-shaped data set (scale 0.1 = 10M ratings by default; scale 1 has
Netflix-sized blocks; ``--shape USERS ITEMS RATINGS`` for others), for each
visiting order and prefetch distance, interleaved so that the machine's drift
hits them alike; the best of ``--repeat`` passes counts.

    python scripts/bench_kernel.py [--scale 0.1 | --shape 2000000 500000 20000000] [--k 32 50 64 128] [--d 4]
        [--repeat 3] [--variants ...] [--prefetch 16 0]

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
from funkflow.tasks.kernels import PREFETCH_AHEAD
from funkflow.tasks.training import Hyper, init_factors, sgd_update_in_place, training_copy

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
    parser.add_argument("--shape", type=int, nargs=3, metavar=("USERS", "ITEMS", "RATINGS"))
    parser.add_argument("--k", type=int, nargs="+", default=[32, 50, 64, 128])
    parser.add_argument("--d", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--prefetch", type=int, nargs="+", default=[PREFETCH_AHEAD],
                        help=f"prefetch distances, in ratings (the kernel's: {PREFETCH_AHEAD}; 0: none)")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/funkflow-bench"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")

    dataset = dataset_at(args.scale, args.cache, shape=tuple(args.shape) if args.shape else None)
    blocks = blocks_of(dataset, args.d, args.cache)
    row = load_row_block(str(blocks.root), 0, blocks.d, blocks.n_users, blocks.n_items, blocks.seed)
    train = row.split(TRAIN)
    n = sum(b.n for b in train)
    n_items = [int(b.items.max()) + 1 if b.n else 0 for b in train]
    print(f"{dataset.root.name}: row block 0 of d={args.d}: {n:,} training ratings, {row.n_users:,} users, "
          f"{max(n_items):,} items a block; best of {args.repeat}, ratings/s")
    columns = [(v, p) for v in args.variants for p in args.prefetch]
    print("| k | " + " | ".join(VARIANTS[v][0] + (f", prefetch {p}" if len(args.prefetch) > 1 else "")
                              for v, p in columns) + " |")
    print("| ---: |" + " ---: |" * len(columns))
    for k in args.k:
        hypers = {v: Hyper(lr=0.005, reg=0.05, bias_reg=0.01, use_bias=True, global_mean=blocks.global_mean,
                           order=VARIANTS[v][1], users_per_run=VARIANTS[v][2], tile_items=VARIANTS[v][3])
                  for v in args.variants}
        user = training_copy(init_factors(row.n_users, k, 0.1, 1))
        items = [training_copy(init_factors(m, k, 0.1, 2 + c)) for c, m in enumerate(n_items)]
        sgd_update_in_place(train[0], user, items[0], hypers[args.variants[0]], 0)  # compile or load the cache
        best = dict.fromkeys(columns, 0.0)
        for rep in range(args.repeat):
            for v, p in columns:  # interleaved: a slow spell of the machine hits every column
                began = time.perf_counter()
                for c in range(len(train)):
                    sgd_update_in_place(train[c], user, items[c], hypers[v], rep * 100 + c, p)
                best[v, p] = max(best[v, p], n / (time.perf_counter() - began))
        print(f"| {k} | " + " | ".join(f"{best[c] / 1e6:.1f}M" for c in columns) + " |", flush=True)


if __name__ == "__main__":
    main()
