"""``funkflow plan``: size a cluster before renting it.

For a number of ratings, users and items, k, d and workers it prints what each
worker holds (its rating blocks, its share of the user and of the item factors,
the blocks in flight), the bytes each worker receives per epoch, whether the
hand-offs hide behind computation, and an estimated epoch time from the SGD
kernel's throughput measured on this machine (a two-second calibration with one
kernel per core at once, since threads that share a host slow each other; pass
``--rate`` to use a figure measured elsewhere). The model of an epoch, after
docs/design.md:

    worker i owns d/W consecutive rows, cut into T lanes of n rows each;
    a lane's step is its n blocks, lowest row first, the highest waiting for the
    column block from the next lane: the period of a step is
        τ = max(n·b, x, b + (h + x)/(2T))   (n ≥ 2)
        τ = max(x, b + (h + x)/T)          (one row a lane)
    with b a block's SGD, h the hand-off's latency and x its transfer (a worker
    receives one column block a step); an epoch is d periods, the hand-off to
    the next epoch and a driver round trip.

So the hand-offs are hidden while a lane has rows to work on meanwhile
(h + x ≤ 2T(n−1)·b) and the network keeps up (x ≤ n·b); past that the epoch
waits for the network, and since d is a function of the data, at most d lanes
can work at once. The plan names the worker count past which an epoch gets no
faster.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, replace

import numpy as np

from funkflow.pipeline.core.errors import ConfigError

BYTES_PER_RATING = 12        # user int32, item int32, rating float32 in a loaded block
LOAD_PEAK = 3.0              # Parquet read + sort temporaries while a row block loads
BALANCE = 0.85               # heavy-tailed popularity: d hashed blocks are not quite equal
VALIDATION_COST = 0.25       # a validation rating measured beside the SGD costs about a quarter of an update
# The latency of handing a column block to a worker on another host, beyond its transfer: a Dask RPC one way
# between two idle worker processes on loopback here, 0.13-0.18 ms (`python scripts/bench_scale.py` measures it;
# funkflow plan --hop-ms takes another figure).
HOP_SECONDS = 0.00015
EPOCH_SECONDS = 0.005        # the driver's round trip of an epoch
TASK_SECONDS = 0.0002        # the scheduler's share of one task
BANDWIDTH = 1.0e9            # bytes/s between workers (10 GbE, roughly); --bandwidth
# train.d: auto makes as many blocks as keep this many ratings each, so that the data serve clusters of up to d
# worker threads while a block's SGD stays well above its fixed costs (a kernel call, its column block, the
# lane's bookkeeping): docs/benchmarks.md, "Netflix shape, one worker with 2 threads".
MIN_BLOCK_RATINGS = 20_000


def state_bytes(k: int) -> int:
    """Bytes of one row's factors and bias as a worker holds them: padded to whole 16 floats."""
    from funkflow.tasks.training import ALIGN_FLOATS

    return (-(-k // ALIGN_FLOATS) * ALIGN_FLOATS + 1) * 4


def auto_d(n_ratings: int) -> int:
    """The ``train.d`` that ``auto`` picks for ``n_ratings``: the largest power of two whose d² blocks keep
    ``MIN_BLOCK_RATINGS`` each (at least one block). A function of the data alone, never of the cluster, so
    the default gives the same factors on any number of workers and threads."""
    d = 1
    while n_ratings / (2 * d) ** 2 >= MIN_BLOCK_RATINGS:
        d *= 2
    return d


def check_d(d: int, n_ratings: int) -> None:
    """Refuse a ``train.d`` whose d² blocks outnumber the ratings: most blocks would be empty, and the
    blocks' bookkeeping (which grows as d²) would outweigh the data (d=3000 for 500 ratings took 5.7 GB)."""
    most = max(1, math.isqrt(n_ratings))
    if d > most:
        raise ConfigError(f"train.d={d} makes {d * d:,} blocks for {n_ratings:,} ratings: at most d={most} "
                          f"(no more blocks than ratings), or train.d: auto (d={auto_d(n_ratings)} here)")


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
    def rows_per_worker(self) -> int:
        return math.ceil(self.d / self.workers)

    @property
    def rows_per_lane(self) -> int:
        return math.ceil(self.rows_per_worker / self.threads)

    @property
    def lanes(self) -> int:
        return min(self.workers * self.threads, self.d)

    @property
    def state_bytes(self) -> int:
        return state_bytes(self.k)

    @property
    def row_bytes(self) -> int:
        """Bytes of one row's factors and bias as they are sent and written: ``k`` floats and the bias."""
        return (self.k + 1) * 4

    def block_seconds(self) -> float:
        """One block's SGD and validation on one thread, a heavier block than the mean."""
        work = self.ratings * (self.train_fraction + (1 - self.train_fraction) / 3 * VALIDATION_COST)
        return work / self.d ** 2 / (self.rate * BALANCE)

    def transfer_seconds(self) -> float:
        """One column block's bytes over the network (nothing between lanes of one worker)."""
        return 0.0 if self.workers == 1 else self.items / self.d * self.row_bytes / self.bandwidth

    def hand_off_seconds(self) -> float:
        """One column block to the next worker: the latency and the transfer."""
        return 0.0 if self.workers == 1 else self.hop + self.transfer_seconds()

    def hidden(self) -> bool:
        """Whether a lane computes while its next column block is on its way, and the network keeps up."""
        b, n = self.block_seconds(), self.rows_per_lane
        return self.hand_off_seconds() <= 2 * self.threads * (n - 1) * b and self.transfer_seconds() <= n * b

    def period(self) -> float:
        """The time of one step of the ring (see the module's docstring)."""
        b, n, x, hop = self.block_seconds(), self.rows_per_lane, self.transfer_seconds(), self.hand_off_seconds()
        if n == 1:
            return max(x, b + hop / self.threads)
        return max(n * b, x, b + hop / (2 * self.threads))

    def epoch_parts(self) -> tuple[float, float, float]:
        """Estimated seconds of an epoch's SGD on its busiest lane, of waiting for column blocks beyond it,
        and of the rest (the hand-off to the next epoch, the driver's round trip, the scheduler)."""
        sgd = self.d * self.rows_per_lane * self.block_seconds()
        waiting = self.d * self.period() - sgd
        return sgd, waiting, self.hand_off_seconds() + EPOCH_SECONDS + self.workers * TASK_SECONDS

    def epoch_seconds(self) -> float:
        return sum(self.epoch_parts())

    def received_bytes(self) -> float:
        """Column blocks a worker receives in an epoch: every block but one of its own enters it once (d − 1),
        and those it starts the next epoch with come from another worker (W − 1)/W of the time."""
        if self.workers == 1:
            return 0.0
        blocks = self.d - 1 + self.rows_per_worker * (self.workers - 1) / self.workers
        return blocks * self.items / self.d * self.row_bytes

    def item_bytes(self) -> tuple[float, float]:
        """Item factors a worker holds at once: its share (the column blocks its rows are working on; the
        version the epoch started from is dropped once copied and written to the checkpoint, which a rollback
        reads back), and the blocks in flight (at most one a lane waiting in the mailbox)."""
        block = self.items / self.d * self.state_bytes
        return self.rows_per_worker * block, min(self.threads, self.rows_per_worker) * block

    def rows(self) -> list[tuple[str, str]]:
        ratings_bytes = self.ratings / self.d * self.rows_per_worker * BYTES_PER_RATING
        users_bytes = self.users / self.d * self.rows_per_worker * self.state_bytes
        q_bytes = self.items * self.row_bytes
        held, in_flight = self.item_bytes()
        checkpoint = (self.users + self.items) * self.row_bytes
        sgd, waiting, rest = self.epoch_parts()
        fastest = self.fastest_workers()
        return [
            ("ratings per worker (loaded blocks)", _bytes(ratings_bytes)),
            ("  peak while a row block loads", _bytes(ratings_bytes + self.ratings / self.d * BYTES_PER_RATING
                                                      * (LOAD_PEAK - 1))),
            ("user factors per worker", _bytes(users_bytes)),
            ("item factors per worker", f"{_bytes(held)} ({held / (self.items * self.state_bytes):.3f} Q) "
                                        f"and {_bytes(in_flight)} in flight"),
            ("received per worker per epoch", f"{_bytes(self.received_bytes())} "
                                              f"({self.received_bytes() / q_bytes:.2f} Q)"),
            ("checkpoint per epoch", _bytes(checkpoint)),
            ("kernel rate per thread (this machine)", f"{self.rate / 1e6:.1f}M ratings/s"),
            ("parallel lanes", f"{self.lanes} (d={self.d}, {self.workers}×{self.threads} threads, "
                               f"{self.rows_per_lane} rows a lane)"),
            ("hand-offs hidden", f"{'yes' if self.hidden() else 'no'} ({self.hand_off_seconds() * 1e3:.2f} ms "
                                 f"against {self.block_seconds() * 1e3:.2f} ms a block)"),
            ("scheduler tasks per epoch", f"{self.workers}"),
            ("estimated epoch time", f"{sgd + waiting + rest:.2f} s (SGD {sgd:.2f}, waiting for column blocks "
                                     f"{waiting:.2f}, hand-off and coordination {rest:.2f})"),
            ("fastest at", f"{fastest.workers} workers ({fastest.epoch_seconds():.2f} s an epoch, d={fastest.d}); "
                           "more workers make an epoch no faster"),
        ]

    def fastest_workers(self) -> Plan:
        """The plan at the worker count (a power of two up to d) with the fastest epoch: past it, waiting for
        column blocks outgrows the SGD each worker saves, and no more than d lanes can work at once."""
        plans = [replace(self, workers=w) for w in (2 ** i for i in range(13)) if w <= self.d]
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

    from funkflow.pipeline.core.config import TrainConfig
    from funkflow.tasks import kernels
    from funkflow.tasks.blocks import BlockRatings
    from funkflow.tasks.idmap import sorted_distinct
    from funkflow.tasks.training import padded_rows, visiting_layout

    rng = np.random.default_rng(0)
    n, n_users, n_items = 1_000_000, 20_000, 4_000
    keys = sorted_distinct(rng.integers(0, n_users * n_items, n))
    block = BlockRatings((keys // n_items).astype(np.int32), (keys % n_items).astype(np.int32),
                         np.asarray(rng.integers(1, 6, keys.shape[0]), dtype=np.float32))
    train = TrainConfig()
    layout = visiting_layout(block, train.order, train.users_per_run, train.tile_items)
    P = padded_rows(rng.normal(0, 0.1, (n_users, k)).astype(np.float32))
    Q = padded_rows(rng.normal(0, 0.1, (n_items, k)).astype(np.float32))

    def private_args() -> tuple:
        return (*layout, np.uint64(0), P.copy(), Q.copy(), np.zeros(n_users, np.float32),
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
