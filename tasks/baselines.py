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


def item_residual_sums(row_block: RowBlock, item_members: list[np.ndarray],
                       global_mean: float) -> tuple[np.ndarray, np.ndarray]:
    """``(Σ (r - μ), n)`` of each item this row's training ratings rate, by global index.

    Returns
    -------
    items : array of shape (m,), int64, the items rated, column block by column block
    sums : array of shape (2, m), float64
    """
    items, sums = [], []
    for block, members in zip(row_block.split(TRAIN), item_members):  # a column block's items are its own
        rated = np.bincount(block.items, minlength=members.shape[0])
        residual = np.bincount(block.items, block.ratings.astype(np.float64) - global_mean,
                               minlength=members.shape[0])
        present = np.flatnonzero(rated)
        items.append(members[present])
        sums.append(np.stack((residual[present], rated[present].astype(np.float64))))
    return np.concatenate(items).astype(np.int64), np.concatenate(sums, axis=1)


def baseline_errors(row_block: RowBlock, item_bias: np.ndarray, item_members: list[np.ndarray],
                    global_mean: float) -> np.ndarray:
    """Test error sums of the baselines on one row block.

    Parameters
    ----------
    item_bias : array of shape (n_items,), float64, the damped item biases by global index

    Returns
    -------
    array of shape (len(BASELINES), 3), float64: ``(Σe², Σ|e|, n)`` per baseline
    (the floor row stays zero without ``expected`` ratings).
    """
    train = row_block.whole(TRAIN, item_members)
    residual_sum = np.bincount(train.users, train.ratings - global_mean - item_bias[train.items],
                               minlength=row_block.n_users)
    user_bias = residual_sum / (USER_DAMPING + np.bincount(train.users, minlength=row_block.n_users))

    test = row_block.whole(TEST, item_members)
    ratings = test.ratings.astype(np.float64)
    predictions = [np.full(test.n, global_mean), global_mean + user_bias[test.users] + item_bias[test.items]]
    if test.expected is not None:
        predictions.append(test.expected.astype(np.float64))
    out = np.zeros((len(BASELINES), 3))
    for row, prediction in enumerate(predictions):
        e = ratings - prediction
        out[row] = (e @ e, np.abs(e).sum(), test.n)
    return out
