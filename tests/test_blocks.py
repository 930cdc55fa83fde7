"""Splitting and blocking: every rating lands in exactly one split and block, indices map back."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from funkflow.tasks.blocks import (
    BLOCKS_JSON,
    SPLIT_NAMES,
    TEST,
    TRAIN,
    VALIDATION,
    SplitRule,
    assign_splits,
    load_row_block,
    split_codes,
    split_part,
)
from funkflow.tasks.hashing import SALT_COLUMNS, SALT_ROWS, block_layout
from funkflow.tasks.io import write_json


@pytest.mark.parametrize("d", [1, 3, 5])
def test_blocks_hold_every_rating_once(planted_low_rank, tmp_path, d):
    parts = sorted((planted_low_rank / "ratings").glob("*.parquet"))
    tables = [pq.read_table(p) for p in parts]
    users = np.concatenate([t["user"].to_numpy() for t in tables])
    items = np.concatenate([t["item"].to_numpy() for t in tables])
    ratings = np.concatenate([t["rating"].to_numpy() for t in tables])
    n_users, n_items = 120, 80
    out = tmp_path / "blocks"
    rule = SplitRule("hash", 0.2, 0.1, 3)
    results = [split_part(str(p), j, str(out), d, n_users, rule, 9) for j, p in enumerate(parts)]
    counts = sum(r.counts for r in results)
    assert counts.sum() == users.shape[0]
    write_json({"counts": counts.tolist()}, out / BLOCKS_JSON)  # as the block stage does, last

    _, _, user_members = block_layout(n_users, d, 9, SALT_ROWS)
    _, _, item_members = block_layout(n_items, d, 9, SALT_COLUMNS)
    seen = []
    for r in range(d):
        row = load_row_block(str(out), r, d, n_users, n_items, 9)
        np.testing.assert_array_equal(row.user_ids, user_members[r])
        for code in range(len(SPLIT_NAMES)):
            assert sum(b.n for b in row.split(code)) == counts[r, code]
            for c, block in enumerate(row.split(code)):
                g_users = user_members[r][block.users]
                g_items = item_members[c][block.items]
                seen.append(np.stack([g_users, g_items, block.ratings, np.full(block.n, code)], axis=1))
    seen = np.concatenate(seen)
    order = np.lexsort((seen[:, 1], seen[:, 0]))
    source_order = np.lexsort((items, users))
    np.testing.assert_array_equal(seen[order, :2].astype(int), np.stack([users, items], 1)[source_order])
    np.testing.assert_array_equal(seen[order, 2], ratings[source_order])
    np.testing.assert_array_equal(seen[order, 3], split_codes(users, items, 0.2, 0.1, 3)[source_order])


def test_split_fractions_and_independence_from_partitioning():
    rng = np.random.default_rng(1)
    users = rng.integers(0, 5000, 200_000)
    items = rng.integers(0, 900, 200_000)
    codes = split_codes(users, items, 0.1, 0.05, seed=0)
    fractions = np.bincount(codes, minlength=3) / codes.shape[0]
    np.testing.assert_allclose(fractions, [0.85, 0.05, 0.1], atol=0.005)
    half = split_codes(users[:1000], items[:1000], 0.1, 0.05, seed=0)
    np.testing.assert_array_equal(half, codes[:1000])


def test_row_block_of_another_layout_is_refused(planted_low_rank, tmp_path):
    part = sorted((planted_low_rank / "ratings").glob("*.parquet"))[0]
    counts = split_part(str(part), 0, str(tmp_path), 2, 120, SplitRule("hash", 0.1, 0.1, 0), 1).counts
    write_json({"counts": counts.tolist()}, tmp_path / BLOCKS_JSON)
    with pytest.raises(ValueError, match="another row block"):
        load_row_block(str(tmp_path), 0, 2, 120, 80, block_seed=2)


def test_per_user_split_holds_out_each_users_latest_and_keeps_one_for_training():
    # user 0: 5 ratings at times 50..10; user 1: 2 ratings; user 2: 1 rating. Shuffled input order.
    users = np.array([0, 0, 0, 0, 0, 1, 1, 2])
    items = np.array([1, 2, 3, 4, 5, 1, 2, 3])
    times = np.array([50, 40, 30, 20, 10, 7, 9, 1])
    shuffle = np.random.default_rng(0).permutation(8)
    codes = np.empty(8, dtype=np.int8)
    codes[shuffle] = assign_splits(users[shuffle], items[shuffle], times[shuffle],
                                   SplitRule("per_user", test_per_user=2, validation_per_user=1))
    assert codes.tolist() == [TEST, TEST, VALIDATION, TRAIN, TRAIN,  # latest two, then the one before
                              TRAIN, TEST,                             # two ratings: one stays in training
                              TRAIN]                                   # a lone rating is never held out


def test_time_split_puts_everything_from_the_cutoff_in_test():
    rng = np.random.default_rng(1)
    users, items = rng.integers(0, 100, 5000), rng.integers(0, 50, 5000)
    times = rng.integers(0, 1000, 5000)
    codes = assign_splits(users, items, times, SplitRule("time", validation_fraction=0.1, cutoff=800))
    assert (codes[times >= 800] == TEST).all()
    assert not (codes[times < 800] == TEST).any()
    assert 0.05 < (codes[times < 800] == VALIDATION).mean() < 0.15


def test_baselines_of_a_row_block_are_the_damped_means_over_its_column_blocks():
    """item_residual_sums adds each item's training residuals within its column block; baseline_errors
    scores the damped biases on the test ratings; both held to a direct computation over global indices."""
    from funkflow.tasks.baselines import ITEM_DAMPING, USER_DAMPING, baseline_errors, item_residual_sums
    from funkflow.tasks.blocks import TEST, TRAIN, BlockRatings, RowBlock

    rng = np.random.default_rng(4)
    n_users, d, mu = 30, 3, 3.4
    item_members = [np.sort(rng.choice(np.arange(c, 60, d), 15, replace=False)) for c in range(d)]

    def ratings(n: int) -> BlockRatings:
        keys = np.unique(rng.integers(0, n_users * 15, n))
        return BlockRatings((keys // 15).astype(np.int32), (keys % 15).astype(np.int32),
                            rng.integers(1, 6, keys.shape[0]).astype(np.float32))

    splits = tuple(tuple(ratings(n) for _ in range(d)) for n in (200, 20, 40))
    row = RowBlock(row=0, user_ids=np.arange(n_users, dtype=np.int32), splits=splits)

    def flat(code: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        blocks = splits[code]
        return (np.concatenate([b.users for b in blocks]),
                np.concatenate([m[b.items] for b, m in zip(blocks, item_members)]),
                np.concatenate([b.ratings for b in blocks]).astype(np.float64))

    users, items, r = flat(TRAIN)
    found_items, sums = item_residual_sums(row, item_members, mu)
    assert sorted(found_items.tolist()) == np.unique(items).tolist()
    for item, (residual, n) in zip(found_items, sums.T):
        assert n == np.sum(items == item)
        assert residual == pytest.approx(np.sum(r[items == item] - mu))

    item_bias = np.zeros(60)
    item_bias[found_items] = sums[0] / (ITEM_DAMPING + sums[1])
    user_bias = (np.bincount(users, r - mu - item_bias[items], minlength=n_users)
                 / (USER_DAMPING + np.bincount(users, minlength=n_users)))
    test_users, test_items, test_r = flat(TEST)
    e = test_r - (mu + user_bias[test_users] + item_bias[test_items])
    out = baseline_errors(row, item_bias, item_members, mu)
    np.testing.assert_allclose(out[1], [e @ e, np.abs(e).sum(), e.shape[0]])
    np.testing.assert_allclose(out[0], [np.sum((test_r - mu) ** 2), np.abs(test_r - mu).sum(), e.shape[0]])
