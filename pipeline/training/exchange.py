"""The worker extension that carries column blocks between workers, and the tasks the DSGD driver submits.

Modelled on distributed's P2P shuffle (``distributed/shuffle/_worker_plugin.py``):
a worker plugin adds a comm handler, ``funkflow_item_blocks``, through which a
worker hands a column block straight to the peer whose row takes it next; the
scheduler is out of the data path and sees one task per worker per epoch
(:func:`epoch_share`), not one per block. Every epoch runs under a fresh run id,
so data of an epoch that was called off never mixes with its re-run.

Each worker's extension also keeps the run's factor *versions* (its rows' user
states and the column blocks it holds at that point): they stay on the worker
between epochs, as the row blocks do, and only checkpoints, the model's block
files and the driver's decisions leave it. A version lives in worker memory and
is lost with the worker; the driver then restarts from the newest checkpoint on
the workers that are left (``pipeline/training/train.py``).

Without Dask (``cluster.scheduler: inprocess``) one extension in this process
plays every role, with the same code.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from typing import Any

import numpy as np
from distributed.diagnostics.plugin import WorkerPlugin

from funkflow.pipeline.core.cluster import in_process_extension
from funkflow.tasks.artifacts import FileEntry
from funkflow.tasks.blocks import TRAIN, RowBlock
from funkflow.tasks.epoch import (
    EpochPlan,
    Mailbox,
    ShareAborted,
    ShareOutcome,
    StartFrom,
    Version,
    run_share,
    start_version,
    write_share,
)
from funkflow.tasks.measure import Measured, MeasurePlan, measure_rotation
from funkflow.tasks.model_files import read_model_block
from funkflow.tasks.training import Buffers, FactorState, training_copy, trimmed

log = logging.getLogger(__name__)

EXTENSION = "funkflow-dsgd"
_RETIRED_RUNS = 1024  # run ids remembered after they end, so late blocks for them are dropped


class DSGDExchange(WorkerPlugin):
    """Per worker (or per process, in-process): factor versions by training run, and mailboxes by epoch run."""

    idempotent = True  # registering again (a second run on the same cluster) keeps the running extension
    name = EXTENSION

    def __init__(self) -> None:
        self.worker: Any = None
        self.address: str | None = None
        self._versions: dict[str, dict[str, Version]] = {}
        self._mailboxes: dict[str, Mailbox] = {}
        self._run_of_training: dict[str, str] = {}
        self._retired: deque[str] = deque(maxlen=_RETIRED_RUNS)
        self._lock = threading.Lock()
        # (run id, step, bytes) of the latest item blocks that came from peers, and the messages that brought them.
        self.received: deque[tuple[str, int, int]] = deque(maxlen=100_000)
        self.messages = 0
        # The arrays of dropped versions, which the next epoch's copies reuse (see Buffers).
        self.buffers = Buffers()
        # Seconds every message to a peer waits before it leaves: a test and benchmark hook that stands for
        # a slow network (set through :func:`set_hand_off_delay`).
        self.delay = 0.0

    def __reduce__(self) -> tuple[type, tuple]:
        return DSGDExchange, ()  # what travels to the workers is a fresh extension, never this one's state

    # Worker plugin hooks (distributed calls these on the worker's event loop).
    def setup(self, worker: Any) -> None:
        self.worker, self.address = worker, worker.address
        worker.handlers["funkflow_item_blocks"] = self.receive
        worker.extensions[EXTENSION] = self

    def teardown(self, worker: Any) -> None:
        with self._lock:
            for mailbox in self._mailboxes.values():
                mailbox.fail("the worker is closing")

    async def receive(self, train_id: str, run_id: str, steps: list[int], cols: list[int],
                      factors: list[np.ndarray], biases: list[np.ndarray]) -> None:
        """Handler: item blocks from a peer, each for its step of epoch run ``run_id``."""
        mailbox = self._mailbox(train_id, run_id)
        if mailbox is None:
            return
        self.messages += 1
        for step, col, block, bias in zip(steps, cols, factors, biases):
            self.received.append((run_id, step, block.nbytes + bias.nbytes))
            # Into the kernels' layout at once, so the message's frames go now: a block waiting in the mailbox
            # as it came (the next epoch's, till the end of this one) had been held twice.
            mailbox.put(step, col, training_copy((block, bias), self.buffers))

    def _mailbox(self, train_id: str, run_id: str) -> Mailbox | None:
        """The mailbox of ``run_id`` (made on first use: a peer's block may come before the local task);
        None once the run has ended."""
        with self._lock:
            if run_id in self._retired:
                return None
            if run_id not in self._mailboxes:
                self._mailboxes[run_id] = Mailbox()
            return self._mailboxes[run_id]

    def begin(self, train_id: str, run_id: str) -> Mailbox:
        """Start ``run_id`` here; an older epoch run of the same training is called off."""
        with self._lock:
            older = self._run_of_training.get(train_id)
            self._run_of_training[train_id] = run_id
        if older is not None and older != run_id:
            self.end(older, "a newer epoch run of this training started")
        mailbox = self._mailbox(train_id, run_id)
        if mailbox is None:
            raise ShareAborted(f"epoch run {run_id} was called off before it started here")
        return mailbox

    def end(self, run_id: str, reason: str | None = None) -> None:
        with self._lock:
            self._retired.append(run_id)
            mailbox = self._mailboxes.pop(run_id, None)
        if mailbox is not None and reason is not None:
            mailbox.fail(reason)

    def abort(self, train_id: str, reason: str) -> None:
        """Call off the running epoch of ``train_id`` here: its waits raise :class:`ShareAborted`."""
        with self._lock:
            run_id = self._run_of_training.get(train_id)
        if run_id is not None:
            self.end(run_id, reason)

    def release(self, train_id: str) -> None:
        """Forget everything of ``train_id``: its versions and its running epoch, if any."""
        self.abort(train_id, "the training ended")
        with self._lock:
            self._versions.pop(train_id, None)
            self._run_of_training.pop(train_id, None)
        self.buffers.clear()

    def store(self, train_id: str, name: str, version: Version) -> None:
        with self._lock:
            self._versions.setdefault(train_id, {})[name] = version

    def version(self, train_id: str, name: str) -> Version:
        with self._lock:
            found = self._versions.get(train_id, {}).get(name)
        if found is None:
            raise ShareAborted(f"version {name} of training {train_id} is not on worker {self.address}")
        return found

    def keep_only(self, train_id: str, names: tuple[str, ...]) -> None:
        """Drop the versions of ``train_id`` not named; their arrays go to the buffers for reuse."""
        with self._lock:
            kept = self._versions.get(train_id, {})
            dropped = [kept.pop(name) for name in [v for v in kept if v not in names]]
        self.buffers.give(state for version in dropped
                          for state in (*version.users.values(), *version.items.values()))

    def sender(self, train_id: str, run_id: str, k: int, workers: tuple[str | None, ...],
               mailbox: Mailbox) -> tuple[Any, Any]:
        """``send`` for :func:`funkflow.tasks.epoch.rotate` in run ``run_id``, and a function that waits until
        every block has left. ``k``: the factors a row that travel (the padding does not)."""
        outboxes: dict[str, _Outbox] = {}

        def send(index: int, step: int, col: int, state: FactorState) -> None:
            address = workers[index]
            if address is None or address == self.address:  # None: a plan for one process
                mailbox.put(step, col, state)
                return
            if address not in outboxes:
                outboxes[address] = _Outbox(self.worker, address, train_id, run_id, k, mailbox, self.delay)
            outboxes[address].put(step, col, state)

        def sent() -> None:
            for outbox in list(outboxes.values()):
                outbox.wait()

        return send, sent


class _Outbox:
    """Item blocks on their way to one peer. A block leaves at once; blocks that come while a send is
    under way go together in the next one, so a busy worker sends fewer, larger messages and no block
    waits for a batch to fill."""

    def __init__(self, worker: Any, address: str, train_id: str, run_id: str, k: int, mailbox: Mailbox,
                 delay: float = 0.0) -> None:
        self.worker, self.address, self.mailbox = worker, address, mailbox
        self.train_id, self.run_id, self.k, self.delay = train_id, run_id, k, delay
        self._queue: list[tuple[int, int, FactorState]] = []
        self._sending = False
        self._lock = threading.Lock()
        self._drains: list[Any] = []

    def put(self, step: int, col: int, state: FactorState) -> None:
        with self._lock:
            self._queue.append((step, col, state))
            if self._sending:
                return
            self._sending = True
        self._drains.append(asyncio.run_coroutine_threadsafe(self._drain(), self.worker.loop.asyncio_loop))

    async def _drain(self) -> None:
        from distributed.protocol import to_serialize

        while True:
            with self._lock:
                batch, self._queue = self._queue, []
                if not batch:
                    self._sending = False
                    return
            if self.delay:
                await asyncio.sleep(self.delay)
            try:
                # No reply: a lost peer shows as a failed write or to the driver's watch, and waiting for
                # an answer would hold the next batch back by a round trip.
                await self.worker.rpc(self.address).funkflow_item_blocks(
                    train_id=self.train_id, run_id=self.run_id, steps=[b[0] for b in batch],
                    cols=[b[1] for b in batch], factors=[to_serialize(trimmed(b[2], self.k)[0]) for b in batch],
                    biases=[to_serialize(b[2][1]) for b in batch], reply=False)
            except Exception as exc:
                self.mailbox.fail(f"cannot hand item blocks {[b[1] for b in batch]} to {self.address}: {exc!r}")
                raise

    def wait(self) -> None:
        """Until every block put so far has been sent; raises if a send failed."""
        for drain in list(self._drains):
            drain.result()


def _exchange(address: str | None) -> tuple[DSGDExchange, Any]:
    """This process's extension and its worker (None in-process); a task that Dask moved off the worker it
    was planned for raises, since the plan routes item blocks by address."""
    from distributed import get_worker

    if address is None:
        return in_process_extension(EXTENSION), None
    worker = get_worker()
    if worker.address != address:
        raise ShareAborted(f"planned for worker {address}, which was lost; running on {worker.address}")
    exchange = worker.extensions.get(EXTENSION)
    if exchange is None:
        raise RuntimeError(f"worker {worker.address} has no {EXTENSION} extension; the driver installs it")
    return exchange, worker


def _cancel_check(worker: Any) -> Any:
    """A check that raises once Dask has cancelled the running task (its client went away)."""
    if worker is None:
        return lambda: None
    from distributed.worker import thread_state

    key = thread_state.key

    def check() -> None:
        task = worker.state.tasks.get(key)
        if task is None or task.state in ("cancelled", "released", "forgotten"):
            raise ShareAborted(f"task {key} was cancelled")

    return check


# Tasks. Each takes the address it was planned for and the row blocks of its worker as Dask futures, so
# that Dask can rebuild a lost row block from Parquet.

def load_share(*row_blocks: RowBlock, source: StartFrom, train_id: str, version: str, rows: range,
               ring_order: tuple[int, ...], address: str | None, global_mean: float, measure: bool) -> np.ndarray:
    """Put the starting version of this worker's rows, and the column blocks at their positions in
    ``ring_order``, into its store.

    Returns, when ``measure``, each row's ``(Σ (r - μ)², n)`` over its training ratings: the error of
    predicting the global mean (0 for a k-only model), what the driver tells divergence by; array of shape
    (n_rows, 2), float64 (zeros otherwise).
    """
    exchange, _ = _exchange(address)
    exchange.store(train_id, version, start_version(source, rows, ring_order))
    errors = np.zeros((len(rows), 2))
    if measure:
        for j, block in enumerate(row_blocks):
            for ratings in block.split(TRAIN):
                residual = ratings.ratings.astype(np.float64) - global_mean
                errors[j] += (residual @ residual, ratings.n)
    return errors


def epoch_share(*row_blocks: RowBlock, plan: EpochPlan, index: int, threads: int) -> ShareOutcome:
    """Run worker ``index``'s share of the epoch (see :func:`funkflow.tasks.epoch.run_share`) and store its version."""
    exchange, worker = _exchange(plan.workers[index])
    mailbox = exchange.begin(plan.train_id, plan.run_id)
    try:
        exchange.keep_only(plan.train_id, (plan.start, *plan.keep))
        start = exchange.version(plan.train_id, plan.start)
        send, sent = exchange.sender(plan.train_id, plan.run_id, plan.k, plan.workers, mailbox)
        outcome, version = run_share(plan, index, dict(zip(plan.rows_of(index), row_blocks)), start, mailbox, send,
                                     threads, _cancel_check(worker), exchange.buffers)
        sent()  # a peer must not wait for a block that never left
        exchange.store(plan.train_id, plan.end, version)
        return outcome
    finally:
        exchange.end(plan.run_id)


def measure_share(*row_blocks: RowBlock, plan: MeasurePlan, model_dir: str, index: int, threads: int) -> Measured:
    """Worker ``index``'s part of a measuring rotation of the model in ``model_dir``: it reads its rows' user
    blocks and the column blocks at their ring positions, and the rest come by (see
    :func:`funkflow.tasks.measure.measure_rotation`)."""
    exchange, worker = _exchange(plan.workers[index])
    mailbox = exchange.begin(plan.run_id, plan.run_id)
    try:
        rows = plan.rows_of(index)
        users = {r: training_copy(read_model_block(model_dir, "user", r, mmap=True)) for r in rows}
        items = {plan.ring[r]: training_copy(read_model_block(model_dir, "item", plan.ring[r], mmap=True))
                 for r in rows}
        send, sent = exchange.sender(plan.run_id, plan.run_id, plan.k, plan.workers, mailbox)
        measured = measure_rotation(plan, index, dict(zip(rows, row_blocks)), users, items, mailbox, send, threads,
                                    _cancel_check(worker))
        sent()
        return measured
    finally:
        exchange.end(plan.run_id)


def write_version_share(*, train_id: str, version: str, address: str | None, url: str) -> dict[str, FileEntry]:
    """Write this worker's part of ``version`` (its rows' user blocks and the column blocks it holds) as
    block files at ``url``: a checkpoint's, or a model's (see :func:`funkflow.tasks.epoch.write_share`)."""
    exchange, _ = _exchange(address)
    return write_share(exchange.version(train_id, version), url)


def abort_training(train_id: str, reason: str, dask_worker: Any = None) -> None:
    """Call off the running epoch of ``train_id`` on this worker (run through ``Client.run``)."""
    _on(dask_worker).abort(train_id, reason)


def release_training(train_id: str, dask_worker: Any = None) -> None:
    """Drop ``train_id``'s versions on this worker (run through ``Client.run``)."""
    _on(dask_worker).release(train_id)


def set_hand_off_delay(seconds: float, dask_worker: Any = None) -> None:
    """Hold every message this worker sends a peer for ``seconds`` (run through ``Client.run``): how a test
    or benchmark stands for a slow network."""
    _on(dask_worker).delay = seconds


def received_bytes(dask_worker: Any = None) -> list[tuple[str, int, int]]:
    """What came to this worker from peers: (run id, step, bytes) per item block."""
    return list(_on(dask_worker).received)


def received_messages(dask_worker: Any = None) -> int:
    """How many messages of item blocks came to this worker from peers."""
    return _on(dask_worker).messages


def _on(dask_worker: Any) -> DSGDExchange:
    if dask_worker is None:
        return in_process_extension(EXTENSION)
    return dask_worker.extensions.get(EXTENSION) or DSGDExchange()


