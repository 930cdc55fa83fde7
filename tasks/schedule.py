"""The DSGD schedule and the run's random streams: pure functions of (seed, epoch, ...).

The schedule is a *ring*. Each epoch draws a permutation of the ``d`` column
blocks, ``ring[j]`` being the block at ring position ``j``; at step ``t`` row
block ``r`` updates the column block at position ``(r + t) mod d``. So every
step is a stratum (``d`` blocks sharing no row and no column), every block is
visited once an epoch, and a column block moves from row ``r`` to row
``r - 1`` from one step to the next: over an epoch it passes every row once,
in descending order. A worker that owns a contiguous range of rows therefore
keeps a column block for as many steps as it has rows, and each column block
enters each worker once an epoch (docs/design.md).

Every random choice of a run is drawn from a child of one root
``numpy.random.SeedSequence(train.seed)``, keyed by what it is for. An epoch's
ring and its block streams depend on the epoch number alone, not on what ran
before it, which is what makes resume and recompute exact. Nothing here depends
on the number of workers or threads.
"""

from __future__ import annotations

import numpy as np

from funkflow.tasks.hashing import mix64

# Spawn-key heads of the run's independent streams.
STREAM_RING = 0
STREAM_BLOCK_ORDER = 1
STREAM_USER_INIT = 2
STREAM_ITEM_INIT = 3

Stratum = list[tuple[int, int]]


def _child(root: np.random.SeedSequence, *key: int) -> np.random.SeedSequence:
    return np.random.SeedSequence(root.entropy, spawn_key=tuple(root.spawn_key) + key)


def ring(d: int, epoch: int, rng: np.random.SeedSequence) -> tuple[int, ...]:
    """The column block at each ring position in ``epoch``: a permutation of ``range(d)`` drawn from the
    epoch's stream (child ``(STREAM_RING, epoch)`` of the run's root ``rng``)."""
    return tuple(int(c) for c in np.random.default_rng(_child(rng, STREAM_RING, epoch)).permutation(d))


def column_at(ring_order: tuple[int, ...], row: int, step: int) -> int:
    """The column block that row block ``row`` updates at ``step`` of the epoch whose ring is ``ring_order``."""
    return ring_order[(row + step) % len(ring_order)]


def first_row(ring_order: tuple[int, ...]) -> dict[int, int]:
    """Column block → the row block that takes it at step 0 (its ring position)."""
    return {c: j for j, c in enumerate(ring_order)}


def strata(d: int, epoch: int, rng: np.random.SeedSequence) -> list[Stratum]:
    """The ``d`` strata of one epoch, in the order they run: stratum ``t`` is
    ``[(r, column_at(ring, r, t)) for r in range(d)]``.

    Returns
    -------
    list of d strata, each a list of d ``(row, col)`` pairs ordered by row
    """
    order = ring(d, epoch, rng)
    return [[(r, column_at(order, r, t)) for r in range(d)] for t in range(d)]


def block_seeds(rng: np.random.SeedSequence, epoch: int, d: int) -> np.ndarray:
    """The seed of each block's visiting order in ``epoch``, array of shape (d, d), uint64, ``[row, col]``:
    one hash per block of the epoch's stream, so an epoch's d² seeds cost one vectorised pass."""
    base = _child(rng, STREAM_BLOCK_ORDER, epoch).generate_state(1, np.uint64)[0]
    blocks = np.arange(d * d, dtype=np.uint64).reshape(d, d)
    with np.errstate(over="ignore"):
        return mix64(mix64(blocks) ^ base)


def init_seed(rng: np.random.SeedSequence, side: int, block: int) -> int:
    """Seed of the initial factors of one row block (``STREAM_USER_INIT``) or column block (``STREAM_ITEM_INIT``)."""
    return int(_child(rng, side, block).generate_state(1, np.uint64)[0])
