"""One worker's share of a DSGD epoch: its row blocks through every stratum, item blocks passed peer to peer.

Row block ``r`` belongs to worker ``r mod W`` for the whole run, with its user
state. At step ``t`` it updates block ``(r, (r + shifts[t]) mod d)``. The item
block ``c`` it has just updated is needed at step ``t + 1`` by row
``(c - shifts[t + 1]) mod d`` and nobody else, so it goes straight to that
row's owner. A block runs as soon as its row has finished the step before and
its item block has arrived: the stratum barrier holds block by block through the
data, never through the driver. Every block sees the same inputs whatever the
number of workers and threads, so the factors are the same bits.

After the last step every item block goes to every worker: each needs all of
them to measure its rows' validation error and to begin the next epoch.

Nothing here knows about Dask: the sender is a function and the mailbox a
thread-safe dict, so a share runs alike in a test, in-process and on a
cluster (``pipeline/training/exchange.py`` carries the blocks between workers there).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Literal, TypeVar, cast

import numpy as np

from funkflow.tasks.blocks import VALIDATION, RowBlock
from funkflow.tasks.checkpoint_io import read_factor_state, write_factor_state
from funkflow.tasks.schedule import STREAM_ITEM_INIT, STREAM_USER_INIT, block_order_seed, init_seed
from funkflow.tasks.training import (
    FactorState,
    Hyper,
    all_finite,
    init_factors,
    row_errors,
    sgd_update_in_place,
    training_copy,
    trimmed,
    updatable,
    warm_factors,
)

T = TypeVar("T")
Side = Literal["user", "item"]
# How often a waiting share looks whether it was called off.
POLL_SECONDS = 0.05


class ShareAborted(RuntimeError):
    """The epoch was called off on this worker: a peer was lost, the driver aborted, or the task moved."""


@dataclass(frozen=True)
class EpochPlan:
    """What every worker needs for its share of one epoch (plain values, cheap to ship).

    ``workers`` are the owners by index: row block ``r`` belongs to
    ``workers[r % len(workers)]``. ``start`` and ``end`` name the versions of
    the factors the epoch reads and writes in each worker's store; the store
    keeps those and ``keep`` and drops the rest. ``write_start``: a checkpoint
    directory URL to write the share of the *start* version to while the epoch
    runs (so a checkpoint costs the epoch after it no time on the critical path).
    ``k``: the model's factors a row; the columns past it are the kernels' padding, never sent between workers.
    """

    train_id: str
    run_id: str
    epoch: int
    shifts: tuple[int, ...]
    seed: int
    hyper: Hyper
    k: int
    workers: tuple[str | None, ...]
    start: str
    end: str
    keep: tuple[str, ...] = ()
    validate: bool = True
    write_start: str | None = None

    @property
    def d(self) -> int:
        return len(self.shifts)

    def rows_of(self, index: int) -> tuple[int, ...]:
        return rows_of(index, self.d, len(self.workers))

    def owner(self, row: int) -> int:
        return row % len(self.workers)

    def col(self, row: int, step: int) -> int:
        return (row + self.shifts[step]) % self.d

    def next_row(self, col: int, step: int) -> int:
        """The row that takes column block ``col`` at the step after ``step``."""
        return (col - self.shifts[step + 1]) % self.d


def rows_of(index: int, d: int, n_workers: int) -> tuple[int, ...]:
    """The row blocks worker ``index`` of ``n_workers`` owns."""
    return tuple(range(index, d, n_workers))


@dataclass(frozen=True)
class ShareOutcome:
    """What one worker's share of an epoch reports to the driver.

    ``sse`` (n_rows, d) float64: each block's sum of squared errors as the pass
    met them, by row (in the order of :meth:`EpochPlan.rows_of`) and step; ``inf`` where a factor went
    non-finite. ``errors`` (n_rows, 3, d, 3) float64: validation error sums
    under the epoch's final factors (see :func:`funkflow.tasks.training.row_errors`).
    ``files``: checkpoint files of the start version written, name → SHA-256.
    """

    sse: np.ndarray
    errors: np.ndarray
    files: dict[str, str]


@dataclass
class Version:
    """A worker's copy of the model at one point: its rows' user states and every item state, in the
    kernels' layout (:func:`funkflow.tasks.training.training_copy`), ``k`` factors of each row real."""

    k: int
    users: dict[int, FactorState] = field(default_factory=dict)
    items: dict[int, FactorState] = field(default_factory=dict)

    def trimmed(self) -> Version:
        """This version without the padding columns (for files and the driver)."""
        return Version(self.k, {r: trimmed(s, self.k) for r, s in self.users.items()},
                       {c: trimmed(s, self.k) for c, s in self.items.items()})


class Mailbox:
    """Item states that have arrived for one epoch run, by (step, column block); thread-safe.

    ``changed`` is also the lock under which a share updates its own progress, so
    one ``wait`` serves both an arrival and a neighbour thread's finished block.
    """

    def __init__(self) -> None:
        self.items: dict[tuple[int, int], FactorState] = {}
        self.changed = threading.Condition()
        self.failure: str | None = None

    def put(self, step: int, col: int, state: FactorState) -> None:
        with self.changed:
            self.items[step, col] = state
            self.changed.notify_all()

    def fail(self, reason: str) -> None:
        with self.changed:
            if self.failure is None:
                self.failure = reason
            self.changed.notify_all()

    def wait_for(self, pick: Callable[[dict[tuple[int, int], FactorState]], T | None],
                 check: Callable[[], None]) -> T:
        """Block until ``pick(items)``, called under the lock, returns something; raise if the run failed."""
        with self.changed:
            while True:
                if self.failure is not None:
                    raise ShareAborted(self.failure)
                found = pick(self.items)
                if found is not None:
                    return found
                self.changed.wait(POLL_SECONDS)
                check()


Send = Callable[[int, int, int, FactorState], None]
"""``send(worker_index, step, col, state)``: deliver an item state to that worker's mailbox for ``step``."""

_DONE = object()


def run_share(plan: EpochPlan, index: int, row_blocks: Mapping[int, RowBlock], start: Version, mailbox: Mailbox,
              send: Send, threads: int, check: Callable[[], None] = lambda: None) -> tuple[ShareOutcome, Version]:
    """Worker ``index``'s share of the epoch: every step of its row blocks, on ``threads`` threads.

    ``start`` must hold the user states of the worker's rows and every item
    state; the result's version holds the new user states and every final item
    state. ``start`` is left as it was: a row's user state and an item state are
    copied when the epoch first takes them up and then updated in place, block
    after block; an item state that came from a peer is the share's own.
    Raises :class:`ShareAborted` when the mailbox fails (a peer could not be
    reached, or the driver called the epoch off) or ``check`` raises.
    """
    rows = plan.rows_of(index)
    d, n_workers = plan.d, len(plan.workers)
    root = np.random.SeedSequence(plan.seed)
    users = {r: start.users[r] for r in rows}  # replaced by private copies at step 0
    step_of = dict.fromkeys(rows, 0)
    busy: set[int] = set()
    position = {r: j for j, r in enumerate(rows)}
    sse = np.zeros((len(rows), d))
    for r in rows:
        mailbox.put(0, plan.col(r, 0), start.items[plan.col(r, 0)])  # copied when taken up, below

    def next_block(items: dict[tuple[int, int], FactorState]) -> object:
        """The ready block of the lowest step (the one its peers wait for longest), or ``_DONE``."""
        ready = [(step_of[r], r) for r in rows
                 if r not in busy and step_of[r] < d and (step_of[r], plan.col(r, step_of[r])) in items]
        if ready:
            step, r = min(ready)
            busy.add(r)
            return step, r, items.pop((step, plan.col(r, step)))
        return _DONE if all(s == d for s in step_of.values()) else None

    def work() -> None:
        try:
            while (got := mailbox.wait_for(next_block, check)) is not _DONE:
                step, r, item = cast(tuple[int, int, FactorState], got)
                c = plan.col(r, step)
                user = training_copy(users[r]) if step == 0 else users[r]
                if step == 0 or not updatable(item):  # the start's own, or a peer's as it came off the wire
                    item = training_copy(item)
                sse[position[r], step] = sgd_update_in_place(
                    row_blocks[r], c, user, item, plan.hyper, block_order_seed(root, plan.epoch, step, r, c),
                    f"epoch {plan.epoch} stratum {step} block {r},{c}")
                # After the last step both states are final. A factor that overflowed in their last updates has
                # spoiled no error yet: report it through the sum, so the driver rolls this epoch back now
                # rather than the next. Each thread checks the pair it finished, beside its neighbours' SGD.
                if step == d - 1 and not all_finite([user, item]):
                    sse[position[r], step] = math.inf
                if step + 1 < d:
                    send(plan.owner(plan.next_row(c, step)), step + 1, c, item)
                else:
                    for w in range(n_workers):
                        send(w, d, c, item)
                with mailbox.changed:
                    users[r], step_of[r] = user, step + 1
                    busy.discard(r)
                    mailbox.changed.notify_all()
        except BaseException as exc:
            mailbox.fail(f"a peer thread failed: {exc!r}")
            raise

    with ThreadPoolExecutor(1, thread_name_prefix="funkflow-checkpoint") as writer, \
            ThreadPoolExecutor(threads, thread_name_prefix="funkflow-share") as pool:
        written = None if plan.write_start is None else \
            writer.submit(write_share, start, index, n_workers, plan.write_start)
        _first_real_error([pool.submit(work) for _ in range(threads)])
        items = mailbox.wait_for(lambda arrived: {c: arrived.pop((d, c)) for c in range(d)}
                                 if all((d, c) in arrived for c in range(d)) else None, check)
        # Peers send their final blocks trimmed; every worker keeps them in one layout, so that its
        # validation sums and its next epoch are the same bits whoever updated a block last.
        items = {c: state if updatable(state) else training_copy(state) for c, state in items.items()}
        errors = np.zeros((len(rows), 3, d, 3))
        if plan.validate:
            ordered = [items[c] for c in range(d)]
            for j, per_row in enumerate(pool.map(
                    lambda r: row_errors(row_blocks[r], users[r], ordered, plan.hyper.global_mean, (VALIDATION,)),
                    rows)):
                errors[j] = per_row
        files = {} if written is None else written.result()
    outcome = ShareOutcome(sse=sse, errors=errors, files=files)
    return outcome, Version(plan.k, users, items)


def write_share(version: Version, index: int, n_workers: int, url: str) -> dict[str, str]:
    """Write worker ``index``'s share of a checkpoint: its rows' user blocks and the item blocks
    ``c ≡ index (mod n_workers)``. Returns file name → SHA-256."""
    files: dict[str, str] = {}
    for r, state in version.users.items():
        files.update(write_factor_state(trimmed(state, version.k), url, f"user-{r:04d}"))
    for c in range(index, len(version.items), n_workers):
        files.update(write_factor_state(trimmed(version.items[c], version.k), url, f"item-{c:04d}"))
    return files


def _first_real_error(futures: list) -> None:
    """Wait for all; raise the first failure that is not a mere echo of another (:class:`ShareAborted`)."""
    errors = [f.exception() for f in futures]
    real = [e for e in errors if e is not None and not isinstance(e, ShareAborted)]
    echoed = [e for e in errors if e is not None]
    if real or echoed:
        raise (real or echoed)[0]


@dataclass(frozen=True)
class StartFrom:
    """Where a run's factors come from: a checkpoint, a previous model, or the seeded random start.

    ``user_sizes`` / ``item_sizes``: users per row block and items per column
    block. ``checkpoint``: the URL of a checkpoint directory to read. ``warm_dir``
    with ``user_previous`` / ``item_previous`` (one int array per block: each
    member's row in that model, or -1): start known users and items from that
    model.
    """

    k: int
    init_std: float
    seed: int
    user_sizes: tuple[int, ...]
    item_sizes: tuple[int, ...]
    checkpoint: str | None = None
    warm_dir: str | None = None
    user_previous: tuple[np.ndarray, ...] = ()
    item_previous: tuple[np.ndarray, ...] = ()


def start_state(source: StartFrom, side: Side, block: int) -> FactorState:
    """The starting state of one row block (``side="user"``) or column block (``"item"``)."""
    if source.checkpoint is not None:
        return read_factor_state(source.checkpoint, f"{side}-{block:04d}")
    user = side == "user"
    n = (source.user_sizes if user else source.item_sizes)[block]
    seed = init_seed(np.random.SeedSequence(source.seed), STREAM_USER_INIT if user else STREAM_ITEM_INIT, block)
    if source.warm_dir is None:
        return init_factors(n, source.k, source.init_std, seed)
    previous = (source.user_previous if user else source.item_previous)[block]
    return warm_factors(n, source.k, source.init_std, seed, source.warm_dir, side, previous)


def start_version(source: StartFrom, rows: tuple[int, ...]) -> Version:
    """A worker's starting version: the user states of ``rows`` and every item state."""
    return Version(source.k, users={r: training_copy(start_state(source, "user", r)) for r in rows},
                   items={c: training_copy(start_state(source, "item", c)) for c in range(len(source.item_sizes))})
