"""Fold-in: factors and bias of users (or items) absent from training, from their ratings alone.

With the other side's factors fixed, each new user's objective

    Σ_i (r_ui − μ − b_i − b_u − p_u·q_i)² + λ‖p_u‖² + λ_b b_u²

is a regularised least-squares problem in ``x = (p_u, b_u)`` with the closed
form ``(ZᵀZ + diag(λ, …, λ, λ_b)) x = Zᵀy``, ``z_i = (q_i, 1)``, ``y = r − μ − b_i``.
For new items swap the roles. A k-only model has no bias column.
"""

from __future__ import annotations

import numpy as np

CHUNK_RATINGS = 1 << 20


def fold_in(new: np.ndarray, known: np.ndarray, ratings: np.ndarray, factors: np.ndarray, bias: np.ndarray,
            global_mean: float, reg: float, bias_reg: float, n_new: int, use_bias: bool = True
            ) -> tuple[np.ndarray, np.ndarray]:
    """Solve each new entity's regularised least squares against the fixed ``factors``.

    Parameters
    ----------
    new : (n,) int, index of the new entity (0 .. n_new-1) of each rating
    known : (n,) int, index into ``factors`` / ``bias`` of the fixed side
    ratings : (n,) float
    factors : (m, k) the fixed side's factors; ``bias`` (m,) its biases

    Returns
    -------
    (factors, bias) : arrays of shape (n_new, k) and (n_new,), float32; an
    entity without ratings gets zeros.
    """
    k = factors.shape[1]
    width = k + 1 if use_bias else k
    gram = np.zeros((n_new, width, width))
    rhs = np.zeros((n_new, width))
    for start in range(0, ratings.shape[0], CHUNK_RATINGS):
        take = slice(start, start + CHUNK_RATINGS)
        z = factors[known[take]].astype(np.float64)
        y = ratings[take].astype(np.float64) - global_mean
        if use_bias:
            z = np.hstack([z, np.ones((z.shape[0], 1))])
            y = y - bias[known[take]]
        np.add.at(gram, new[take], z[:, :, None] * z[:, None, :])
        np.add.at(rhs, new[take], z * y[:, None])
    penalty = np.full(width, reg)
    if use_bias:
        penalty[-1] = bias_reg
    # A tiny ridge keeps an entity without ratings (or with reg 0) solvable; it then stays at zero.
    solution = np.linalg.solve(gram + np.diag(penalty + 1e-12), rhs[:, :, None])[:, :, 0]
    out_bias = solution[:, k] if use_bias else np.zeros(n_new)
    return solution[:, :k].astype(np.float32), out_bias.astype(np.float32)
