"""A worker's share of an epoch (tasks/epoch.py) without a cluster: W simulated workers in threads, each
with its own mailbox, against the plain stratum-by-stratum DSGD loop."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from funkflow.pipeline.core.cluster import InProcessExecutor
from funkflow.pipeline.core.config import SplitConfig
from funkflow.pipeline.data.blocking import block_dataset
from funkflow.pipeline.data.dataset import open_dataset
from funkflow.tasks.blocks import TRAIN, VALIDATION, load_row_block
from funkflow.tasks.epoch import (
    EpochPlan,
    Mailbox,
    ShareAborted,
    StartFrom,
    Version,
    lanes_of,
    owner_of,
    rows_of,
    run_share,
    start_version,
)
from funkflow.tasks.hashing import SALT_COLUMNS, block_layout
from funkflow.tasks.schedule import block_seeds, column_at, ring
from funkflow.tasks.training import Hyper, block_error_sums, sgd_update, trimmed

HYPER = Hyper(lr=0.02, reg=0.02, bias_reg=0.02, use_bias=True, global_mean=3.0, order="user_runs",
              users_per_run=16, tile_items=8)
SEED = 11


def _problem(dataset_root, tmp_path, d):
    """The planted problem's d row blocks, and where its factors start."""
    dataset = open_dataset(dataset_root)
    blocks = block_dataset(InProcessExecutor(), dataset, tmp_path / f"blocks-{d}", d, SplitConfig(), seed=3)
    row_blocks = [load_row_block(str(blocks.root), r, d, blocks.n_users, blocks.n_items, 3) for r in range(d)]
    item_sizes = tuple(len(m) for m in block_layout(blocks.n_items, d, 3, SALT_COLUMNS)[2])
    source = StartFrom(k=4, init_std=0.1, seed=SEED, user_sizes=tuple(b.n_users for b in row_blocks),
                       item_sizes=item_sizes)
    return row_blocks, source


def _plan(epoch: int, d: int, workers: tuple, **changes) -> EpochPlan:
    root = np.random.SeedSequence(SEED)
    plan = EpochPlan(train_id="t", run_id=f"e{epoch}", epoch=epoch, ring=ring(d, epoch, root),
                     next_ring=ring(d, epoch + 1, root), seed=SEED, hyper=HYPER, k=4, workers=workers, start="a",
                     end="b")
    return replace(plan, **changes)


def _off_the_wire(state):
    """A state as it comes off the network: trimmed, read-only, not on a cache line."""
    factors = np.empty(state[0].size + 1, np.float32)[1:].reshape(state[0].shape)
    factors[:] = state[0]
    factors.flags.writeable = False
    return trimmed((factors, state[1].copy()), 4)


def _epochs_on(n_workers: int, threads: int, row_blocks, source: StartFrom, epochs: int):
    """Run ``epochs`` epochs on ``n_workers`` simulated workers: the model as one version, and the validation
    sums the shares reported in the last epoch."""
    d = len(row_blocks)
    names = tuple(f"w{i}" for i in range(n_workers))
    root = np.random.SeedSequence(SEED)
    versions = [start_version(source, rows_of(i, d, n_workers), ring(d, 0, root)) for i in range(n_workers)]
    for epoch in range(epochs):
        plan = _plan(epoch, d, names)
        mailboxes = [Mailbox() for _ in range(n_workers)]

        def send(index, step, col, state, mailboxes=mailboxes, sender=None):
            mailboxes[index].put(step, col, _off_the_wire(state) if (index + step + col) % 2 else state)

        with ThreadPoolExecutor(n_workers) as pool:
            futures = [pool.submit(run_share, plan, i, {r: row_blocks[r] for r in plan.rows_of(i)}, versions[i],
                                   mailboxes[i], send, threads) for i in range(n_workers)]
            results = [f.result(timeout=60) for f in futures]
        versions = [version for _, version in results]
        for i, version in enumerate(versions):
            assert set(version.items) == {plan.next_ring[r] for r in plan.rows_of(i)}, "holds its next start only"
        validation = np.concatenate([outcome.validation for outcome, _ in results])
    users = {r: state for v in versions for r, state in v.users.items()}
    items = {c: state for v in versions for c, state in v.items.items()}
    return Version(source.k, users, items), validation


def _reference(row_blocks, source: StartFrom, epochs: int):
    """The plain DSGD loop: stratum after stratum, block after block, in one thread; and the validation sums
    of the last epoch, each block's measured just after its update."""
    d = len(row_blocks)
    root = np.random.SeedSequence(SEED)
    model = start_version(source, range(d), ring(d, 0, root))
    validation = np.zeros((d, d, 3))
    for epoch in range(epochs):
        order, seeds = ring(d, epoch, root), block_seeds(root, epoch, d)
        for t in range(d):
            for r in range(d):
                c = column_at(order, r, t)
                model.users[r], model.items[c], _ = sgd_update(row_blocks[r].split(TRAIN)[c], model.users[r],
                                                               model.items[c], HYPER, int(seeds[r, c]))
                validation[r, c] = block_error_sums(row_blocks[r].split(VALIDATION)[c], model.users[r],
                                                    model.items[c], HYPER.global_mean)
    return model, validation


def _same_bits(a: Version, b: Version) -> bool:
    return (a.users.keys() == b.users.keys() and a.items.keys() == b.items.keys()
            and all(trimmed(a.users[r], 4)[j].tobytes() == trimmed(b.users[r], 4)[j].tobytes()
                    for r in a.users for j in (0, 1))
            and all(trimmed(a.items[c], 4)[j].tobytes() == trimmed(b.items[c], 4)[j].tobytes()
                    for c in a.items for j in (0, 1)))


@pytest.mark.parametrize("d,n_workers,threads", [(1, 1, 1), (1, 2, 1), (3, 1, 2), (3, 2, 1), (4, 2, 2), (4, 3, 1),
                                                 (2, 3, 1), (6, 1, 1), (6, 2, 3), (8, 3, 2)])
def test_shares_on_any_number_of_workers_and_threads_equal_the_plain_dsgd_loop(planted_low_rank, tmp_path, d,
                                                                               n_workers, threads):
    row_blocks, source = _problem(planted_low_rank, tmp_path, d)
    reference, reference_validation = _reference(row_blocks, source, epochs=3)
    found, validation = _epochs_on(n_workers, threads, row_blocks, source, epochs=3)
    assert _same_bits(found, reference)
    assert validation.tobytes() == reference_validation.tobytes()
    assert not _same_bits(_reference(row_blocks, source, epochs=2)[0], reference), "the check is not vacuous"


@given(st.integers(1, 40), st.integers(1, 12), st.integers(1, 6))
def test_rows_are_owned_in_contiguous_ranges_and_cut_into_lanes(d, n_workers, threads):
    ranges = [rows_of(i, d, n_workers) for i in range(n_workers)]
    assert [r for rows in ranges for r in rows] == list(range(d))
    assert max(map(len, ranges)) - min(map(len, ranges)) <= 1
    assert all(owner_of(r, d, n_workers) == i for i, rows in enumerate(ranges) for r in rows)
    for rows in ranges:
        lanes = lanes_of(rows, threads)
        assert [r for lane in lanes for r in lane] == list(rows) and len(lanes) == min(threads, len(rows))


def test_a_share_waiting_for_a_lost_peer_is_called_off(planted_low_rank, tmp_path):
    row_blocks, source = _problem(planted_low_rank, tmp_path, 2)
    plan = _plan(0, 2, ("a", "b"))
    mailbox = Mailbox()
    threading.Timer(0.3, mailbox.fail, ["worker b was lost"]).start()
    # Worker b never runs: worker a finishes step 0, then waits for the block b would hand it.
    with pytest.raises(ShareAborted, match="worker b was lost"):
        run_share(plan, 0, {0: row_blocks[0]}, start_version(source, range(1), plan.ring), mailbox,
                  lambda *a: None, 1)


def test_a_failing_block_names_itself_and_stops_the_other_threads(planted_low_rank, tmp_path):
    row_blocks, source = _problem(planted_low_rank, tmp_path, 2)
    plan = _plan(0, 2, ("a",))
    start = start_version(source, range(2), plan.ring)
    # Row 1's ratings cut for a d of 1: its block of one column is missing, and that update fails.
    row_blocks[1] = replace(row_blocks[1], splits=tuple(split[:1] for split in row_blocks[1].splits))
    mailbox = Mailbox()
    with pytest.raises(RuntimeError, match=r"epoch 0 step \d block 1,1"):
        run_share(plan, 0, dict(enumerate(row_blocks)), start, mailbox, lambda i, s, c, st: mailbox.put(s, c, st), 2)


def test_a_share_updates_its_own_copies_and_leaves_the_start_version_as_it_was(planted_low_rank, tmp_path):
    """Blocks update factors in place; the start version is what a rollback and a checkpoint read."""
    row_blocks, source = _problem(planted_low_rank, tmp_path, 2)
    plan = _plan(0, 2, ("a",))
    start = start_version(source, range(2), plan.ring)
    before = Version(4, {r: (f.copy(), b.copy()) for r, (f, b) in start.users.items()},
                     {c: (f.copy(), b.copy()) for c, (f, b) in start.items.items()})
    mailbox = Mailbox()
    _, end = run_share(plan, 0, dict(enumerate(row_blocks)), start, mailbox,
                       lambda i, s, c, st: mailbox.put(s, c, _off_the_wire(st)), 1)
    assert _same_bits(start, before)
    reference, _ = _reference(row_blocks, source, epochs=1)
    assert _same_bits(end, reference) and not _same_bits(end, before)


def test_a_factor_that_overflows_in_the_last_updates_shows_in_the_share_sse(planted_low_rank, tmp_path):
    row_blocks, source = _problem(planted_low_rank, tmp_path, 1)
    plan = _plan(0, 1, ("a",), validate=False)
    start = start_version(source, range(1), plan.ring)

    def share(plan, row_block):
        mailbox = Mailbox()
        return run_share(plan, 0, {0: row_block}, start, mailbox, lambda i, s, c, st: mailbox.put(s, c, st), 1)[0]

    assert np.isfinite(share(plan, row_blocks[0]).sse).all()
    # One rating left, and a step that sends its factors past float32's range in that last update.
    block = row_blocks[0].split(0)[0]
    last = replace(block, users=block.users[:1], items=block.items[:1], ratings=np.array([1e19], np.float32))
    one_rating = replace(row_blocks[0], splits=((last,), *row_blocks[0].splits[1:]))
    blown = replace(plan, hyper=replace(HYPER, lr=1e20, users_per_run=1, tile_items=0))
    assert share(blown, one_rating).sse[0, 0] == np.inf
