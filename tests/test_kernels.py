"""The numba kernels against the float64 reference, and the reference against finite differences."""

from __future__ import annotations

import numpy as np
import pytest

from tasks import kernels, reference


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


def _as_runs(order: np.ndarray, run_length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cut positions 0..n-1 into runs of ``run_length`` visited in a shuffled order.

    Returns the run arrays for the kernel and the flat position order they imply.
    """
    n = order.shape[0]
    run_starts = np.append(np.arange(0, n, run_length), n).astype(np.int64)
    run_order = np.random.default_rng(5).permutation(run_starts.shape[0] - 1)
    flat = np.concatenate([np.arange(run_starts[s], run_starts[s + 1]) for s in run_order])
    return run_starts, run_order, flat


@pytest.mark.parametrize("use_bias", [True, False])
@pytest.mark.parametrize("run_length", [1, 4])
def test_sgd_kernel_matches_reference(use_bias, run_length):
    users, items, ratings, order, P, Q, ub, ib = _problem(0)
    run_starts, run_order, order = _as_runs(order, run_length)
    mu, lr, reg, bias_reg = 3.5, 0.05, 0.02, 0.01
    ref = [a.astype(np.float64) for a in (P, Q, ub, ib)]
    sse_ref = reference.sgd_pass(users, items, ratings, order, *ref, mu, lr, reg, bias_reg, use_bias=use_bias)
    P0, Q0 = P.copy(), Q.copy()
    if use_bias:
        sse = kernels.sgd_block_biased(users, items, ratings, run_starts, run_order, P, Q, ub, ib,
                                       np.float32(mu), np.float32(lr), np.float32(reg), np.float32(bias_reg))
        np.testing.assert_allclose(ub, ref[2], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(ib, ref[3], rtol=1e-4, atol=1e-5)
    else:
        sse = kernels.sgd_block(users, items, ratings, run_starts, run_order, P, Q, np.float32(lr),
                                np.float32(reg))
    assert not np.allclose(P, P0) and not np.allclose(Q, Q0)
    np.testing.assert_allclose(P, ref[0], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(Q, ref[1], rtol=1e-4, atol=1e-5)
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
    kernels.sgd_block_biased(np.zeros(1, np.int32), np.zeros(1, np.int32), np.array([4.0], np.float32),
                             np.array([0, 1]), np.zeros(1, np.int64), P, Q, ub, ib, np.float32(3.0), np.float32(lr),
                             np.float32(reg), np.float32(0.0))
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


def test_predict_and_errors_match_numpy():
    users, items, ratings, _, P, Q, ub, ib = _problem(2)
    mu = np.float32(3.1)
    expected = mu + ub[users] + ib[items] + np.einsum("nk,nk->n", P[users], Q[items])
    np.testing.assert_allclose(kernels.predict_block(users, items, P, Q, ub, ib, mu), expected, rtol=1e-6)
    sse, sae = kernels.block_errors(users, items, ratings, P, Q, ub, ib, mu)
    e = ratings.astype(np.float64) - expected
    assert sse == pytest.approx(float(e @ e), rel=1e-5)
    assert sae == pytest.approx(float(np.abs(e).sum()), rel=1e-5)


def test_empty_block_is_a_no_op():
    users, items, ratings, _, P, Q, ub, ib = _problem(3)
    before = P.copy()
    empty_i, empty_f = np.zeros(0, np.int32), np.zeros(0, np.float32)
    sse = kernels.sgd_block_biased(empty_i, empty_i, empty_f, np.zeros(1, np.int64), np.zeros(0, np.int64),
                                   P, Q, ub, ib, np.float32(3), np.float32(0.1), np.float32(0.1), np.float32(0.1))
    assert sse == 0.0
    np.testing.assert_array_equal(P, before)


@pytest.mark.parametrize("order,users_per_run", [("user_runs", 1), ("user_runs", 2), ("user_runs", 9),
                                                 ("ratings", 1), ("sorted", 1)])
def test_visiting_order_covers_each_rating_once(order, users_per_run):
    from tasks.blocks import BlockRatings
    from tasks.training import visiting_order

    users = np.array([0, 0, 0, 2, 2, 5, 7, 7, 7, 7], dtype=np.int32)
    block = BlockRatings(users, np.arange(10, dtype=np.int32), np.ones(10, np.float32))
    run_starts, run_order = visiting_order(block, order, users_per_run, seed=3)
    visited = np.concatenate([np.arange(run_starts[s], run_starts[s + 1]) for s in run_order])
    assert sorted(visited.tolist()) == list(range(10))
    if order == "user_runs":
        runs = [users[run_starts[s]:run_starts[s + 1]] for s in range(run_order.shape[0])]
        assert len(runs) == -(-4 // users_per_run)
        assert all(len(set(run.tolist())) <= users_per_run for run in runs)
        assert sorted(u for run in runs for u in set(run.tolist())) == [0, 2, 5, 7]  # no user split
    if order == "sorted":
        assert visited.tolist() == list(range(10))
    empty = BlockRatings(users[:0], users[:0], np.ones(0, np.float32))
    starts, runs = visiting_order(empty, order, users_per_run, seed=3)
    assert starts.tolist()[0] == 0 and starts.tolist()[-1] == 0 and runs.shape[0] == starts.shape[0] - 1


def test_padding_factor_rows_leaves_the_update_unchanged_but_for_rounding():
    """sgd_update pads rows to 16 floats for speed; the zero columns stay zero and the result matches the
    unpadded update to float32 rounding."""
    from tasks import training
    from tasks.blocks import BlockRatings, RowBlock

    rng = np.random.default_rng(0)
    users = np.sort(rng.integers(0, 40, 600)).astype(np.int32)
    items = rng.integers(0, 30, 600).astype(np.int32)
    ratings = rng.integers(1, 6, 600).astype(np.float32)
    empty = BlockRatings(*(np.empty(0, dtype=t) for t in (np.int32, np.int32, np.float32)))
    row = RowBlock(0, np.arange(40, dtype=np.int32), ((BlockRatings(users, items, ratings),), (empty,), (empty,)))
    hyper = training.Hyper(lr=0.01, reg=0.05, bias_reg=0.01, use_bias=True, global_mean=3.0, order="user_runs",
                           users_per_run=4)
    user, item = training.init_factors(40, 50, 0.1, 1), training.init_factors(30, 50, 0.1, 2)
    padded = training.sgd_update(row, 0, user, item, hyper, 7, "padded")
    assert training._padded(user[0]).shape == (40, 64) and padded[0][0].shape == (40, 50)
    original = training.ALIGN_FLOATS
    try:
        training.ALIGN_FLOATS = 1
        plain = training.sgd_update(row, 0, user, item, hyper, 7, "plain")
    finally:
        training.ALIGN_FLOATS = original
    for a, b in zip((*padded[0], *padded[1]), (*plain[0], *plain[1])):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    assert padded[2] == pytest.approx(plain[2], rel=1e-5)
