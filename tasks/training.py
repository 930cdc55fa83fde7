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
from collections.abc import Iterable
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from funkflow.tasks import kernels
from funkflow.tasks.artifacts import read_model_array
from funkflow.tasks.blocks import BlockRatings, RowBlock
from funkflow.tasks.hashing import SALT_COLUMNS, SALT_ROWS, block_layout

FactorState = tuple[np.ndarray, np.ndarray]


class BlockUpdateError(RuntimeError):
    """An SGD block task failed; the message names the epoch, stratum and block."""


@dataclass(frozen=True)
class Hyper:
    """Hyper-parameters of one SGD block update (plain values, cheap to ship)."""

    lr: float
    reg: float
    bias_reg: float
    use_bias: bool
    global_mean: float
    order: str
    users_per_run: int
    tile_items: int


class Visit(NamedTuple):
    """A block's ratings in visiting order within runs and the order of the runs, as
    :func:`funkflow.tasks.kernels.sgd_block` takes them."""

    users: np.ndarray
    items: np.ndarray
    ratings: np.ndarray
    run_starts: np.ndarray
    run_order: np.ndarray


def visiting_order(block: BlockRatings, order: str, users_per_run: int, tile_items: int, seed: int) -> Visit:
    """The runs of a block and the random order to visit them in (see :mod:`funkflow.tasks.kernels`).

    ``"user_runs"``: runs of ``users_per_run`` consecutive users (blocks are stored
    sorted by user, then item) in random order, each taken in tiles of
    ``tile_items`` items (0: one tile): each ``p_u`` stays in cache over its
    ratings, each tile's ``q_i`` over the run's users, and memory is read in long
    streaks. ``"ratings"``: one run per rating, in random order. ``"sorted"``: the
    block front to back, no randomness. Only ``"user_runs"`` is tiled.
    """
    if order == "ratings":
        singles = np.arange(block.n + 1, dtype=np.int64)
        return Visit(block.users, block.items, block.ratings, singles,
                     np.random.default_rng(seed).permutation(block.n))
    if order == "sorted":
        return Visit(block.users, block.items, block.ratings, np.array([0, block.n], dtype=np.int64),
                     np.zeros(1, dtype=np.int64))
    layout = block.in_runs(users_per_run, tile_items)
    return Visit(*layout, np.random.default_rng(seed).permutation(layout.run_starts.shape[0] - 1))


def init_factors(n: int, k: int, init_std: float, seed: int) -> FactorState:
    """Initial factors ``N(0, init_std²)`` and zero biases for ``n`` users or items."""
    rng = np.random.default_rng(seed)
    factors = rng.normal(0.0, init_std, (n, k)).astype(np.float32)
    return factors, np.zeros(n, dtype=np.float32)


def warm_factors(n: int, k: int, init_std: float, seed: int, model_dir: str, side: str,
                 previous: np.ndarray) -> FactorState:
    """Initial state of one block from a previous model: row j takes that model's row ``previous[j]``
    (factors and bias), or, where ``previous[j]`` is -1 (new since), the seeded ``N(0, init_std²)`` start."""
    factors, bias = init_factors(n, k, init_std, seed)
    known = previous >= 0
    if known.any():
        factors_file, bias_file, _ = MODEL_FILES[side]
        old_factors = read_model_array(model_dir, factors_file, mmap=True)
        old_bias = read_model_array(model_dir, bias_file, mmap=True)
        factors[known] = old_factors[previous[known]]
        bias[known] = old_bias[previous[known]]
    return factors, bias


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


def training_copy(state: FactorState) -> FactorState:
    """A private copy of a factor state in the layout the kernels update: rows padded and aligned
    (:func:`padded_rows`; a state already padded keeps its width), biases copied."""
    return padded_rows(state[0]), state[1].copy()


def trimmed(state: FactorState, k: int) -> FactorState:
    """The state without the padding columns: ``k`` factors a row, contiguous (for files and the driver)."""
    factors, bias = state
    return (factors if factors.shape[1] == k else np.ascontiguousarray(factors[:, :k])), bias


def all_finite(states: Iterable[FactorState]) -> bool:
    """Whether every factor and bias of ``states`` is finite (one pass over each array)."""
    return all(kernels.all_finite(a.reshape(-1)) for state in states for a in state)


def sgd_update_in_place(row_block: RowBlock, col: int, user_state: FactorState, item_state: FactorState,
                        hyper: Hyper, order_seed: int, label: str,
                        prefetch_ahead: int = kernels.PREFETCH_AHEAD) -> float:
    """One SGD pass over block (row_block.row, col), in a random order drawn from ``order_seed``, updating
    the two states in place: they must be private to the caller, in the layout of :func:`training_copy`.

    Returns the sum of squared errors of the block's ratings as the pass met them (each just before its
    update). A factor that overflows in the block's last updates has not yet spoiled an error: the caller
    checks the states it ends with (:func:`all_finite`).
    """
    try:
        block = row_block.split(0)[col]
        (P, user_bias), (Q, item_bias) = user_state, item_state
        visit = visiting_order(block, hyper.order, hyper.users_per_run, hyper.tile_items, order_seed)
        return float(kernels.sgd_block(
            *visit, P, Q, user_bias, item_bias,
            np.float32(hyper.global_mean), np.float32(hyper.lr), np.float32(hyper.reg), np.float32(hyper.bias_reg),
            hyper.use_bias, prefetch_ahead))
    except Exception as exc:
        raise BlockUpdateError(f"SGD update failed at {label}") from exc


def sgd_update(row_block: RowBlock, col: int, user_state: FactorState, item_state: FactorState, hyper: Hyper,
               order_seed: int, label: str) -> tuple[FactorState, FactorState, float]:
    """:func:`sgd_update_in_place` on copies: the new states, as wide as the given ones, and the block's
    SSE, ``inf`` when any new factor or bias is not finite: one block of the tests' plain DSGD loop."""
    k = user_state[0].shape[1]
    user, item = training_copy(user_state), training_copy(item_state)
    sse = sgd_update_in_place(row_block, col, user, item, hyper, order_seed, label)
    return trimmed(user, k), trimmed(item, k), sse if all_finite((user, item)) else math.inf


def row_errors(row_block: RowBlock, user_state: FactorState, item_states: list[FactorState],
               global_mean: float, splits: tuple[int, ...]) -> np.ndarray:
    """Error sums of one row block under the current factors, per split and column block.

    Parameters
    ----------
    global_mean : the model's μ (0.0 for a k-only model)
    splits : the split codes to measure; the others stay zero

    Returns
    -------
    array of shape (3, d, 3), float64
        ``[split, col] = (Σ e², Σ |e|, n)``; the driver adds rows in block order.
    """
    d = len(item_states)
    out = np.zeros((3, d, 3), dtype=np.float64)
    P, user_bias = user_state
    mu = np.float32(global_mean)
    for code in splits:
        for col, block in enumerate(row_block.split(code)):
            Q, item_bias = item_states[col]
            sse, sae = kernels.block_errors(block.users, block.items, block.ratings, P, Q, user_bias, item_bias, mu)
            out[code, col] = (sse, sae, block.n)
    return out


MODEL_FILES = {"user": ("P.npy", "user_bias.npy", SALT_ROWS), "item": ("Q.npy", "item_bias.npy", SALT_COLUMNS)}


def read_factor_block(model_dir: str, side: str, n: int, d: int, seed: int, block: int) -> FactorState:
    """The state of one row block (``side="user"``) or column block (``"item"``) of a saved model.

    Reads only that block's rows of the .npy files (memory-mapped, no pickle).
    """
    factors_file, bias_file, salt = MODEL_FILES[side]
    members = block_layout(n, d, seed, salt)[2][block]
    factors = read_model_array(model_dir, factors_file, mmap=True)
    bias = read_model_array(model_dir, bias_file, mmap=True)
    return np.ascontiguousarray(factors[members]), np.ascontiguousarray(bias[members])
