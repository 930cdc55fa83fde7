"""``funkflow plan``: size a cluster before renting it.

For a number of ratings, users and items, k, d and workers it prints the
memory each worker needs (its rating blocks, its user factors, every item
block), the bytes that move per epoch (item blocks between workers, a
checkpoint to storage) and an estimated epoch time from the SGD kernel's
throughput measured on this machine (a two-second calibration with one kernel
per core at once, since threads that share a host slow each other; pass
``--rate`` to use a figure measured elsewhere). The model of an epoch, after
the design in docs/design.md:

    d steps, each max(the step's blocks spread over the threads,
                      one block + handing its item block to the next worker)
    + the final item blocks to every worker + a validation pass at 4× the SGD rate
    + a driver round trip and one scheduler task per worker

So an epoch is compute-bound while a block takes longer than a hand-off, and
latency-bound beyond: with ``d`` growing with the workers, there is a worker
count past which an epoch gets no faster, which the plan names.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, replace

import numpy as np

BYTES_PER_RATING = 12        # user int32, item int32, rating float32 in a loaded block
LOAD_PEAK = 3.0              # Parquet read + sort temporaries while a row block loads
BALANCE = 0.85               # heavy-tailed popularity: d hashed blocks are not quite equal
# The cost of handing one item block to the next worker, and of an epoch's driver round trip with its
# tasks, fitted by `python scripts/bench_scale.py` on the 2-worker rows (epoch on Dask minus the
# in-process epoch over the workers, against d). On this 2-core VM the hand-off waits for a core the
# kernels hold, so it is pessimistic for hosts with cores to spare; --hop-ms takes a figure measured there.
HOP_SECONDS = 0.010
EPOCH_SECONDS = 0.005
TASK_SECONDS = 0.0002        # the scheduler's share of one task
BANDWIDTH = 1.0e9            # bytes/s between workers (10 GbE, roughly); --bandwidth
# train.d: auto gives each thread two blocks per stratum while a block keeps this many ratings.
# Measured on 2 workers: 100M ratings, d=4 (5.6M a block) 2.93 s an epoch, d=2 3.18 s, d=8 3.99 s.
MIN_BLOCK_RATINGS = 4_000_000
# ... and, on one worker (item blocks pass between its threads by reference), makes item blocks no larger
# than a thread's share of a cache while a block keeps MIN_CACHED_BLOCK_RATINGS: on sparse data every rating
# of a block meets a random row of its item block. 2M users × 500k items, 17M training ratings, k=50 (130 MB
# of item factors), one worker with 2 threads: d=8 (16 MB item blocks) 0.76, 0.77, 0.60 s an epoch against
# 0.83, 1.11, 0.72 s for d=2, alternated. Between two worker processes, where each hand-off serialises a
# block, d=8 ran 0.94 and 1.07 s against 0.74 and 1.01 s.
ITEM_BLOCK_BYTES = 16 * 2**20
MIN_CACHED_BLOCK_RATINGS = 200_000


def state_bytes(k: int) -> int:
    """Bytes of one row's factors and bias as a worker holds them: padded to whole 16 floats."""
    from funkflow.tasks.training import ALIGN_FLOATS

    return (-(-k // ALIGN_FLOATS) * ALIGN_FLOATS + 1) * 4


def auto_d(n_ratings: int, threads: int, n_items: int = 0, k: int = 0, workers: int = 1) -> int:
    """The ``train.d`` that ``auto`` picks for ``n_ratings`` on ``threads`` threads of ``workers`` workers.

    Two blocks per thread and stratum even out unequal blocks, as long as each block
    keeps ``MIN_BLOCK_RATINGS``; below that, one, so a block's SGD stays well above
    the cost of handing its item block on. Never fewer blocks than threads: a thread
    without a block idles. On one worker, a catalogue of ``n_items`` whose factors (at
    ``k``) make item blocks larger than ``ITEM_BLOCK_BYTES`` gets more blocks, a multiple
    of the threads, while a block keeps ``MIN_CACHED_BLOCK_RATINGS``.
    """
    threads = max(threads, 1)
    d = 2 * threads if n_ratings / (2 * threads) ** 2 >= MIN_BLOCK_RATINGS else threads
    item_bytes = n_items * state_bytes(k) if workers == 1 else 0
    while item_bytes / d > ITEM_BLOCK_BYTES and n_ratings / (d + threads) ** 2 >= MIN_CACHED_BLOCK_RATINGS:
        d += threads
    return d


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
    hop: float = HOP_SECONDS
    bandwidth: float = BANDWIDTH

    @property
    def parallel(self) -> int:
        return min(self.workers * self.threads, self.d)

    @property
    def state_bytes(self) -> int:
        return state_bytes(self.k)

    @property
    def row_bytes(self) -> int:
        """Bytes of one row's factors and bias as they are sent and written: ``k`` floats and the bias."""
        return (self.k + 1) * 4

    def rows(self) -> list[tuple[str, str]]:
        blocks_per_worker = math.ceil(self.d / self.workers)
        ratings_bytes = self.ratings / self.d * blocks_per_worker * BYTES_PER_RATING
        users_bytes = self.users / self.d * blocks_per_worker * self.state_bytes * 2  # the epoch's start and end
        items_bytes = self.items * self.state_bytes * 2                                # every item block, twice
        checkpoint = (self.users + self.items) * self.row_bytes
        sgd, handoffs, rest = self.epoch_parts()
        fastest = self.fastest_workers()
        return [
            ("ratings per worker (loaded blocks)", _bytes(ratings_bytes)),
            ("  peak while a row block loads", _bytes(ratings_bytes + self.ratings / self.d * BYTES_PER_RATING
                                                      * (LOAD_PEAK - 1))),
            ("user factors per worker", _bytes(users_bytes)),
            ("item factors per worker", _bytes(items_bytes)),
            ("item factors moved per epoch", _bytes(self.moved_bytes())),
            ("checkpoint per epoch", _bytes(checkpoint)),
            ("kernel rate per thread (this machine)", f"{self.rate / 1e6:.1f}M ratings/s"),
            ("parallel blocks", f"{self.parallel} (d={self.d}, {self.workers}×{self.threads} threads)"),
            ("scheduler tasks per epoch", f"{self.workers}"),
            ("estimated epoch time", f"{sgd + handoffs + rest:.2f} s (SGD {sgd:.2f}, waiting for item blocks "
                                     f"{handoffs:.2f}, validation and coordination {rest:.2f})"),
            ("fastest at", f"{fastest.workers} workers ({fastest.epoch_seconds():.2f} s an epoch, d={fastest.d}); "
                           "more workers make an epoch slower"),
        ]

    def moved_bytes(self) -> float:
        """Item blocks sent between workers in an epoch: a hand-off per block whose next row lives
        elsewhere, and every final block to every other worker."""
        if self.workers == 1:
            return 0.0
        share_elsewhere = (self.workers - 1) / self.workers
        return self.items * self.row_bytes * (self.d * share_elsewhere + self.workers - 1)

    def epoch_parts(self) -> tuple[float, float, float]:
        """Estimated seconds of an epoch's SGD, of waiting for item blocks beyond it, and of the rest."""
        train = self.ratings * self.train_fraction
        sgd = train / (self.rate * self.parallel * BALANCE)
        block = train / self.d ** 2 / self.rate
        handoff = 0.0 if self.workers == 1 else self.hop + self.items / self.d * self.row_bytes / self.bandwidth
        steps = self.d * max(sgd / self.d, block + handoff)
        gather = 0.0 if self.workers == 1 else self.hop + self.items * self.row_bytes / self.bandwidth
        validation = self.ratings * (1 - self.train_fraction) / (4 * self.rate * self.parallel)
        return sgd, steps - sgd, gather + validation + EPOCH_SECONDS + self.workers * TASK_SECONDS

    def epoch_seconds(self) -> float:
        return sum(self.epoch_parts())

    def fastest_workers(self) -> Plan:
        """The plan at the worker count (a power of two up to 4096, d as ``auto`` picks) with the fastest
        epoch: past it, hand-offs on the critical path outgrow the SGD each worker saves."""
        plans = [replace(self, workers=w, d=auto_d(self.ratings, w * self.threads, self.items, self.k, w))
                 for w in (2 ** i for i in range(13))]
        return min(plans, key=Plan.epoch_seconds)


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

    from funkflow.pipeline.running.config import TrainConfig
    from funkflow.tasks import kernels
    from funkflow.tasks.blocks import BlockRatings
    from funkflow.tasks.idmap import sorted_distinct
    from funkflow.tasks.training import padded_rows, visiting_order

    rng = np.random.default_rng(0)
    n, n_users, n_items = 1_000_000, 20_000, 4_000
    keys = sorted_distinct(rng.integers(0, n_users * n_items, n))
    block = BlockRatings((keys // n_items).astype(np.int32), (keys % n_items).astype(np.int32),
                         np.asarray(rng.integers(1, 6, keys.shape[0]), dtype=np.float32))
    train = TrainConfig()
    visit = visiting_order(block, train.order, train.users_per_run, train.tile_items, seed=0)
    P = padded_rows(rng.normal(0, 0.1, (n_users, k)).astype(np.float32))
    Q = padded_rows(rng.normal(0, 0.1, (n_items, k)).astype(np.float32))

    def private_args() -> tuple:
        return (*visit, P.copy(), Q.copy(), np.zeros(n_users, np.float32),
                np.zeros(n_items, np.float32), np.float32(3.6), np.float32(0.005), np.float32(0.05),
                np.float32(0.01), True, kernels.PREFETCH_AHEAD)

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
