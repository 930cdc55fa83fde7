"""The numba kernels against the float64 reference, and the reference against finite differences."""

from __future__ import annotations

import numpy as np
import pytest

from funkflow.tasks import kernels, reference


def _problem(seed: int, n_users: int = 7, n_items: int = 5, n: int = 25, k: int = 4):
    rng = np.random.default_rng(seed)
    users = rng.integers(0, n_users, n).astype(np.int32)
    items = rng.integers(0, n_items, n).astype(np.int32)
    ratings = rng.uniform(1, 5, n).astype(np.float32)
    P = rng.normal(0, 0.3, (n_users, k)).astype(np.float32)
    Q = rng.normal(0, 0.3, (n_items, k)).astype(np.float32)
    user_bias = rng.normal(0, 0.2, n_users).astype(np.float32)
    item_bias = rng.normal(0, 0.2, n_items).astype(np.float32)
    order = rng.permutation(n)
    return users, items, ratings, order, P, Q, user_bias, item_bias


def _visit(users: np.ndarray, items: np.ndarray, users_per_run: int, tile_items: int, seed: int = 5):
    """Segments (one per user), runs of ``users_per_run`` users in a shuffled order, and the flat
    position order the kernel must follow: run by run, tile by tile, user by user, item by item.
    Positions must be sorted by (user, item)."""
    n = users.shape[0]
    segments = np.append(np.flatnonzero(np.r_[True, np.diff(users) != 0]), n).astype(np.int64)
    run_bounds = np.append(np.arange(0, segments.shape[0] - 1, users_per_run), segments.shape[0] - 1)
    run_order = kernels.shuffled_runs(run_bounds.shape[0] - 1, np.uint64(seed))
    tile = tile_items or int(items.max()) + 1
    flat = []
    for run in run_order:
        for lo in range(0, int(items.max()) + 1, tile):
            for s in range(run_bounds[run], run_bounds[run + 1]):
                flat += [j for j in range(segments[s], segments[s + 1]) if lo <= items[j] < lo + tile]
    return segments, run_bounds.astype(np.int64), run_order, np.array(flat)


@pytest.mark.parametrize("use_bias", [True, False])
@pytest.mark.parametrize("users_per_run,tile_items", [(1, 0), (3, 0), (3, 2), (7, 1)])
def test_sgd_kernel_in_runs_matches_reference(use_bias, users_per_run, tile_items):
    """The block laid out in runs (BlockRatings.in_runs), the runs in a shuffled order: the kernel applies
    exactly the updates of the reference visiting run by run, tile by tile, user by user, item by item."""
    from funkflow.tasks.blocks import BlockRatings

    users, items, ratings, _, P, Q, ub, ib = _problem(0)
    by_user_item = np.lexsort((items, users))
    users, items, ratings = users[by_user_item], items[by_user_item], ratings[by_user_item]
    _, _, run_order, order = _visit(users, items, users_per_run, tile_items)
    assert sorted(order.tolist()) == list(range(users.shape[0]))
    layout = BlockRatings(users, items, ratings).in_runs(users_per_run, tile_items)
    mu, lr, reg, bias_reg = 3.5, 0.05, 0.02, 0.01
    ref = [a.astype(np.float64) for a in (P, Q, ub, ib)]
    sse_ref = reference.sgd_pass(users, items, ratings, order, *ref, mu, lr, reg, bias_reg, use_bias=use_bias)
    P0, Q0, ub0, ib0 = P.copy(), Q.copy(), ub.copy(), ib.copy()
    sse = kernels.sgd_block(*layout, np.uint64(5), P, Q, ub, ib, np.float32(mu), np.float32(lr), np.float32(reg),
                            np.float32(bias_reg), use_bias, kernels.PREFETCH_AHEAD)
    assert not np.allclose(P, P0) and not np.allclose(Q, Q0)
    np.testing.assert_allclose(P, ref[0], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(Q, ref[1], rtol=1e-4, atol=1e-5)
    if use_bias:
        np.testing.assert_allclose(ub, ref[2], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(ib, ref[3], rtol=1e-4, atol=1e-5)
    else:
        np.testing.assert_array_equal(ub, ub0)
        np.testing.assert_array_equal(ib, ib0)
    assert sse == pytest.approx(sse_ref, rel=1e-4)


@pytest.mark.parametrize("users_per_run,tile_items", [(1, 0), (3, 0), (3, 2), (7, 1), (1024, 4), (2, 100)])
def test_runs_are_laid_out_tile_by_tile_user_by_user(users_per_run, tile_items):
    """in_runs puts each run's ratings in the order of walking its tiles, user by user, item by item."""
    from funkflow.tasks.blocks import BlockRatings

    rng = np.random.default_rng(7)
    keys = np.unique(rng.integers(0, 40 * 30, 300))
    users, items = (keys // 30).astype(np.int32), (keys % 30).astype(np.int32)
    ratings = rng.uniform(1, 5, keys.shape[0]).astype(np.float32)
    _, run_bounds, run_order, order = _visit(users, items, users_per_run, tile_items)
    layout = BlockRatings(users, items, ratings).in_runs(users_per_run, tile_items)
    assert layout.run_starts.shape[0] == run_bounds.shape[0]
    walked = np.concatenate([np.arange(layout.run_starts[r], layout.run_starts[r + 1]) for r in run_order])
    np.testing.assert_array_equal(layout.users[walked], users[order])
    np.testing.assert_array_equal(layout.items[walked], items[order])
    np.testing.assert_array_equal(layout.ratings[walked], ratings[order])


@pytest.mark.parametrize("k", [1, 16, 50, 100])
def test_kernels_at_a_padded_row_width_match_reference(k):
    """The kernels are compiled per row width (training pads rows to a multiple of 16): at each, the SGD pass
    and the error sums are the reference's, and the padding columns stay zero."""
    from funkflow.tasks.training import padded_rows

    users, items, ratings, order, P, Q, ub, ib = _problem(11, n=60, k=k)
    singles = np.arange(users.shape[0] + 1, dtype=np.int64)
    order = kernels.shuffled_runs(users.shape[0], np.uint64(3))
    ref = [a.astype(np.float64) for a in (P, Q, ub, ib)]
    sse_ref = reference.sgd_pass(users, items, ratings, order, *ref, 3.0, 0.05, 0.02, 0.01)
    P, Q = padded_rows(P), padded_rows(Q)
    sse = kernels.sgd_block(users, items, ratings, singles, np.uint64(3), P, Q, ub, ib, np.float32(3.0),
                            np.float32(0.05), np.float32(0.02), np.float32(0.01), True, kernels.PREFETCH_AHEAD)
    assert sse == pytest.approx(sse_ref, rel=1e-4)
    np.testing.assert_allclose(P[:, :k], ref[0], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(Q[:, :k], ref[1], rtol=1e-4, atol=1e-5)
    assert not P[:, k:].any() and not Q[:, k:].any()
    errors = [ratings[j] - reference.predict(users[j], items[j], ref[0], ref[1], ref[2], ref[3], 3.0)
              for j in range(users.shape[0])]
    sse, sae = kernels.block_errors(users, items, ratings, P, Q, ub, ib, np.float32(3.0))
    assert (sse, sae) == pytest.approx((np.sum(np.square(errors)), np.sum(np.abs(errors))), rel=1e-4)


def test_sgd_kernel_in_random_rating_order_matches_reference():
    """Runs of one rating each: plain random-order SGD, in the order the seeded shuffle gives."""
    users, items, ratings, _, P, Q, ub, ib = _problem(4)
    singles = np.arange(users.shape[0] + 1, dtype=np.int64)
    order = kernels.shuffled_runs(users.shape[0], np.uint64(9))
    ref = [a.astype(np.float64) for a in (P, Q, ub, ib)]
    sse_ref = reference.sgd_pass(users, items, ratings, order, *ref, 3.0, 0.05, 0.02, 0.01)
    sse = kernels.sgd_block(users, items, ratings, singles, np.uint64(9), P, Q, ub, ib, np.float32(3.0),
                            np.float32(0.05), np.float32(0.02), np.float32(0.01), True, kernels.PREFETCH_AHEAD)
    np.testing.assert_allclose(P, ref[0], rtol=1e-4, atol=1e-5)
    assert sse == pytest.approx(sse_ref, rel=1e-4)


def test_kernel_uses_old_user_factors_in_item_step():
    """One rating by hand: q_i must move with p_u from before the step."""
    P = np.array([[0.5, -0.2]], dtype=np.float32)
    Q = np.array([[0.3, 0.4]], dtype=np.float32)
    ub, ib = np.zeros(1, np.float32), np.zeros(1, np.float32)
    lr, reg = 0.1, 0.05
    e = 4.0 - (3.0 + float(P[0] @ Q[0]))
    p_new = P[0] + lr * (e * Q[0] - reg * P[0])
    q_new = Q[0] + lr * (e * P[0] - reg * Q[0])
    kernels.sgd_block(np.zeros(1, np.int32), np.zeros(1, np.int32), np.array([4.0], np.float32), np.array([0, 1]),
                      np.uint64(0), P, Q, ub, ib, np.float32(3.0), np.float32(lr), np.float32(reg),
                      np.float32(0.0), True, kernels.PREFETCH_AHEAD)
    np.testing.assert_allclose(P[0], p_new, rtol=1e-6)
    np.testing.assert_allclose(Q[0], q_new, rtol=1e-6)
    assert ub[0] == pytest.approx(lr * e, rel=1e-6)


@pytest.mark.parametrize("use_bias", [True, False])
def test_gradient_matches_central_differences(use_bias):
    users, items, ratings, _, P, Q, ub, ib = _problem(1, n=6, k=3)
    params = {"p_u": P.astype(np.float64), "q_i": Q.astype(np.float64),
              "b_u": ub.astype(np.float64), "b_i": ib.astype(np.float64)}
    mu, reg, bias_reg, h = 3.2, 0.07, 0.03, 1e-6
    for u, i, r in zip(users, items, ratings):
        u, i, r = int(u), int(i), float(r)

        def loss():
            return reference.rating_loss(u, i, r, params["p_u"], params["q_i"], params["b_u"], params["b_i"],
                                         mu, reg, bias_reg, use_bias)

        grad = reference.rating_gradient(u, i, r, params["p_u"], params["q_i"], params["b_u"], params["b_i"],
                                         mu, reg, bias_reg, use_bias)
        for name, row in (("p_u", u), ("q_i", i), ("b_u", u), ("b_i", i)):
            if name not in grad:
                continue
            array = params[name]
            numeric = np.zeros_like(np.atleast_1d(grad[name]), dtype=np.float64)
            for f in range(numeric.shape[0]):
                index = (row, f) if array.ndim == 2 else (row,)
                keep = array[index]
                array[index] = keep + h
                up = loss()
                array[index] = keep - h
                down = loss()
                array[index] = keep
                numeric[f] = (up - down) / (2 * h)
            np.testing.assert_allclose(np.atleast_1d(grad[name]), numeric, rtol=1e-6, atol=1e-8)


def test_block_errors_match_numpy():
    users, items, ratings, _, P, Q, ub, ib = _problem(2)
    mu = np.float32(3.1)
    expected = mu + ub[users] + ib[items] + np.einsum("nk,nk->n", P[users], Q[items])
    sse, sae = kernels.block_errors(users, items, ratings, P, Q, ub, ib, mu)
    e = ratings.astype(np.float64) - expected
    assert sse == pytest.approx(float(e @ e), rel=1e-5)
    assert sae == pytest.approx(float(np.abs(e).sum()), rel=1e-5)


def test_empty_block_is_a_no_op():
    users, items, ratings, _, P, Q, ub, ib = _problem(3)
    before = P.copy()
    empty_i, empty_f = np.zeros(0, np.int32), np.zeros(0, np.float32)
    sse = kernels.sgd_block(empty_i, empty_i, empty_f, np.zeros(1, np.int64), np.uint64(0), P, Q[:0],
                            ub, ib[:0], np.float32(3), np.float32(0.1), np.float32(0.1), np.float32(0.1), True,
                            kernels.PREFETCH_AHEAD)
    assert sse == 0.0
    np.testing.assert_array_equal(P, before)


@pytest.mark.parametrize("order,users_per_run", [("user_runs", 1), ("user_runs", 2), ("user_runs", 9),
                                                 ("ratings", 1), ("sorted", 1)])
def test_visiting_layout_covers_each_rating_once(order, users_per_run):
    from funkflow.tasks.blocks import BlockRatings
    from funkflow.tasks.training import visiting_layout

    users = np.array([0, 0, 0, 2, 2, 5, 7, 7, 7, 7], dtype=np.int32)
    block = BlockRatings(users, np.arange(10, dtype=np.int32), np.arange(10, dtype=np.float32))
    layout = visiting_layout(block, order, users_per_run, 4)
    run_order = kernels.shuffled_runs(layout.run_starts.shape[0] - 1, np.uint64(3))
    runs = [np.arange(layout.run_starts[r], layout.run_starts[r + 1]) for r in run_order]
    visited = layout.ratings[np.concatenate(runs)].astype(int)  # the ratings are the original positions
    assert sorted(visited.tolist()) == list(range(10))
    if order == "user_runs":
        assert len(runs) == -(-4 // users_per_run)
        assert all(len(set(layout.users[run].tolist())) <= users_per_run for run in runs)
        assert sorted(u for run in runs for u in set(layout.users[run].tolist())) == [0, 2, 5, 7]  # no user split
    if order == "sorted":
        assert visited.tolist() == list(range(10))
    empty = BlockRatings(users[:0], users[:0], np.ones(0, np.float32))
    layout = visiting_layout(empty, order, users_per_run, 4)
    assert layout.run_starts.tolist() == [0] * layout.run_starts.shape[0]


def test_the_run_shuffle_is_a_seeded_permutation():
    orders = {tuple(kernels.shuffled_runs(12, np.uint64(seed)).tolist()) for seed in range(50)}
    assert all(sorted(order) == list(range(12)) for order in orders) and len(orders) == 50
    assert kernels.shuffled_runs(12, np.uint64(7)).tolist() == kernels.shuffled_runs(12, np.uint64(7)).tolist()
    assert kernels.shuffled_runs(0, np.uint64(1)).shape == (0,)
    assert kernels.shuffled_runs(1, np.uint64(1)).tolist() == [0]


def test_tiles_reorder_only_updates_that_commute():
    """Within a run, tiles change neither the order of one user's ratings nor the order of one item's users, so
    the factors come out bit-identical to one tile; only the error sum is added in another order."""
    from funkflow.tasks import training
    from funkflow.tasks.blocks import BlockRatings, RowBlock

    rng = np.random.default_rng(1)
    pairs = np.unique(rng.integers(0, 60 * 40, 900))
    users, items = (pairs // 40).astype(np.int32), (pairs % 40).astype(np.int32)
    ratings = rng.integers(1, 6, users.shape[0]).astype(np.float32)
    empty = BlockRatings(*(np.empty(0, dtype=t) for t in (np.int32, np.int32, np.float32)))
    row = RowBlock(0, np.arange(60, dtype=np.int32), ((BlockRatings(users, items, ratings),), (empty,), (empty,)))

    def update(users_per_run, tile_items):
        hyper = training.Hyper(lr=0.02, reg=0.05, bias_reg=0.01, use_bias=True, global_mean=3.0,
                               order="user_runs", users_per_run=users_per_run, tile_items=tile_items)
        return training.sgd_update(row.split(0)[0], training.init_factors(60, 8, 0.1, 1),
                                   training.init_factors(40, 8, 0.1, 2), hyper, 7)

    whole, tiled = update(16, 0), update(16, 8)
    for a, b in zip((*whole[0], *whole[1]), (*tiled[0], *tiled[1])):
        np.testing.assert_array_equal(a, b)
    assert tiled[2] == pytest.approx(whole[2], rel=1e-9)
    assert not np.array_equal(update(4, 8)[0][0], whole[0][0])  # the runs do change the model


def test_padded_rows_start_on_a_cache_line_and_keep_the_factors():
    from funkflow.tasks import training

    rng = np.random.default_rng(0)
    for n, k in [(1, 1), (7, 16), (1000, 50), (20_000, 64), (3, 128)]:
        for _ in range(3):  # the allocator's offset varies from call to call
            factors = rng.normal(size=(n, k)).astype(np.float32)
            padded = training.padded_rows(factors)
            assert padded.ctypes.data % training.CACHE_LINE == 0
            assert padded.shape == (n, -(-k // 16) * 16) and padded.flags.c_contiguous
            np.testing.assert_array_equal(padded[:, :k], factors)
            assert not padded[:, k:].any()


def test_padding_factor_rows_leaves_the_update_unchanged_but_for_rounding():
    """sgd_update pads rows to 16 floats for speed; the zero columns stay zero and the result matches the
    unpadded update to float32 rounding."""
    from funkflow.tasks import training
    from funkflow.tasks.blocks import BlockRatings, RowBlock

    rng = np.random.default_rng(0)
    users = np.sort(rng.integers(0, 40, 600)).astype(np.int32)
    items = rng.integers(0, 30, 600).astype(np.int32)
    ratings = rng.integers(1, 6, 600).astype(np.float32)
    empty = BlockRatings(*(np.empty(0, dtype=t) for t in (np.int32, np.int32, np.float32)))
    row = RowBlock(0, np.arange(40, dtype=np.int32), ((BlockRatings(users, items, ratings),), (empty,), (empty,)))
    hyper = training.Hyper(lr=0.01, reg=0.05, bias_reg=0.01, use_bias=True, global_mean=3.0, order="user_runs",
                           users_per_run=4, tile_items=8)
    user, item = training.init_factors(40, 50, 0.1, 1), training.init_factors(30, 50, 0.1, 2)
    padded = training.sgd_update(row.split(0)[0], user, item, hyper, 7)
    assert training.padded_rows(user[0]).shape == (40, 64) and padded[0][0].shape == (40, 50)
    original = training.ALIGN_FLOATS
    try:
        training.ALIGN_FLOATS = 1
        plain = training.sgd_update(row.split(0)[0], user, item, hyper, 7)
    finally:
        training.ALIGN_FLOATS = original
    for a, b in zip((*padded[0], *padded[1]), (*plain[0], *plain[1])):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    assert padded[2] == pytest.approx(plain[2], rel=1e-5)


def test_the_prefetch_cursor_walks_the_visiting_order_and_changes_no_bits():
    """The look-ahead cursor visits every position in visiting order, across empty runs; however far ahead it
    prefetches, the pass computes the same bits."""
    rng = np.random.default_rng(5)
    sizes = np.array([3, 0, 0, 5, 1, 0, 7, 2, 0])
    run_starts = np.concatenate(([0], np.cumsum(sizes))).astype(np.int64)
    run_order = kernels.shuffled_runs(sizes.shape[0], np.uint64(5))
    expected = [j for run in run_order for j in range(run_starts[run], run_starts[run + 1])]
    walked, (t, j, end) = [], (-1, 0, 0)
    while True:
        t, j, end = kernels._advance(run_starts, run_order, t, j, end)
        if t >= run_order.shape[0]:
            break
        walked.append(int(j))
    assert walked == expected

    n = int(run_starts[-1])
    users, items = rng.integers(0, 6, n).astype(np.int32), rng.integers(0, 4, n).astype(np.int32)
    ratings = rng.integers(1, 6, n).astype(np.float32)
    start = [rng.normal(0, 0.1, (6, 16)).astype(np.float32), rng.normal(0, 0.1, (4, 16)).astype(np.float32),
             np.zeros(6, np.float32), np.zeros(4, np.float32)]
    results = []
    for ahead in (0, 1, 16, n + 5):
        P, Q, ub, ib = (a.copy() for a in start)
        sse = kernels.sgd_block(users, items, ratings, run_starts, np.uint64(5), P, Q, ub, ib, np.float32(3.0),
                                np.float32(0.05), np.float32(0.02), np.float32(0.01), True, ahead)
        results.append((sse, P.tobytes(), Q.tobytes(), ub.tobytes(), ib.tobytes()))
    assert all(r == results[0] for r in results) and results[0][1] != start[0].tobytes()


@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
def test_all_finite_finds_one_bad_value_and_no_overflow_in_large_ones(bad):
    values = np.random.default_rng(0).normal(size=10_001).astype(np.float32)
    assert kernels.all_finite(values) and kernels.all_finite(np.zeros(0, np.float32))
    assert kernels.all_finite(np.full(1000, 3e38, np.float32)), "a sum of these overflows; they are finite"
    values[7777] = bad
    assert not kernels.all_finite(values)
