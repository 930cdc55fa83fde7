"""Slow, obviously-correct float64 reference of the model, its loss and its SGD step.

Tests hold the numba kernels to this module, and this module's gradient to
central finite differences of :func:`rating_loss`. Nothing here is fast.
"""

from __future__ import annotations

import numpy as np


def predict(u, i, P, Q, user_bias, item_bias, global_mean, use_bias=True) -> float:
    """``μ + b_u + b_i + p_u · q_i`` (or ``p_u · q_i`` without biases)."""
    dot = sum(float(P[u, f]) * float(Q[i, f]) for f in range(P.shape[1]))
    if not use_bias:
        return dot
    return float(global_mean) + float(user_bias[u]) + float(item_bias[i]) + dot


def rating_loss(u, i, r, P, Q, user_bias, item_bias, global_mean, reg, bias_reg, use_bias=True) -> float:
    """One rating's term of J: ``½ [e² + λ(‖p_u‖² + ‖q_i‖²) + λ_b(b_u² + b_i²)]``."""
    e = r - predict(u, i, P, Q, user_bias, item_bias, global_mean, use_bias)
    loss = e * e + reg * (float(np.dot(P[u], P[u])) + float(np.dot(Q[i], Q[i])))
    if use_bias:
        loss += bias_reg * (float(user_bias[u]) ** 2 + float(item_bias[i]) ** 2)
    return 0.5 * loss


def rating_gradient(u, i, r, P, Q, user_bias, item_bias, global_mean, reg, bias_reg, use_bias=True):
    """Analytic gradient of :func:`rating_loss` for one rating.

    Returns
    -------
    dict
        ``p_u``, ``q_i`` (arrays of shape (k,)) and, with biases, ``b_u``, ``b_i``.
    """
    e = r - predict(u, i, P, Q, user_bias, item_bias, global_mean, use_bias)
    grad = {
        "p_u": -e * Q[i].astype(np.float64) + reg * P[u].astype(np.float64),
        "q_i": -e * P[u].astype(np.float64) + reg * Q[i].astype(np.float64),
    }
    if use_bias:
        grad["b_u"] = -e + bias_reg * float(user_bias[u])
        grad["b_i"] = -e + bias_reg * float(item_bias[i])
    return grad


def sgd_pass(users, items, ratings, order, P, Q, user_bias, item_bias, global_mean, lr, reg, bias_reg,
             use_bias=True) -> float:
    """Reference SGD pass: ``θ -= lr ∂J_ui/∂θ`` per rating, in ``order``, in place.

    The gradient is taken at the parameters before the step, so ``q_i`` moves
    with the old ``p_u``. Returns the sum of squared errors seen before each step.
    """
    sse = 0.0
    for j in order:
        u, i, r = int(users[j]), int(items[j]), float(ratings[j])
        e = r - predict(u, i, P, Q, user_bias, item_bias, global_mean, use_bias)
        sse += e * e
        grad = rating_gradient(u, i, r, P, Q, user_bias, item_bias, global_mean, reg, bias_reg, use_bias)
        P[u] -= lr * grad["p_u"]
        Q[i] -= lr * grad["q_i"]
        if use_bias:
            user_bias[u] -= lr * grad["b_u"]
            item_bias[i] -= lr * grad["b_i"]
    return sse
