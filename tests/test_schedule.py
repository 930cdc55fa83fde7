"""The DSGD schedule: the stratum invariants, as properties over d, epoch and seed."""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from funkflow.tasks.schedule import (
    STREAM_ITEM_INIT,
    STREAM_USER_INIT,
    block_order_seed,
    init_seed,
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
def test_schedule_is_a_pure_function_of_d_epoch_and_seed(d, epoch, seed):
    assert strata(d, epoch, np.random.SeedSequence(seed)) == strata(d, epoch, np.random.SeedSequence(seed))


def test_stratum_order_varies_between_epochs():
    root = np.random.SeedSequence(3)
    orders = {tuple(s[0][1] for s in strata(8, e, root)) for e in range(20)}
    assert len(orders) > 10


def test_block_streams_are_distinct():
    root = np.random.SeedSequence(0)
    seeds = {block_order_seed(root, e, s, r, c) for e in range(3) for s in range(3) for r in range(3) for c in range(3)}
    seeds |= {init_seed(root, side, b) for side in (STREAM_USER_INIT, STREAM_ITEM_INIT) for b in range(3)}
    assert len(seeds) == 81 + 6
