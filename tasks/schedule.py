"""The DSGD schedule and the run's random streams: pure functions of (seed, epoch, ...).

Every random choice of a run is drawn from a child of one root
``numpy.random.SeedSequence(train.seed)``, keyed by what it is for. An epoch's
schedule and its block streams therefore depend on the epoch number alone, not
on what ran before it, which is what makes resume and recompute exact.
"""

from __future__ import annotations

import numpy as np

# Spawn-key heads of the run's independent streams.
STREAM_STRATA = 0
STREAM_BLOCK_ORDER = 1
STREAM_USER_INIT = 2
STREAM_ITEM_INIT = 3

Stratum = list[tuple[int, int]]


def _child(root: np.random.SeedSequence, *key: int) -> np.random.SeedSequence:
    return np.random.SeedSequence(root.entropy, spawn_key=tuple(root.spawn_key) + key)


def strata(d: int, epoch: int, rng: np.random.SeedSequence) -> list[Stratum]:
    """The ``d`` strata of one epoch, in the order they run.

    Stratum ``s`` is ``{(r, (r + s) mod d) : r = 0..d-1}``: ``d`` blocks sharing no
    row block and no column block, so they can run in parallel without conflict.
    The order of the shifts ``s`` is a permutation drawn from the epoch's stream.

    Parameters
    ----------
    d : blocks per side
    epoch : epoch number (0-based)
    rng : the run's root seed sequence; the epoch's permutation comes from its
        child ``(STREAM_STRATA, epoch)``.

    Returns
    -------
    list of d strata, each a list of d ``(row, col)`` pairs ordered by row
    """
    return [[(r, (r + s) % d) for r in range(d)] for s in stratum_shifts(d, epoch, rng)]


def stratum_shifts(d: int, epoch: int, rng: np.random.SeedSequence) -> tuple[int, ...]:
    """The shift ``s`` of each of the epoch's strata, in the order they run (see :func:`strata`).

    Row block ``r`` takes column block ``(r + shifts[t]) mod d`` at step ``t``; so the
    column block it hands on after step ``t`` goes to row ``(c - shifts[t + 1]) mod d``.
    """
    return tuple(int(s) for s in np.random.default_rng(_child(rng, STREAM_STRATA, epoch)).permutation(d))


def block_order_seed(rng: np.random.SeedSequence, epoch: int, stratum: int, row: int, col: int) -> int:
    """Seed of the visiting order of block (row, col) in the given epoch and stratum."""
    return int(_child(rng, STREAM_BLOCK_ORDER, epoch, stratum, row, col).generate_state(1, np.uint64)[0])


def init_seed(rng: np.random.SeedSequence, side: int, block: int) -> int:
    """Seed of the initial factors of one row block (``STREAM_USER_INIT``) or column block (``STREAM_ITEM_INIT``)."""
    return int(_child(rng, side, block).generate_state(1, np.uint64)[0])
