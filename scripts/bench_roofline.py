"""How far the SGD kernel is from this machine's limits: a roofline for the update, one thread.

Over every training block of one row block (the column blocks one after another, as a lane takes a strip),
three passes with the kernel's own visiting order (seeded runs, tiles, the prefetch 16 ratings ahead):

- ``kernel``: the SGD update as training runs it (:func:`funkflow.tasks.kernels.sgd_block`);
- ``rows only``: the same ratings, the same factor rows and biases read and written, the arithmetic removed
  (each rating's two rows swapped): the memory limit of the kernel's access pattern;
- ``arithmetic in L1``: the kernel itself with every user and item index folded onto 32 rows, so that all
  factors stay in L1: the limit of the arithmetic and its dependency chain (the dot product before the
  update);

and the validation pass (:func:`funkflow.tasks.kernels.block_errors`) over the block's validation ratings.
The kernel's fraction is its rate over the lower of the two limits. Best of ``--repeat`` passes, the passes
interleaved so that the machine's drift hits them alike.

    python scripts/bench_roofline.py [--scale 0.1 | --shape 480189 17770 10000000] [--k 50] [--d D] [--repeat 5]
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import numba
import numpy as np
from _bench_data import blocks_of, dataset_at

from funkflow.pipeline.training.plan import auto_d
from funkflow.tasks import kernels
from funkflow.tasks.blocks import TRAIN, VALIDATION, load_row_block
from funkflow.tasks.training import Hyper, init_factors, training_copy, visiting_layout

L1_ROWS = 32  # 32 rows of 64 floats: 8 KiB a side


@numba.jit(nopython=True, nogil=True, cache=False)
def rows_only(users, items, ratings, run_starts, order_seed, P, Q, user_bias, item_bias, prefetch_ahead):
    """The kernel's loop with its arithmetic removed: each rating's rows and biases read and written back
    swapped, in the same order, with the same prefetch. Returns the sum of the ratings, so that none of it
    can be dropped."""
    k = P.shape[1]
    total = 0.0
    run_order = kernels.shuffled_runs(run_starts.shape[0] - 1, order_seed)
    n_runs = run_order.shape[0]
    t_ahead, j_ahead, end_ahead = (-1, 0, 0) if prefetch_ahead > 0 else (n_runs, 0, 0)
    for _ in range(prefetch_ahead + 1 if prefetch_ahead > 0 else 0):
        t_ahead, j_ahead, end_ahead = kernels._advance(run_starts, run_order, t_ahead, j_ahead, end_ahead)
    for t in range(n_runs):
        run = run_order[t]
        for j in range(run_starts[run], run_starts[run + 1]):
            if t_ahead < n_runs:
                kernels._prefetch_rows(P, Q, users[j_ahead], items[j_ahead])
                t_ahead, j_ahead, end_ahead = kernels._advance(run_starts, run_order, t_ahead, j_ahead, end_ahead)
            u = users[j]
            i = items[j]
            total += ratings[j]
            user_bias[u], item_bias[i] = item_bias[i], user_bias[u]
            for f in range(k):
                p = P[u, f]
                P[u, f] = Q[i, f]
                Q[i, f] = p
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=float, default=0.1)
    parser.add_argument("--shape", type=int, nargs=3, metavar=("USERS", "ITEMS", "RATINGS"))
    parser.add_argument("--k", type=int, default=50)
    parser.add_argument("--d", type=int, help="blocks per side (default: what train.d: auto picks)")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--cache", type=Path, default=Path("/tmp/funkflow-bench"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")

    dataset = dataset_at(args.scale, args.cache, shape=tuple(args.shape) if args.shape else None)
    d = args.d or auto_d(dataset.n_ratings)
    blocks = blocks_of(dataset, d, args.cache)
    row = load_row_block(str(blocks.root), 0, blocks.d, blocks.n_users, blocks.n_items, blocks.seed)
    train, validation = row.split(TRAIN), row.split(VALIDATION)
    hyper = Hyper(lr=0.005, reg=0.05, bias_reg=0.01, use_bias=True, global_mean=blocks.global_mean,
                  order="user_runs", users_per_run=1024, tile_items=1024)
    layouts = [visiting_layout(b, hyper.order, hyper.users_per_run, hyper.tile_items) for b in train]
    folded = [(lay[0] % L1_ROWS, lay[1] % L1_ROWS, lay[2], lay[3]) for lay in layouts]
    n_items = [int(b.items.max()) + 1 if b.n else 0 for b in train]
    user = training_copy(init_factors(row.n_users, args.k, 0.1, 1))
    items = [training_copy(init_factors(m, args.k, 0.1, 2 + c)) for c, m in enumerate(n_items)]
    small_user, small_item = (training_copy(init_factors(L1_ROWS, args.k, 0.1, s)) for s in (7, 8))
    n, n_val = sum(b.n for b in train), sum(b.n for b in validation)
    scalars = (np.float32(hyper.global_mean), np.float32(hyper.lr), np.float32(hyper.reg),
               np.float32(hyper.bias_reg), True, kernels.PREFETCH_AHEAD)

    def kernel(rep: int) -> None:
        for c, lay in enumerate(layouts):
            kernels.sgd_block(*lay, np.uint64(rep * 100 + c), user[0], items[c][0], user[1], items[c][1], *scalars)

    def memory(rep: int) -> None:
        for c, lay in enumerate(layouts):
            rows_only(*lay, np.uint64(rep * 100 + c), user[0], items[c][0], user[1], items[c][1],
                      kernels.PREFETCH_AHEAD)

    def arithmetic(rep: int) -> None:
        for c, lay in enumerate(folded):
            kernels.sgd_block(*lay, np.uint64(rep * 100 + c), small_user[0], small_item[0], small_user[1],
                              small_item[1], *scalars)

    def validate(rep: int) -> None:
        for c, b in enumerate(validation):
            kernels.block_errors(b.users, b.items, b.ratings, user[0], items[c][0], user[1], items[c][1],
                                 scalars[0])

    passes = {"kernel": (kernel, n), "rows only": (memory, n), "arithmetic in L1": (arithmetic, n),
              "validation pass": (validate, n_val)}
    for work, _ in passes.values():
        work(0)  # compile, or load the cache
    best = dict.fromkeys(passes, 0.0)
    for rep in range(1, args.repeat + 1):
        for name, (work, count) in passes.items():
            began = time.perf_counter()
            work(rep)
            best[name] = max(best[name], count / (time.perf_counter() - began))
    limit = min(best["rows only"], best["arithmetic in L1"])
    bound = "memory" if best["rows only"] < best["arithmetic in L1"] else "arithmetic"
    print(f"{dataset.root.name}: row block 0 of d={d}, k={args.k}: {n:,} training ratings over {row.n_users:,} "
          f"users ({n / max(row.n_users, 1) / d:.1f} a user a block), {max(n_items):,} items a block; one thread, "
          f"best of {args.repeat}")
    print("| pass | ratings/s | of the limit |")
    print("| --- | ---: | ---: |")
    for name in passes:
        print(f"| {name} | {best[name] / 1e6:.1f}M | {best[name] / limit:.2f} |")
    print(f"\nthe kernel runs at {best['kernel'] / limit:.2f} of the lower limit ({bound})")


if __name__ == "__main__":
    main()
