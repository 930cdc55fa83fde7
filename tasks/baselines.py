"""Worker tasks for the reference predictors that evaluation compares the model with.

The biases-only baseline is Koren's damped-means estimate: item biases
``b_i = Σ(r - μ) / (λ_i + n_i)``, then user biases ``b_u = Σ(r - μ - b_i) / (λ_u + n_u)``,
over the training ratings.
"""

from __future__ import annotations

import numpy as np

from funkflow.tasks.blocks import TEST, TRAIN, RowBlock

ITEM_DAMPING = 25.0
USER_DAMPING = 10.0
BASELINES = ("global_mean", "biases", "floor")


def item_residual_sums(row_block: RowBlock, n_items: list[int], global_mean: float) -> list[np.ndarray]:
    """Per column block, ``(Σ (r - μ), n)`` of each item over this row's training ratings.

    Returns
    -------
    list of d arrays of shape (2, n_items_c), float64
    """
    out = []
    for block, n in zip(row_block.split(TRAIN), n_items):
        residual = block.ratings.astype(np.float64) - global_mean
        out.append(np.stack((np.bincount(block.items, residual, minlength=n),
                             np.bincount(block.items, minlength=n).astype(np.float64))))
    return out


def baseline_errors(row_block: RowBlock, item_bias: list[np.ndarray], global_mean: float) -> np.ndarray:
    """Test error sums of the baselines on one row block.

    Parameters
    ----------
    item_bias : d arrays of shape (n_items_c,), float64, the damped item biases

    Returns
    -------
    array of shape (len(BASELINES), 3), float64: ``(Σe², Σ|e|, n)`` per baseline
    (the floor row stays zero without ``expected`` ratings).
    """
    residual_sum = np.zeros(row_block.n_users)
    count = np.zeros(row_block.n_users)
    for block, b_i in zip(row_block.split(TRAIN), item_bias):
        residual_sum += np.bincount(block.users, block.ratings - global_mean - b_i[block.items],
                                    minlength=row_block.n_users)
        count += np.bincount(block.users, minlength=row_block.n_users)
    user_bias = residual_sum / (USER_DAMPING + count)

    out = np.zeros((len(BASELINES), 3))
    for block, b_i in zip(row_block.split(TEST), item_bias):
        ratings = block.ratings.astype(np.float64)
        predictions = [np.full(block.n, global_mean), global_mean + user_bias[block.users] + b_i[block.items]]
        if block.expected is not None:
            predictions.append(block.expected.astype(np.float64))
        for row, prediction in enumerate(predictions):
            e = ratings - prediction
            out[row] += (e @ e, np.abs(e).sum(), block.n)
    return out
