"""Numba kernels: one SGD pass over one rating block, and block error sums.

Pure functions over arrays and scalars: no I/O, no Dask, no config objects.
The one random choice, the order in which a block's runs are visited, is a
shuffle drawn from a seed that comes in as an argument (a SplitMix64 stream,
so the same seed gives the same order on every machine). Factors are float32,
indices int32; sums of squared errors are accumulated in float64.

An SGD pass takes a block's ratings laid out in *runs*: ``run_starts`` cuts the
positions into runs, which are taken in the seeded shuffle's order; inside a
run, the positions are applied front to back. For ``train.order:
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

computed as ``p_u (1 - lr reg) + (lr e) q_i`` and alike.

The kernels update ``P``, ``Q`` and the biases in place; the task functions that
call them (``tasks/training.py``) hand them private copies.

On sparse data most ratings meet a factor row that is not in cache: with a few
ratings a user and a few dozen an item in a block, no visiting order keeps both
sides cached, and a rating waited about 200 ns for memory (2M users × 500k items,
20M ratings: 3.7M ratings/s a thread). So the SGD pass asks the CPU for the rows
of the rating ``PREFETCH_AHEAD`` places further on in visiting order while it
works on this one (about 2x on that shape, 1.4x at 480k users and 10M ratings,
even at Netflix density: ``scripts/bench_kernel.py --prefetch 16 0``).
Prefetches change no arithmetic.
"""

from __future__ import annotations

import functools
from typing import Any

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from funkflow.tasks.counting import mix64_one
from funkflow.tasks.hashing import GOLDEN

# 'reassoc' lets LLVM vectorise the dot product; 'contract' allows FMA. Both are
# deterministic for a given machine, which is what the bit-identity guarantees
# need. No 'nnan'/'ninf': divergence must stay visible as NaN/inf.
_FASTMATH = {"reassoc", "contract", "nsz", "arcp"}
_JIT: dict[str, Any] = {"nopython": True, "nogil": True, "cache": True, "fastmath": _FASTMATH}
# Ratings between a prefetch and the update that needs its rows: enough to cover a
# trip to memory at ~20 ns a rating, few enough that the rows are still cached.
PREFETCH_AHEAD = 16
_CACHE_LINE_FLOATS = 16


def _prefetch_typed(typingctx: Any, array: Any, row: Any, col: Any) -> Any:
    """``_prefetch(array, row, col)``: ask the CPU to bring the cache line of ``array[row, col]`` (2-D, C order)
    close, to be written. Numba has no prefetch of its own; this emits LLVM's."""
    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        array_type = signature.args[0]
        array_value = context.make_array(array_type)(context, builder, args[0])
        indices = [context.cast(builder, value, kind, types.intp)
                   for value, kind in zip(args[1:], signature.args[1:])]
        address = cgutils.get_item_pointer2(context, builder, data=array_value.data,
                                            shape=cgutils.unpack_tuple(builder, array_value.shape),
                                            strides=cgutils.unpack_tuple(builder, array_value.strides),
                                            layout=array_type.layout, inds=indices)
        byte_pointer = ir.IntType(8).as_pointer()
        i32 = ir.IntType(32)
        prefetch = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [byte_pointer, i32, i32, i32]), "llvm.prefetch.p0")
        # (address, 1: for writing, 3: keep in every cache level, 1: data)
        builder.call(prefetch, [builder.bitcast(address, byte_pointer), ir.Constant(i32, 1), ir.Constant(i32, 3),
                                ir.Constant(i32, 1)])
        return context.get_dummy_value()

    return types.void(array, row, col), codegen


_prefetch: Any = intrinsic(_prefetch_typed)  # Any: called from jitted code with three arguments


@numba.jit(**_JIT)
def _prefetch_rows(P: np.ndarray, Q: np.ndarray, u: int, i: int) -> None:
    for f in range(0, P.shape[1], _CACHE_LINE_FLOATS):
        _prefetch(P, u, f)
        _prefetch(Q, i, f)




@numba.jit(**_JIT)
def shuffled_runs(n_runs: int, seed: np.uint64) -> np.ndarray:
    """``0 .. n_runs - 1`` in the order of a Fisher-Yates shuffle driven by SplitMix64 from ``seed``, int64."""
    order = np.arange(n_runs, dtype=np.int64)
    state = np.uint64(seed)
    for i in range(n_runs - 1, 0, -1):
        state += GOLDEN
        j = np.int64(mix64_one(state) % np.uint64(i + 1))
        order[i], order[j] = order[j], order[i]
    return order


@numba.jit(**_JIT)
def _advance(run_starts: np.ndarray, run_order: np.ndarray, t: int, j: int, end: int) -> tuple[int, int, int]:
    """The position after ``j`` (in run ``run_order[t]``, which ends at ``end``) in visiting order: skips to
    the start of the next non-empty run; ``t`` reaches ``len(run_order)`` past the last rating."""
    j += 1
    while j >= end:
        t += 1
        if t >= run_order.shape[0]:
            return t, 0, 0
        j, end = run_starts[run_order[t]], run_starts[run_order[t] + 1]
    return t, j, end


def sgd_block(
    users: np.ndarray,
    items: np.ndarray,
    ratings: np.ndarray,
    run_starts: np.ndarray,
    order_seed: np.uint64,
    P: np.ndarray,
    Q: np.ndarray,
    user_bias: np.ndarray,
    item_bias: np.ndarray,
    global_mean: np.float32,
    lr: np.float32,
    reg: np.float32,
    bias_reg: np.float32,
    use_bias: bool,
    prefetch_ahead: int,
) -> float:
    """One SGD pass of Funk SVD over a block, run by run, the runs in a seeded random order.

    Parameters
    ----------
    users, items : arrays of shape (n,), int32
        Block-local row indices into ``P`` / ``user_bias`` and ``Q`` / ``item_bias``, in visiting order
        within each run (:meth:`funkflow.tasks.blocks.BlockRatings.in_runs` lays them out).
    ratings : array of shape (n,), float32
    run_starts : array of shape (n_runs + 1,), int64
        Run ``r`` is positions ``run_starts[r]`` to ``run_starts[r + 1] - 1``.
    order_seed : uint64, the seed of the order the runs are visited in (:func:`shuffled_runs`)
    P : array of shape (n_users_block, k'), float32, updated in place
    Q : array of shape (n_items_block, k'), float32, updated in place
    user_bias : array of shape (n_users_block,), float32, updated in place
    item_bias : array of shape (n_items_block,), float32, updated in place
    global_mean, lr, reg, bias_reg : float32 scalars
    use_bias : False for k-only Funk SVD (``r̂ = p_u · q_i``): biases and mean unused
    prefetch_ahead : ask for the rows of the rating this many places ahead (``PREFETCH_AHEAD``; 0: none)

    Returns
    -------
    float
        Sum of squared errors seen during the pass (each before its update).
    """
    return _sgd_pass(P.shape[1])(users, items, ratings, run_starts, order_seed, P, Q, user_bias, item_bias,
                                 global_mean, lr, reg, bias_reg, use_bias, prefetch_ahead)


@functools.cache
def _sgd_pass(width: int) -> Any:
    """:func:`sgd_block` compiled for factor rows of exactly ``width`` floats (Numba caches one per width).

    With the width a constant, LLVM unrolls the loops over a row and keeps both rows in registers from the
    dot product to the update, instead of reading them again and checking at run time whether they overlap.
    """
    @numba.jit(**_JIT)
    def sgd_pass(users: np.ndarray, items: np.ndarray, ratings: np.ndarray, run_starts: np.ndarray,
                 order_seed: np.uint64, P: np.ndarray, Q: np.ndarray, user_bias: np.ndarray,
                 item_bias: np.ndarray, global_mean: np.float32, lr: np.float32, reg: np.float32,
                 bias_reg: np.float32, use_bias: bool, prefetch_ahead: int) -> float:
        sse = 0.0
        decay = np.float32(1.0) - lr * reg
        bias_decay = np.float32(1.0) - lr * bias_reg
        run_order = shuffled_runs(run_starts.shape[0] - 1, order_seed)
        n_runs = run_order.shape[0]
        # A second cursor walks the visiting order prefetch_ahead ratings ahead: (run t_ahead, position j_ahead).
        t_ahead, j_ahead, end_ahead = (-1, 0, 0) if prefetch_ahead > 0 else (n_runs, 0, 0)
        for _ in range(prefetch_ahead + 1 if prefetch_ahead > 0 else 0):
            t_ahead, j_ahead, end_ahead = _advance(run_starts, run_order, t_ahead, j_ahead, end_ahead)
        for t in range(n_runs):
            run = run_order[t]
            for j in range(run_starts[run], run_starts[run + 1]):
                if t_ahead < n_runs:
                    _prefetch_rows(P, Q, users[j_ahead], items[j_ahead])
                    t_ahead, j_ahead, end_ahead = _advance(run_starts, run_order, t_ahead, j_ahead, end_ahead)
                u = users[j]
                i = items[j]
                p_u = P[u]
                q_i = Q[i]
                pred = np.float32(0.0)
                if use_bias:
                    pred = global_mean + user_bias[u] + item_bias[i]
                for f in range(width):
                    pred += p_u[f] * q_i[f]
                e = ratings[j] - pred
                sse += np.float64(e) * np.float64(e)
                step = lr * e
                if use_bias:
                    user_bias[u] = bias_decay * user_bias[u] + step
                    item_bias[i] = bias_decay * item_bias[i] + step
                for f in range(width):
                    p = p_u[f]
                    q = q_i[f]
                    p_u[f] = decay * p + step * q
                    q_i[f] = decay * q + step * p
        return sse

    return sgd_pass


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
    return _errors_pass(P.shape[1])(users, items, ratings, P, Q, user_bias, item_bias, global_mean)


@functools.cache
def _errors_pass(width: int) -> Any:
    """:func:`block_errors` compiled for factor rows of exactly ``width`` floats, as :func:`_sgd_pass`."""
    @numba.jit(**_JIT)
    def errors_pass(users: np.ndarray, items: np.ndarray, ratings: np.ndarray, P: np.ndarray, Q: np.ndarray,
                    user_bias: np.ndarray, item_bias: np.ndarray, global_mean: np.float32) -> tuple[float, float]:
        sse = 0.0
        sae = 0.0
        n = users.shape[0]
        for j in range(n):
            if j + PREFETCH_AHEAD < n:
                _prefetch_rows(P, Q, users[j + PREFETCH_AHEAD], items[j + PREFETCH_AHEAD])
            u = users[j]
            i = items[j]
            p_u = P[u]
            q_i = Q[i]
            pred = global_mean + user_bias[u] + item_bias[i]
            for f in range(width):
                pred += p_u[f] * q_i[f]
            e = np.float64(ratings[j] - pred)
            sse += e * e
            sae += abs(e)
        return sse, sae

    return errors_pass


@numba.jit(nopython=True, nogil=True, cache=True, fastmath={"reassoc"})
def all_finite(values: np.ndarray) -> bool:
    """Whether every value of a 1-D float array is finite, in one vectorised pass.

    ``x * 0`` is 0 for a finite ``x`` and NaN for inf or NaN, and a NaN survives the
    sum; 'reassoc' alone lets LLVM vectorise the sum but not fold ``x * 0`` away (that
    would need 'nnan'). Twice as fast as numpy's float64 sum, and no overflow to mistake.
    """
    total = values.dtype.type(0.0)
    for j in range(values.shape[0]):
        total += values[j] * values.dtype.type(0.0)
    return total == 0.0
