"""Worker tasks of training: initialise factor blocks, update one block, measure a row block.

Thin wrappers around :mod:`funkflow.tasks.kernels`. During an epoch a worker
keeps its factor states in the kernels' layout (rows padded to 16 floats,
aligned to a cache line) and each block updates them in place: a worker copies
its states once an epoch (:func:`training_copy`), not once a block, and trims the
padding only where they leave it (:func:`trimmed`).

A *user state* is ``(P_r, b_r)``: array of shape (n_users_r, k) float32 and
array of shape (n_users_r,) float32. An *item state* is ``(Q_c, b_c)`` alike.
Without biases the bias arrays stay zero.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np

from funkflow.tasks import kernels
from funkflow.tasks.blocks import BlockRatings, RunLayout

FactorState = tuple[np.ndarray, np.ndarray]


class BlockUpdateError(RuntimeError):
    """An SGD block task failed; the message names the epoch, stratum and block."""


VisitOrder = Literal["user_runs", "ratings", "sorted"]


@dataclass(frozen=True)
class Hyper:
    """Hyper-parameters of one SGD block update (plain values, cheap to ship)."""

    lr: float
    reg: float
    bias_reg: float
    use_bias: bool
    global_mean: float
    order: VisitOrder
    users_per_run: int
    tile_items: int

    def __post_init__(self) -> None:
        if self.order not in get_args(VisitOrder):
            raise ValueError(f"order must be one of {', '.join(get_args(VisitOrder))}, got {self.order!r}")


def visiting_layout(block: BlockRatings, order: VisitOrder, users_per_run: int, tile_items: int) -> RunLayout:
    """A block's ratings cut into the runs that :func:`funkflow.tasks.kernels.sgd_block` visits in a seeded
    random order (the layout is kept with the block for later epochs).

    ``"user_runs"``: runs of ``users_per_run`` consecutive users (blocks are stored
    sorted by user, then item), each taken in tiles of ``tile_items`` items (0: one
    tile): each ``p_u`` stays in cache over its ratings, each tile's ``q_i`` over the
    run's users, and memory is read in long streaks. ``"ratings"``: one run per
    rating. ``"sorted"``: one run, the block front to back, no randomness.
    """
    if order == "user_runs":
        return block.in_runs(users_per_run, tile_items)
    return block.single_runs() if order == "ratings" else block.one_run()


def init_factors(n: int, k: int, init_std: float, seed: int) -> FactorState:
    """Initial factors ``N(0, init_std²)`` and zero biases for ``n`` users or items."""
    rng = np.random.default_rng(seed)
    factors = rng.normal(0.0, init_std, (n, k)).astype(np.float32)
    return factors, np.zeros(n, dtype=np.float32)


ALIGN_FLOATS = 16  # 64 bytes: a factor row that fills whole cache lines and AVX registers
CACHE_LINE = 64


def padded_rows(factors: np.ndarray) -> np.ndarray:
    """A copy of ``factors`` that starts on a cache line, its rows padded with zeros to a multiple of 16 floats.

    Rows of 50 floats straddle cache lines and leave the kernel a scalar tail;
    padded to 64 the block update runs faster (scripts/bench_kernel.py). The
    zero columns stay zero under SGD (their gradient is zero), so the model is
    unchanged; only the summation order of the dot products is. The allocator
    may return memory 16 bytes past a cache line, where half of the kernel's
    32-byte loads and stores split across two lines: 10-15% slower at k=50.
    """
    n, k = factors.shape
    width = -(-k // ALIGN_FLOATS) * ALIGN_FLOATS
    slack = CACHE_LINE // factors.itemsize
    buffer = np.zeros(n * width + slack, dtype=factors.dtype)
    start = (-buffer.ctypes.data % CACHE_LINE) // factors.itemsize
    out = buffer[start:start + n * width].reshape(n, width)
    out[:, :k] = factors
    return out


def updatable(state: FactorState) -> bool:
    """Whether the kernels can update ``state`` in place as it is: writable, and its factors in their layout
    (C-contiguous, on a cache line, rows of whole 16 floats). An array that came over the network may not be."""
    factors, bias = state
    return (factors.flags.writeable and bias.flags.writeable and factors.flags.c_contiguous
            and factors.ctypes.data % CACHE_LINE == 0 and factors.shape[1] % ALIGN_FLOATS == 0)


def training_copy(state: FactorState, buffers: Buffers | None = None) -> FactorState:
    """A private copy of a factor state in the layout the kernels update: rows padded and aligned
    (:func:`padded_rows`; a state already padded keeps its width), biases copied; into arrays that
    ``buffers`` holds for reuse, when it has ones of the shape."""
    if buffers is not None:
        return buffers.copy(state)
    return padded_rows(state[0]), state[1].copy()


class Buffers:
    """Arrays in the kernels' layout that a worker no longer needs (the factors of versions it dropped),
    kept to copy the next states into; thread-safe.

    A worker copies its factor states once an epoch. Fresh arrays of a few MB each cost their pages again
    every time where Dask's nanny sets ``MALLOC_TRIM_THRESHOLD_`` (which turns glibc's adaptive mmap
    threshold off): 30,000 page faults an epoch and twice the time on 480k users. Reused, they cost a copy.
    Arrays are made in size classes (rows rounded up to a 64th, so the column blocks of one d share them)
    and handed out as views of the rows a state needs; only the latest version given is kept, so that the
    pool never holds more than one version's arrays.
    """

    def __init__(self) -> None:
        self._free: dict[tuple[tuple[int, ...], str], list[np.ndarray]] = {}
        self._lock = threading.Lock()

    @staticmethod
    def _capacity(rows: int) -> int:
        step = max(1, -(-rows // 64))
        return -(-rows // step) * step

    def _whole(self, array: np.ndarray) -> np.ndarray | None:
        """The size-class array that ``array`` is the first rows of, if :meth:`copy` made it; else None."""
        base = array.base
        shape = (self._capacity(array.shape[0]), *array.shape[1:])
        if not isinstance(base, np.ndarray) or base.dtype != array.dtype:
            return None
        offset = array.ctypes.data - base.ctypes.data
        if offset < 0 or offset + int(np.prod(shape)) * array.itemsize > base.nbytes:
            return None
        return np.ndarray(shape, array.dtype, buffer=base, offset=offset)

    def give(self, states: Iterable[FactorState]) -> None:
        """Keep the arrays of ``states`` (nothing else may use them afterwards) in place of those kept so far."""
        kept: dict[tuple[tuple[int, ...], str], list[np.ndarray]] = {}
        for state in states:
            if updatable(state):
                for array in state:
                    whole = self._whole(array)
                    if whole is not None:
                        kept.setdefault((whole.shape, whole.dtype.str), []).append(whole)
        with self._lock:
            self._free = kept

    def _array(self, rows: int, tail: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """``rows`` (and ``tail``) of a free array of their size class, or of a new one."""
        shape = (self._capacity(rows), *tail)
        with self._lock:
            free = self._free.get((shape, dtype.str))
            whole = free.pop() if free else None
        if whole is None:
            whole = padded_rows(np.zeros(shape, dtype)) if tail else np.zeros(shape, dtype)
        return whole[:rows]

    def copy(self, state: FactorState) -> FactorState:
        factors, bias = state
        n, k = factors.shape
        out = self._array(n, (-(-k // ALIGN_FLOATS) * ALIGN_FLOATS,), factors.dtype)
        out[:, :k] = factors
        out[:, k:] = 0.0
        out_bias = self._array(n, (), bias.dtype)
        out_bias[:] = bias
        return out, out_bias

    def clear(self) -> None:
        with self._lock:
            self._free.clear()


def trimmed(state: FactorState, k: int) -> FactorState:
    """The state without the padding columns: ``k`` factors a row, contiguous (for files and the driver)."""
    factors, bias = state
    return (factors if factors.shape[1] == k else np.ascontiguousarray(factors[:, :k])), bias


def all_finite(states: Iterable[FactorState]) -> bool:
    """Whether every factor and bias of ``states`` is finite (one pass over each array)."""
    return all(kernels.all_finite(a.reshape(-1)) for state in states for a in state)


def sgd_update_in_place(block: BlockRatings, user_state: FactorState, item_state: FactorState, hyper: Hyper,
                        order_seed: int, prefetch_ahead: int = kernels.PREFETCH_AHEAD) -> float:
    """One SGD pass over ``block``, its runs in a random order drawn from ``order_seed``, updating the two
    states in place: they must be private to the caller, in the layout of :func:`training_copy`.

    Returns the sum of squared errors of the block's ratings as the pass met them (each just before its
    update). A factor that overflows in the block's last updates has not yet spoiled an error: the caller
    checks the states it ends with (:func:`all_finite`).
    """
    (P, user_bias), (Q, item_bias) = user_state, item_state
    layout = visiting_layout(block, hyper.order, hyper.users_per_run, hyper.tile_items)
    return float(kernels.sgd_block(
        *layout, np.uint64(order_seed), P, Q, user_bias, item_bias,
        np.float32(hyper.global_mean), np.float32(hyper.lr), np.float32(hyper.reg), np.float32(hyper.bias_reg),
        hyper.use_bias, prefetch_ahead))


def sgd_update(block: BlockRatings, user_state: FactorState, item_state: FactorState, hyper: Hyper,
               order_seed: int) -> tuple[FactorState, FactorState, float]:
    """:func:`sgd_update_in_place` on copies: the new states, as wide as the given ones, and the block's
    SSE, ``inf`` when any new factor or bias is not finite: one block of the tests' plain DSGD loop."""
    k = user_state[0].shape[1]
    user, item = training_copy(user_state), training_copy(item_state)
    sse = sgd_update_in_place(block, user, item, hyper, order_seed)
    return trimmed(user, k), trimmed(item, k), sse if all_finite((user, item)) else math.inf


def block_error_sums(block: BlockRatings, user_state: FactorState, item_state: FactorState,
                     global_mean: float) -> tuple[float, float, int]:
    """``(Σ e², Σ |e|, n)`` of the model over one block's ratings, in float64 (for a k-only model
    ``global_mean`` is 0.0 and the biases stay zero)."""
    (P, user_bias), (Q, item_bias) = user_state, item_state
    sse, sae = kernels.block_errors(block.users, block.items, block.ratings, P, Q, user_bias, item_bias,
                                    np.float32(global_mean))
    return sse, sae, block.n
