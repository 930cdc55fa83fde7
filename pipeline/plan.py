"""``funkflow plan``: size a cluster before renting it.

For a number of ratings, users and items, k, d and workers it prints the
memory each worker needs (its rating blocks, its user factors, the item
factors in flight), the bytes that move per epoch (item factors between
workers, a checkpoint to storage) and an estimated epoch time from the SGD
kernel's throughput measured on this machine (a two-second calibration with
one kernel per core at once, since threads that share a host slow each other;
pass ``--rate`` to use a figure measured elsewhere). The model behind it:

    epoch ≈ train ratings / (rate × min(workers × threads, d) × balance)
            + d² × per-task overhead + a validation pass at 4× the SGD rate

where ``balance`` is the mean over the max of the d blocks a stratum runs in
parallel (DSGD waits for its slowest block).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass

import numpy as np

BYTES_PER_RATING = 12        # user int32, item int32, rating float32 in a loaded block
LOAD_PEAK = 3.0              # Parquet read + sort temporaries while a row block loads
# Per block task: its three hand-off tasks, the stratum check's round trip and the scheduler's share.
# Fitted to a 10M-rating epoch on a 2-worker LocalCluster (0.47 s measured, 0.46 s estimated).
TASK_OVERHEAD_S = 0.02
BALANCE = 0.85               # heavy-tailed popularity: d hashed blocks are not quite equal
# train.d: auto gives each thread two blocks per stratum while a block keeps this many ratings.
# Measured on 2 workers: 100M ratings, d=4 (5.6M a block) 2.93 s an epoch, d=2 3.18 s, d=8 3.99 s;
# at 10M ratings d=2 beat d=4, whose 0.56M-rating tasks are a third scheduler overhead.
MIN_BLOCK_RATINGS = 4_000_000


def auto_d(n_ratings: int, threads: int) -> int:
    """The ``train.d`` that ``auto`` picks for ``n_ratings`` on ``threads`` worker threads.

    Two blocks per thread and stratum even out unequal blocks, as long as each block
    keeps ``MIN_BLOCK_RATINGS``; below that, one, so tasks stay well above the
    scheduler's per-task cost. Never fewer blocks than threads: a thread without a
    block idles.
    """
    threads = max(threads, 1)
    return 2 * threads if n_ratings / (2 * threads) ** 2 >= MIN_BLOCK_RATINGS else threads


@dataclass(frozen=True)
class Plan:
    ratings: int
    users: int
    items: int
    k: int
    d: int
    workers: int
    threads: int
    train_fraction: float
    rate: float              # SGD ratings per second per thread at this k

    @property
    def parallel(self) -> int:
        return min(self.workers * self.threads, self.d)

    def rows(self) -> list[tuple[str, str]]:
        state = (self.k + 1) * 4
        blocks_per_worker = math.ceil(self.d / self.workers)
        ratings_bytes = self.ratings / self.d * blocks_per_worker * BYTES_PER_RATING
        users_bytes = self.users / self.d * blocks_per_worker * state * 2       # old and new copy per update
        items_bytes = self.items / self.d * state * 2 * self.threads             # a block and its copy per thread
        moved = self.d * self.items * state * (self.workers - 1) / self.workers if self.workers > 1 else 0
        checkpoint = (self.users + self.items) * state
        sgd, overhead, validation = self.epoch_parts()
        return [
            ("ratings per worker (loaded blocks)", _bytes(ratings_bytes)),
            ("  peak while a row block loads", _bytes(ratings_bytes + self.ratings / self.d * BYTES_PER_RATING
                                                      * (LOAD_PEAK - 1))),
            ("user factors per worker", _bytes(users_bytes)),
            ("item factors in flight per worker", _bytes(items_bytes)),
            ("item factors moved per epoch", _bytes(moved)),
            ("checkpoint per epoch", _bytes(checkpoint)),
            ("kernel rate per thread (this machine)", f"{self.rate / 1e6:.1f}M ratings/s"),
            ("parallel block tasks", f"{self.parallel} (d={self.d}, {self.workers}×{self.threads} threads)"),
            ("estimated epoch time",
             f"{sgd + overhead + validation:.2f} s (SGD {sgd:.2f}, tasks {overhead:.2f}, validation {validation:.2f})"),
        ]

    def epoch_parts(self) -> tuple[float, float, float]:
        """Estimated seconds of an epoch's SGD, task overhead and validation pass."""
        sgd = self.ratings * self.train_fraction / (self.rate * self.parallel * BALANCE)
        overhead = self.d * self.d * TASK_OVERHEAD_S * (1 if self.workers > 1 else 0.5)
        validation = self.ratings * (1 - self.train_fraction) / (4 * self.rate * self.parallel)
        return sgd, overhead, validation

    def epoch_seconds(self) -> float:
        return sum(self.epoch_parts())


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:,.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def calibrate(k: int, seconds: float = 2.0, threads: int | None = None) -> float:
    """This machine's SGD ratings per second per thread at ``k`` with ``threads`` kernels running at once
    (default: one per core, as on a busy worker host), visiting a block as training does by default."""
    from concurrent.futures import ThreadPoolExecutor

    from pipeline.config import TrainConfig
    from tasks import kernels
    from tasks.blocks import BlockRatings
    from tasks.training import padded_rows, visiting_order

    rng = np.random.default_rng(0)
    n, n_users, n_items = 1_000_000, 20_000, 4_000
    keys = np.unique(rng.integers(0, n_users * n_items, n))
    block = BlockRatings((keys // n_items).astype(np.int32), (keys % n_items).astype(np.int32),
                         rng.integers(1, 6, keys.shape[0]).astype(np.float32))
    train = TrainConfig()
    visit = visiting_order(block, train.order, train.users_per_run, train.tile_items, seed=0)
    P = padded_rows(rng.normal(0, 0.1, (n_users, k)).astype(np.float32))
    Q = padded_rows(rng.normal(0, 0.1, (n_items, k)).astype(np.float32))

    def private_args() -> tuple:
        return (block.users, block.items, block.ratings, *visit, P.copy(), Q.copy(), np.zeros(n_users, np.float32),
                np.zeros(n_items, np.float32), np.float32(3.6), np.float32(0.005), np.float32(0.05),
                np.float32(0.01), True)

    def passes(deadline: float) -> int:
        """Kernel passes over private factors until ``deadline``; the kernel releases the GIL."""
        args, done = private_args(), 0
        while time.perf_counter() < deadline:
            kernels.sgd_block(*args)
            done += 1
        return done

    kernels.sgd_block(*private_args())  # compile, or load the cache
    threads = threads or os.cpu_count() or 1
    began = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        done = sum(pool.map(passes, [began + seconds] * threads))
    return done * block.n / threads / (time.perf_counter() - began)
