"""Numba kernels: one SGD pass over one rating block, and block error sums.

Pure functions over arrays and scalars: no I/O, no Dask, no config objects, no
randomness (the visiting order comes in as arguments). Factors are float32,
indices int32; sums of squared errors are accumulated in float64.

An SGD pass takes a block's ratings laid out in *runs*: ``run_starts`` cuts the
positions into runs, and ``run_order`` says in which order the runs are taken;
inside a run, the positions are applied front to back. For ``train.order:
user_runs`` a run is ``users_per_run`` consecutive users whose ratings are laid
out in *tiles* of ``tile_items`` consecutive item indices: tile by tile, and in
a tile user by user in item order (:meth:`BlockRatings.in_runs
<funkflow.tasks.blocks.BlockRatings.in_runs>`, computed once per block). So a
run of a thousand users reads one tile's item factors many times while they are
in cache, as LIBMF's small blocks do, and the loop does no work per (tile, user)
pair: on sparse blocks, with about one rating per user and tile, that
bookkeeping cost as much as a rating. Runs of one rating each in a random order
give plain random-order SGD.

The update is the one in DESIGN.md, for one rating ``(u, i, r)`` with error
``e = r - r̂``::

    b_u += lr (e - bias_reg b_u)
    b_i += lr (e - bias_reg b_i)
    p_u += lr (e q_i - reg p_u)
    q_i += lr (e p_u - reg q_i)      # the old p_u

The kernels update ``P``, ``Q`` and the biases in place; the task functions that
call them (``tasks/training.py``) hand them private copies.
"""

from __future__ import annotations

from typing import Any

import numba
import numpy as np

# 'reassoc' lets LLVM vectorise the dot product; 'contract' allows FMA. Both are
# deterministic for a given machine, which is what the bit-identity guarantees
# need. No 'nnan'/'ninf': divergence must stay visible as NaN/inf.
_FASTMATH = {"reassoc", "contract", "nsz", "arcp"}
_JIT: dict[str, Any] = {"nopython": True, "nogil": True, "cache": True, "fastmath": _FASTMATH}


@numba.jit(**_JIT)
def sgd_block(
    users: np.ndarray,
    items: np.ndarray,
    ratings: np.ndarray,
    run_starts: np.ndarray,
    run_order: np.ndarray,
    P: np.ndarray,
    Q: np.ndarray,
    user_bias: np.ndarray,
    item_bias: np.ndarray,
    global_mean: np.float32,
    lr: np.float32,
    reg: np.float32,
    bias_reg: np.float32,
    use_bias: bool,
) -> float:
    """One SGD pass of Funk SVD over a block, run by run.

    Parameters
    ----------
    users, items : arrays of shape (n,), int32
        Block-local row indices into ``P`` / ``user_bias`` and ``Q`` / ``item_bias``, in visiting order
        within each run (:meth:`funkflow.tasks.blocks.BlockRatings.in_runs` lays them out).
    ratings : array of shape (n,), float32
    run_starts : array of shape (n_runs + 1,), int64
        Run ``r`` is positions ``run_starts[r]`` to ``run_starts[r + 1] - 1``.
    run_order : array of shape (n_runs,), int64
        The runs, in the order they are visited.
    P : array of shape (n_users_block, k'), float32, updated in place
    Q : array of shape (n_items_block, k'), float32, updated in place
    user_bias : array of shape (n_users_block,), float32, updated in place
    item_bias : array of shape (n_items_block,), float32, updated in place
    global_mean, lr, reg, bias_reg : float32 scalars
    use_bias : False for k-only Funk SVD (``r̂ = p_u · q_i``): biases and mean unused

    Returns
    -------
    float
        Sum of squared errors seen during the pass (each before its update).
    """
    k = P.shape[1]
    sse = 0.0
    for t in range(run_order.shape[0]):
        run = run_order[t]
        for j in range(run_starts[run], run_starts[run + 1]):
            u = users[j]
            i = items[j]
            pred = np.float32(0.0)
            if use_bias:
                pred = global_mean + user_bias[u] + item_bias[i]
            for f in range(k):
                pred += P[u, f] * Q[i, f]
            e = ratings[j] - pred
            sse += np.float64(e) * np.float64(e)
            if use_bias:
                user_bias[u] += lr * (e - bias_reg * user_bias[u])
                item_bias[i] += lr * (e - bias_reg * item_bias[i])
            for f in range(k):
                p = P[u, f]
                q = Q[i, f]
                P[u, f] = p + lr * (e * q - reg * p)
                Q[i, f] = q + lr * (e * p - reg * q)
    return sse


@numba.jit(**_JIT)
def block_errors(
    users: np.ndarray,
    items: np.ndarray,
    ratings: np.ndarray,
    P: np.ndarray,
    Q: np.ndarray,
    user_bias: np.ndarray,
    item_bias: np.ndarray,
    global_mean: np.float32,
) -> tuple[float, float]:
    """Sum of squared and of absolute errors of the model over a block.

    Returns
    -------
    (float, float)
        ``Σ e²`` and ``Σ |e|`` in float64, summed in the block's own order.
    """
    k = P.shape[1]
    sse = 0.0
    sae = 0.0
    for j in range(users.shape[0]):
        u = users[j]
        i = items[j]
        pred = global_mean + user_bias[u] + item_bias[i]
        for f in range(k):
            pred += P[u, f] * Q[i, f]
        e = np.float64(ratings[j] - pred)
        sse += e * e
        sae += abs(e)
    return sse, sae
