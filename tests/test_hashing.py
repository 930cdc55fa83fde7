"""Seeded hashes: the split and the blocks depend on ids and seed only."""

from __future__ import annotations

import numpy as np
import pytest

from funkflow.tasks.hashing import SALT_COLUMNS, SALT_ROWS, block_layout, pair_uniform


@pytest.mark.parametrize("n,d", [(1, 1), (10, 3), (1000, 7), (5, 8)])
def test_block_layout_is_a_consistent_bijection(n, d):
    block_of, local_of, members = block_layout(n, d, seed=11, salt=SALT_ROWS)
    assert len(members) == d
    assert sorted(np.concatenate(members).tolist()) == list(range(n))
    for b, m in enumerate(members):
        assert (block_of[m] == b).all()
        assert (local_of[m] == np.arange(m.shape[0])).all()


def test_blocks_are_balanced_and_seeded():
    block_of, _, _ = block_layout(100_000, 8, seed=1, salt=SALT_ROWS)
    sizes = np.bincount(block_of, minlength=8)
    assert sizes.min() > 0.95 * 100_000 / 8
    assert not np.array_equal(block_of, block_layout(100_000, 8, seed=2, salt=SALT_ROWS)[0])
    assert not np.array_equal(block_of, block_layout(100_000, 8, seed=1, salt=SALT_COLUMNS)[0])


def test_pair_uniform_ignores_order_and_is_uniform():
    rng = np.random.default_rng(0)
    users = rng.integers(0, 10_000, 50_000)
    items = rng.integers(0, 3_000, 50_000)
    u = pair_uniform(users, items, seed=5)
    perm = rng.permutation(50_000)
    np.testing.assert_array_equal(pair_uniform(users[perm], items[perm], seed=5), u[perm])
    assert u.min() >= 0 and u.max() < 1
    assert abs(u.mean() - 0.5) < 0.01
    assert not np.array_equal(u, pair_uniform(users, items, seed=6))
