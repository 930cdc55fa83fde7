"""A worker's share of an epoch (tasks/epoch.py) without a cluster: W simulated workers in threads, each
with its own mailbox, against the plain stratum-by-stratum DSGD loop."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import numpy as np
import pytest

from funkflow.pipeline.data.blocking import block_dataset
from funkflow.pipeline.data.dataset import open_dataset
from funkflow.pipeline.running.cluster import InProcessExecutor
from funkflow.pipeline.running.config import SplitConfig
from funkflow.tasks.blocks import load_row_block
from funkflow.tasks.epoch import EpochPlan, Mailbox, ShareAborted, StartFrom, Version, run_share, start_version
from funkflow.tasks.hashing import SALT_COLUMNS, block_layout
from funkflow.tasks.schedule import block_order_seed, strata, stratum_shifts
from funkflow.tasks.training import Hyper, sgd_update

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


def _epochs_on(n_workers: int, threads: int, row_blocks, source: StartFrom, epochs: int) -> Version:
    """Run ``epochs`` epochs on ``n_workers`` simulated workers; the model as one version."""
    d = len(row_blocks)
    names = tuple(f"w{i}" for i in range(n_workers))
    versions = [start_version(source, tuple(range(i, d, n_workers))) for i in range(n_workers)]
    root = np.random.SeedSequence(SEED)
    for epoch in range(epochs):
        plan = EpochPlan(train_id="t", run_id=f"e{epoch}", epoch=epoch, shifts=stratum_shifts(d, epoch, root),
                         seed=SEED, hyper=HYPER, k=4, workers=names, start="a", end="b")
        mailboxes = [Mailbox() for _ in range(n_workers)]

        def send(index, step, col, state, mailboxes=mailboxes):
            mailboxes[index].put(step, col, state)

        with ThreadPoolExecutor(n_workers) as pool:
            futures = [pool.submit(run_share, plan, i, {r: row_blocks[r] for r in plan.rows_of(i)}, versions[i],
                                   mailboxes[i], send, threads) for i in range(n_workers)]
            results = [f.result(timeout=60) for f in futures]
        versions = [version for _, version in results]
        assert all(v.items.keys() == versions[0].items.keys() for v in versions), "every worker gets every item"
    users = {r: state for v in versions for r, state in v.users.items()}
    return Version(source.k, users, versions[0].items)


def _reference(row_blocks, source: StartFrom, epochs: int) -> Version:
    """The plain DSGD loop: stratum after stratum, block after block, in one thread."""
    d = len(row_blocks)
    model = start_version(source, tuple(range(d)))
    root = np.random.SeedSequence(SEED)
    for epoch in range(epochs):
        for s, stratum in enumerate(strata(d, epoch, root)):
            for r, c in stratum:
                model.users[r], model.items[c], _ = sgd_update(row_blocks[r], c, model.users[r], model.items[c],
                                                               HYPER, block_order_seed(root, epoch, s, r, c), "ref")
    return model


def _same_bits(a: Version, b: Version) -> bool:
    a, b = a.trimmed(), b.trimmed()
    return all(a.users[r][j].tobytes() == b.users[r][j].tobytes() for r in a.users for j in (0, 1)) and \
        all(a.items[c][j].tobytes() == b.items[c][j].tobytes() for c in a.items for j in (0, 1)) and \
        a.users.keys() == b.users.keys()


@pytest.mark.parametrize("d,n_workers,threads", [(1, 1, 1), (1, 2, 1), (3, 1, 2), (3, 2, 1), (4, 2, 2), (4, 3, 1),
                                                 (2, 3, 1)])
def test_shares_on_any_number_of_workers_and_threads_equal_the_plain_dsgd_loop(planted_low_rank, tmp_path, d,
                                                                               n_workers, threads):
    row_blocks, source = _problem(planted_low_rank, tmp_path, d)
    reference = _reference(row_blocks, source, epochs=3)
    assert _same_bits(_epochs_on(n_workers, threads, row_blocks, source, epochs=3), reference)
    assert not _same_bits(_reference(row_blocks, source, epochs=2), reference), "the check is not vacuous"


def test_a_share_waiting_for_a_lost_peer_is_called_off(planted_low_rank, tmp_path):
    row_blocks, source = _problem(planted_low_rank, tmp_path, 2)
    plan = EpochPlan(train_id="t", run_id="r", epoch=0, shifts=(0, 1), seed=SEED, hyper=HYPER, k=4, workers=("a", "b"),
                     start="s", end="e")
    mailbox = Mailbox()
    threading.Timer(0.3, mailbox.fail, ["worker b was lost"]).start()
    # Worker b never runs: worker a finishes step 0, then waits for the block b would hand it.
    with pytest.raises(ShareAborted, match="worker b was lost"):
        run_share(plan, 0, {0: row_blocks[0]}, start_version(source, (0,)), mailbox, lambda *a: None, 1)


def test_a_failing_block_names_itself_and_stops_the_other_threads(planted_low_rank, tmp_path):
    row_blocks, source = _problem(planted_low_rank, tmp_path, 2)
    start = start_version(source, (0, 1))
    # Row 1's ratings cut for a d of 1: its block of column 1 is missing, and that update fails.
    row_blocks[1] = replace(row_blocks[1], splits=tuple(split[:1] for split in row_blocks[1].splits))
    plan = EpochPlan(train_id="t", run_id="r", epoch=0, shifts=(0, 1), seed=SEED, hyper=HYPER, k=4, workers=("a",),
                     start="s", end="e")
    mailbox = Mailbox()
    with pytest.raises(RuntimeError, match=r"epoch 0 stratum \d block 1,1"):
        run_share(plan, 0, dict(enumerate(row_blocks)), start, mailbox, lambda i, s, c, st: mailbox.put(s, c, st), 2)


def _copied(version: Version) -> Version:
    return Version(version.k, {r: (f.copy(), b.copy()) for r, (f, b) in version.users.items()},
                   {c: (f.copy(), b.copy()) for c, (f, b) in version.items.items()})


def test_a_share_updates_its_own_copies_and_leaves_the_start_version_as_it_was(planted_low_rank, tmp_path):
    """Blocks update factors in place; the start version is what a rollback and a checkpoint read."""
    row_blocks, source = _problem(planted_low_rank, tmp_path, 2)
    start = start_version(source, (0, 1))
    before = _copied(start)
    plan = EpochPlan(train_id="t", run_id="r", epoch=0, shifts=stratum_shifts(2, 0, np.random.SeedSequence(SEED)),
                     seed=SEED, hyper=HYPER, k=4, workers=("a",), start="s", end="e")
    mailbox = Mailbox()

    def send(index, step, col, state):  # as it comes off the wire: read-only, not on a cache line
        factors = np.empty(state[0].size + 1, np.float32)[1:].reshape(state[0].shape)
        factors[:] = state[0]
        factors.flags.writeable = False
        mailbox.put(step, col, (factors, state[1].copy()))

    _, end = run_share(plan, 0, dict(enumerate(row_blocks)), start, mailbox, send, 1)
    assert _same_bits(start, before)
    reference = _reference(row_blocks, source, epochs=1)
    assert _same_bits(end, reference) and not _same_bits(end, before)


def test_a_factor_that_overflows_in_the_last_updates_shows_in_the_share_sse(planted_low_rank, tmp_path):
    row_blocks, source = _problem(planted_low_rank, tmp_path, 1)
    start = start_version(source, (0,))
    plan = EpochPlan(train_id="t", run_id="r", epoch=0, shifts=(0,), seed=SEED, hyper=HYPER, k=4, workers=("a",),
                     start="s", end="e", validate=False)

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
