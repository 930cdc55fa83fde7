"""One worker's share of a rotation: its row blocks meet every column block once, handed peer to peer.

The schedule is the ring of :mod:`funkflow.tasks.schedule`: at step ``t`` row
block ``r`` takes the column block at ring position ``(r + t) mod d``, so a
column block goes from row ``r`` to row ``r - 1`` between steps. Worker ``i`` of
``W`` owns the contiguous rows :func:`rows_of` (``i·d/W`` up to ``(i+1)·d/W``)
and, at the start of an epoch, the column blocks at the ring positions of its
rows: the only item factors it ever holds are those and the ones passing
through. A column block stays on a worker for as many steps as it has rows and
enters each worker once an epoch; after its last visit it goes straight to the
worker whose row takes it first in the next epoch. Nothing is gathered.

Inside a worker its rows are cut into *lanes*, one per thread, each a
contiguous range. Each row needs only the row above it to be a step ahead,
and only a lane's highest row waits for a block from another lane (or
worker), so a lane runs whichever of its rows is ready, in *strips* of steps
as long as half its rows: within a strip the highest ready row first, each
row taking the strip's column blocks one after another while its user block
is in cache (on Netflix's 480k users at d=128, a user row was otherwise read
from memory for about 1.4 ratings). While the highest row waits for a block
the rows below run on, so a hand-off overlaps the lane's other work. A lane
of one row runs step by step.

A block runs once its row has finished the step before and its column block has
arrived, which are exactly the inputs a global stratum barrier would give it,
so the factors are the same bits whatever the number of workers and threads.

Nothing here knows about Dask: the sender is a function and the mailbox a
thread-safe dict, so a share runs alike in a test, in-process and on a cluster
(``pipeline/training/exchange.py`` carries the blocks between workers there).
"""

from __future__ import annotations

import heapq
import math
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Literal, TypeVar

import numpy as np

from funkflow.tasks.artifacts import FileEntry
from funkflow.tasks.blocks import TRAIN, VALIDATION, RowBlock
from funkflow.tasks.checkpoint_io import flush_factor_files, read_factor_state, write_factor_state
from funkflow.tasks.model_files import block_stem, warm_factors
from funkflow.tasks.schedule import STREAM_ITEM_INIT, STREAM_USER_INIT, block_seeds, column_at, first_row, init_seed
from funkflow.tasks.training import (
    BlockUpdateError,
    Buffers,
    FactorState,
    Hyper,
    all_finite,
    block_error_sums,
    init_factors,
    sgd_update_in_place,
    training_copy,
    trimmed,
    updatable,
)

T = TypeVar("T")
Side = Literal["user", "item"]
# How often a waiting lane looks whether it was called off.
POLL_SECONDS = 0.05


class ShareAborted(RuntimeError):
    """The epoch was called off on this worker: a peer was lost, the driver aborted, or the task moved."""


def rows_of(index: int, d: int, n_workers: int) -> range:
    """The row blocks worker ``index`` of ``n_workers`` owns: a contiguous range (empty when ``d`` is smaller
    than the number of workers)."""
    return range(index * d // n_workers, (index + 1) * d // n_workers)


def owner_of(row: int, d: int, n_workers: int) -> int:
    """The worker that owns row block ``row`` (the inverse of :func:`rows_of`)."""
    return (row * n_workers + n_workers - 1) // d


def lanes_of(rows: range, threads: int) -> list[range]:
    """``rows`` cut into at most ``threads`` contiguous lanes of nearly equal length, lowest rows first."""
    n = min(max(threads, 1), len(rows))
    return [range(rows.start + j * len(rows) // n, rows.start + (j + 1) * len(rows) // n) for j in range(n)]


@dataclass(frozen=True)
class EpochPlan:
    """What every worker needs for its share of one epoch (plain values, cheap to ship).

    ``ring`` / ``next_ring``: the column block at each ring position in this epoch and the next
    (:func:`funkflow.tasks.schedule.ring`); after its last visit a column block goes to the owner of its
    first row in ``next_ring``. ``workers``: the owners by index (:func:`rows_of`). ``start`` and ``end``
    name the versions of the factors the epoch reads and writes in each worker's store; the store keeps
    those and ``keep`` and drops the rest. ``write_start``: a checkpoint directory URL to write this
    worker's share of the *start* version to while the epoch runs. ``release_start``: the driver can read the
    start version back (from that checkpoint, or from where the run started) for a rollback, so the epoch
    updates it in place, each row once its blocks are written, and a worker holds its share of the factors
    once, not twice. ``k``: the model's factors a row; the columns past it are the kernels' padding, never
    sent between workers.
    """

    train_id: str
    run_id: str
    epoch: int
    ring: tuple[int, ...]
    next_ring: tuple[int, ...]
    seed: int
    hyper: Hyper
    k: int
    workers: tuple[str | None, ...]
    start: str
    end: str
    keep: tuple[str, ...] = ()
    validate: bool = True
    write_start: str | None = None
    release_start: bool = False

    @property
    def d(self) -> int:
        return len(self.ring)

    def rows_of(self, index: int) -> range:
        return rows_of(index, self.d, len(self.workers))

    def owner(self, row: int) -> int:
        return owner_of(row, self.d, len(self.workers))


@dataclass(frozen=True)
class ShareOutcome:
    """What one worker's share of an epoch reports to the driver.

    ``sse`` (n_rows, d) float64: each block's sum of squared errors as the pass met them, ``[row, col]``
    (rows in the order of :meth:`EpochPlan.rows_of`, columns by label); ``inf`` where a factor went
    non-finite. ``validation`` (n_rows, d, 3) float64: ``(Σe², Σ|e|, n)`` of each block's validation
    ratings, measured when the rotation met the block, just after its update. ``files``: the checkpoint
    files of the start version written meanwhile.
    """

    sse: np.ndarray
    validation: np.ndarray
    files: dict[str, FileEntry]


@dataclass
class Version:
    """A worker's part of the model at one point: its rows' user states and the column blocks it holds then
    (the ones at its rows' ring positions), in the kernels' layout (:func:`training_copy`), ``k`` factors
    of each row real."""

    k: int
    users: dict[int, FactorState] = field(default_factory=dict)
    items: dict[int, FactorState] = field(default_factory=dict)


class Mailbox:
    """Column blocks that have arrived for one epoch run, by (step, column block); thread-safe.

    Step ``d`` holds the column blocks handed on to the next epoch.
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

    def poll(self, step: int, col: int) -> FactorState | None:
        """Column block ``col`` for ``step``, removed, if it has arrived; else None. Raises if the run failed."""
        with self.changed:
            if self.failure is not None:
                raise ShareAborted(self.failure)
            return self.items.pop((step, col), None)

    def take(self, step: int, col: int, check: Callable[[], None]) -> FactorState:
        """Block until column block ``col`` has arrived for ``step``, and remove it; raise if the run failed
        or ``check`` raises."""
        with self.changed:
            while True:
                if self.failure is not None:
                    raise ShareAborted(self.failure)
                found = self.items.pop((step, col), None)
                if found is not None:
                    return found
                self.changed.wait(POLL_SECONDS)
                check()


Send = Callable[[int, int, int, FactorState], None]
"""``send(worker_index, step, col, state)``: deliver a column block to that worker's mailbox for ``step``."""


def _own_layout(state: FactorState, buffers: Buffers | None) -> FactorState:
    """``state`` in the kernels' layout: as it is if it already is, else a private padded copy (a block that
    came off the wire), so that every worker computes on the same layout whoever sent it."""
    return state if updatable(state) else training_copy(state, buffers)


Visit = Callable[[int, int, int, FactorState], None]
"""``visit(row, col, step, item_state)``: the work of block (row, col) at ``step``, with the column block's
state (in the kernels' layout; a visit that updates it does so in place)."""


def rotate(ring_order: tuple[int, ...], workers: int, index: int, items: Mapping[int, FactorState],
           mailbox: Mailbox, send: Send, threads: int, visit: Visit, last_visit: Visit,
           check: Callable[[], None] = lambda: None, buffers: Buffers | None = None, private: bool = True) -> None:
    """Pass every column block once past the rows of worker ``index`` of ``workers``, in the ring's order.

    ``items``: the column blocks at the ring positions of this worker's rows, which its rows take first.
    Each block (row, col) gets ``visit`` in ring order; after a column block's last visit of the rotation
    (at step ``d - 1``), ``last_visit`` gets it instead of the next row. At step 0 a lane takes its rows'
    column blocks from ``items``: with ``private``, through a copy in the kernels' layout (made there, so
    lanes copy side by side; into ``buffers`` where it holds arrays of the shape), for visits that update
    them; else as they are, once in that layout. A column block that moves to a row of another lane is sent
    (``send``) to that row's owner, which may be this worker; the mailbox takes what comes. Raises
    :class:`ShareAborted` when the mailbox fails or ``check`` raises.
    """
    d = len(ring_order)
    rows = rows_of(index, d, workers)

    def lane(lane_rows: range) -> None:
        step = dict.fromkeys(lane_rows, 0)  # the next step of each row
        carried: dict[tuple[int, int], FactorState] = {}  # (step, row) → the column block that row takes then
        strip = max(1, len(lane_rows) // 2)

        def priority(r: int) -> tuple[int, int]:
            """Strips of steps, in a strip the highest ready row first: a row takes several column blocks
            in a row while its user block is in cache. One row a lane: the lowest first, so that the block
            another lane waits for leaves soonest."""
            return (step[r] // strip, -r) if strip > 1 else (step[r], r)

        ready = [priority(r) for r in lane_rows]
        heapq.heapify(ready)
        outside = [r for r in lane_rows if (r + 1) % d not in lane_rows]  # the highest row, if it waits on others
        queued = set(lane_rows)

        def push_if_ready(r: int) -> None:
            if r in queued or step[r] == d:
                return
            key = (step[r], r)
            if key not in carried and r in outside:
                arrived = mailbox.poll(step[r], column_at(ring_order, r, step[r]))
                if arrived is None:
                    return
                carried[key] = _own_layout(arrived, buffers)
            if key in carried:
                heapq.heappush(ready, priority(r))
                queued.add(r)

        try:
            for _ in range(len(lane_rows) * d):
                if not ready:  # every row waits on the one whose block comes from outside the lane
                    r = outside[0]
                    arrived = mailbox.take(step[r], column_at(ring_order, r, step[r]), check)
                    carried[step[r], r] = _own_layout(arrived, buffers)
                    heapq.heappush(ready, priority(r))
                    queued.add(r)
                r = abs(heapq.heappop(ready)[1])
                queued.discard(r)
                t = step[r]
                c = column_at(ring_order, r, t)
                if t == 0:
                    item = training_copy(items[c], buffers) if private else _own_layout(items[c], buffers)
                else:
                    item = carried.pop((t, r))
                step[r] = t + 1
                if t + 1 == d:
                    last_visit(r, c, t, item)
                    continue
                visit(r, c, t, item)
                below = (r - 1) % d
                if below in lane_rows:
                    carried[t + 1, below] = item
                    push_if_ready(below)
                else:
                    send(owner_of(below, d, workers), t + 1, c, item)
                push_if_ready(r)
                for waiting in outside:
                    push_if_ready(waiting)
        except BaseException as exc:
            mailbox.fail(f"a peer thread failed: {exc!r}")
            raise

    with ThreadPoolExecutor(max(min(threads, len(rows)), 1), thread_name_prefix="funkflow-lane") as pool:
        _first_real_error([pool.submit(lane, lane_rows) for lane_rows in lanes_of(rows, threads)])


def run_share(plan: EpochPlan, index: int, row_blocks: Mapping[int, RowBlock], start: Version, mailbox: Mailbox,
              send: Send, threads: int, check: Callable[[], None] = lambda: None,
              buffers: Buffers | None = None) -> tuple[ShareOutcome, Version]:
    """Worker ``index``'s share of the epoch: every step of its rows, on up to ``threads`` lanes (:func:`rotate`).

    ``start`` must hold the user states of the worker's rows and the column blocks at their ring positions.
    The result's version holds the new user states and the column blocks this worker starts the next epoch
    with. Where the start version can be read back (``plan.release_start``: from the checkpoint written of it
    meanwhile, or from where the run began), its states are updated in place, each row's once its blocks are
    written, and ``start`` is emptied: a worker holds its share of the factors once. Otherwise ``start`` is
    left as it was: a state is copied when the epoch first takes it up (into ``buffers`` where it holds
    arrays of the shape) and the copy updated in place, block after block. Raises :class:`ShareAborted` when
    the mailbox fails (a peer could not be reached, or the driver called the epoch off) or ``check`` raises.
    """
    rows = plan.rows_of(index)
    d = plan.d
    seeds = block_seeds(np.random.SeedSequence(plan.seed), plan.epoch, d)
    next_owner = {c: plan.owner(r) for c, r in first_row(plan.next_ring).items()}
    sse = np.zeros((len(rows), d))
    validation = np.zeros((len(rows), d, 3))
    users: dict[int, FactorState] = {}
    in_place = plan.release_start

    def update(r: int, c: int, t: int, item: FactorState) -> None:
        j = r - rows.start
        if t == 0:  # the row's own state for the epoch, taken up by its lane (its column block just before)
            if not in_place:
                users[r] = training_copy(start.users[r], buffers)
            else:
                if written is not None:
                    written.wait_for(r, check)
                users[r] = _own_layout(start.users[r], buffers)
        try:
            block = row_blocks[r]
            sse[j, c] = sgd_update_in_place(block.split(TRAIN)[c], users[r], item, plan.hyper, int(seeds[r, c]))
            if plan.validate:
                validation[j, c] = block_error_sums(block.split(VALIDATION)[c], users[r], item,
                                                    plan.hyper.global_mean)
        except Exception as exc:
            raise BlockUpdateError(f"SGD update failed at epoch {plan.epoch} step {t} block {r},{c}") from exc

    def update_and_hand_on(r: int, c: int, t: int, item: FactorState) -> None:
        update(r, c, t, item)
        # The last visit of both states. A factor that overflowed in their last updates has spoiled no error
        # yet: report it through the sum, so the driver rolls this epoch back now rather than the next.
        if not all_finite([users[r], item]):
            sse[r - rows.start, c] = math.inf
        send(next_owner[c], d, c, item)

    written = None
    if plan.write_start is not None:
        written = _RowWriter(start, plan.write_start, plan.ring, _first_visits(rows, threads))
    try:
        rotate(plan.ring, len(plan.workers), index, start.items, mailbox, send, threads, update, update_and_hand_on,
               check, buffers, private=not in_place)
        held = {c: _own_layout(mailbox.take(d, c, check), buffers) for c in (plan.next_ring[r] for r in rows)}
        files = {} if written is None else written.result()
    finally:
        if written is not None:
            written.close()
        if in_place:  # its states are this epoch's now
            start.users.clear()
            start.items.clear()
    return ShareOutcome(sse, validation, files), Version(plan.k, {r: users[r] for r in rows}, held)


def _first_visits(rows: range, threads: int) -> list[int]:
    """``rows`` in the order their lanes first take them up (:func:`rotate`): lane by lane in turn, each lane's
    highest row first where it runs in strips, its lowest first where it runs step by step."""
    lanes = [list(lane)[::-1] if len(lane) // 2 > 1 else list(lane) for lane in lanes_of(rows, threads)]
    return [lane[j] for j in range(max(map(len, lanes), default=0)) for lane in lanes if j < len(lane)]


class _RowWriter:
    """Writes a version's blocks as a checkpoint at ``url`` in a thread of its own, row by row in ``order``: a
    row's user block and the column block it takes first (at its ring position). A lane waits, if at all, for
    its own row's files before it updates that row in place."""

    def __init__(self, version: Version, url: str, ring_order: tuple[int, ...], order: list[int]) -> None:
        self.files: dict[str, FileEntry] = {}
        self.written = {r: threading.Event() for r in order}
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="funkflow-checkpoint")
        self._done = self._pool.submit(self._write, version, url, ring_order, order)

    def _write(self, version: Version, url: str, ring_order: tuple[int, ...], order: list[int]) -> None:
        try:
            # A lane may update a row once its files are written; they are flushed to disk after the last,
            # before the share reports them (the driver's manifest, written after, is what makes them count).
            for r in order:
                self.files.update(write_state("user", r, version.users[r], version.k, url, durable=False))
                self.files.update(write_state("item", ring_order[r], version.items[ring_order[r]], version.k, url,
                                              durable=False))
                self.written[r].set()
        finally:
            for event in self.written.values():  # a lane waiting on a write that failed learns it below
                event.set()
        flush_factor_files(url, self.files)

    def wait_for(self, row: int, check: Callable[[], None]) -> None:
        while not self.written[row].wait(POLL_SECONDS):
            check()
        if self._done.done():
            self._done.result()  # the write's own error (a full disk), not an echo of it

    def result(self) -> dict[str, FileEntry]:
        self._done.result()
        return self.files

    def close(self) -> None:
        self._pool.shutdown(wait=True)


def write_state(side: Side, block: int, state: FactorState, k: int, url: str,
                durable: bool = True) -> dict[str, FileEntry]:
    """Write one block's state, trimmed to ``k`` factors, as block files at ``url``; non-finite is refused
    (``durable`` as :func:`funkflow.tasks.checkpoint_io.write_factor_state`'s)."""
    if not all_finite([state]):
        raise ValueError(f"refusing to write the non-finite factors of {side} block {block} to {url}")
    return write_factor_state(trimmed(state, k), url, block_stem(side, block), durable)


def write_share(version: Version, url: str) -> dict[str, FileEntry]:
    """Write a worker's part of a version as a checkpoint at ``url``: its rows' user blocks and the column
    blocks it holds. Returns file name → entry (size, SHA-256, shape, dtype)."""
    files: dict[str, FileEntry] = {}
    sides: tuple[tuple[Side, dict[int, FactorState]], ...] = (("user", version.users), ("item", version.items))
    for side, states in sides:
        for block, state in states.items():
            files.update(write_state(side, block, state, version.k, url))
    return files


def _first_real_error(futures: Sequence) -> None:
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
    member's row in that model, or -1) and ``n_previous``: start known users and
    items from that model.
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
    n_previous: tuple[int, int] = (0, 0)  # the previous model's users and items


def start_state(source: StartFrom, side: Side, block: int) -> FactorState:
    """The starting state of one row block (``side="user"``) or column block (``"item"``)."""
    if source.checkpoint is not None:
        return read_factor_state(source.checkpoint, block_stem(side, block))
    user = side == "user"
    n = (source.user_sizes if user else source.item_sizes)[block]
    seed = init_seed(np.random.SeedSequence(source.seed), STREAM_USER_INIT if user else STREAM_ITEM_INIT, block)
    if source.warm_dir is None:
        return init_factors(n, source.k, source.init_std, seed)
    previous = (source.user_previous if user else source.item_previous)[block]
    return warm_factors(n, source.k, source.init_std, seed, source.warm_dir, side, source.n_previous[not user],
                        previous)


def start_version(source: StartFrom, rows: range, ring_order: tuple[int, ...]) -> Version:
    """A worker's starting version for the epoch whose ring is ``ring_order``: the user states of ``rows``
    and the column blocks at their ring positions."""
    return Version(source.k, users={r: training_copy(start_state(source, "user", r)) for r in rows},
                   items={ring_order[r]: training_copy(start_state(source, "item", ring_order[r])) for r in rows})
