"""The DSGD schedule: the stratum invariants of the ring, as properties over d, epoch and seed."""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from funkflow.tasks.epoch import owner_of
from funkflow.tasks.schedule import (
    STREAM_ITEM_INIT,
    STREAM_USER_INIT,
    block_seeds,
    column_at,
    init_seed,
    ring,
    strata,
)

ds = st.integers(min_value=1, max_value=24)
epochs = st.integers(min_value=0, max_value=10_000)
seeds = st.integers(min_value=0, max_value=2**63)


@given(ds, epochs, seeds)
def test_each_stratum_has_d_blocks_sharing_no_row_or_column(d, epoch, seed):
    for stratum in strata(d, epoch, np.random.SeedSequence(seed)):
        assert len(stratum) == d
        assert len({r for r, _ in stratum}) == d
        assert len({c for _, c in stratum}) == d


@given(ds, epochs, seeds)
def test_an_epoch_covers_every_block_exactly_once(d, epoch, seed):
    blocks = [b for stratum in strata(d, epoch, np.random.SeedSequence(seed)) for b in stratum]
    assert len(blocks) == d * d
    assert set(blocks) == {(r, c) for r in range(d) for c in range(d)}


@given(ds, epochs, seeds)
def test_a_column_block_moves_one_row_down_each_step(d, epoch, seed):
    order = ring(d, epoch, np.random.SeedSequence(seed))
    for t in range(d - 1):
        for r in range(d):
            assert column_at(order, r, t) == column_at(order, (r - 1) % d, t + 1)


@given(ds, st.integers(1, 16), epochs, seeds)
def test_a_column_block_enters_each_worker_at_most_once_an_epoch(d, n_workers, epoch, seed):
    """With contiguous row ranges, the ring hands a block to another worker only at the edge of a range, so
    no worker receives a block twice in an epoch (the one it starts in may get it back once, at the end)."""
    order = ring(d, epoch, np.random.SeedSequence(seed))
    for c in range(d):
        visits = [owner_of(r, d, n_workers) for t in range(d) for r in range(d) if column_at(order, r, t) == c]
        received_by = [b for a, b in zip(visits, visits[1:]) if a != b]
        assert len(received_by) == len(set(received_by))
        assert set(visits) == {owner_of(r, d, n_workers) for r in range(d)}


@given(ds, epochs, seeds)
def test_schedule_is_a_pure_function_of_d_epoch_and_seed(d, epoch, seed):
    assert strata(d, epoch, np.random.SeedSequence(seed)) == strata(d, epoch, np.random.SeedSequence(seed))
    assert block_seeds(np.random.SeedSequence(seed), epoch, d).tobytes() == \
        block_seeds(np.random.SeedSequence(seed), epoch, d).tobytes()


def test_the_ring_varies_between_epochs():
    root = np.random.SeedSequence(3)
    assert len({ring(8, e, root) for e in range(20)}) > 10


def test_block_streams_are_distinct():
    root = np.random.SeedSequence(0)
    seeds = {int(s) for e in range(3) for s in block_seeds(root, e, 5).reshape(-1)}
    seeds |= {init_seed(root, side, b) for side in (STREAM_USER_INIT, STREAM_ITEM_INIT) for b in range(3)}
    assert len(seeds) == 3 * 25 + 6
