"""Synthetic Netflix-shaped ratings with a known true model.

The true model is biased matrix factorization plus Gaussian noise, rounded to
whole stars (or half stars, ``rating_step=0.5``, as MovieLens has since 2003) and
clipped to the 1..5 (0.5..5) scale. Item popularity and user activity are
log-normal (heavy-tailed, as on Netflix). Each rating also carries its
``expected`` value ``E[rating | u, i]`` under the true model, the best any
predictor can do; the RMSE of ``expected`` against the ratings is the floor.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
from scipy.special import ndtr

from funkflow.tasks.io import WrittenPart, write_parquet

NETFLIX_USERS = 480_189
NETFLIX_ITEMS = 17_770
NETFLIX_RATINGS = 100_480_507
RATING_MIN = 1
RATING_MAX = 5

# Child streams of the generator seed.
_STREAM_MODEL = 0
_STREAM_CHUNK = 1


@dataclass(frozen=True)
class SyntheticSpec:
    """Shape and true model of a synthetic data set; all plain values."""

    n_users: int
    n_items: int
    n_ratings: int
    seed: int = 0
    k_true: int = 8
    global_mean: float = 3.6
    user_bias_std: float = 0.4
    item_bias_std: float = 0.45
    factor_std: float = 0.46
    noise_std: float = 0.7
    activity_sigma: float = 1.1
    popularity_sigma: float = 1.6
    max_user_fraction: float = 0.25
    rating_step: float = 1.0

    def __post_init__(self) -> None:
        if self.rating_step not in (0.5, 1.0):
            raise ValueError(f"rating_step must be 1 (whole stars) or 0.5 (half stars), got {self.rating_step}")
        cap = self.max_ratings_per_user
        if not self.n_users <= self.n_ratings <= self.n_users * cap:
            raise ValueError(f"n_ratings={self.n_ratings} cannot be spread over n_users={self.n_users} with 1 to "
                             f"{cap} ratings each (max_user_fraction={self.max_user_fraction} of "
                             f"n_items={self.n_items}); use from {self.n_users} to {self.n_users * cap}")

    @property
    def rating_scale(self) -> tuple[float, float]:
        """The lowest and highest rating: a step above zero, and five stars."""
        return (min(float(RATING_MIN), self.rating_step), float(RATING_MAX))

    @property
    def max_ratings_per_user(self) -> int:
        return max(1, int(self.max_user_fraction * self.n_items))

    @classmethod
    def netflix_shaped(cls, scale: float, **overrides) -> SyntheticSpec:
        """Netflix's shape at ``scale`` (1.0 = 480,189 users × 17,770 items, 100,480,507 ratings).

        Users and items both shrink by ``sqrt(scale)`` so the density stays Netflix's.
        """
        root = float(np.sqrt(scale))
        shape = dict(
            n_users=max(2, round(NETFLIX_USERS * root)),
            n_items=max(2, round(NETFLIX_ITEMS * root)),
            n_ratings=max(1, round(NETFLIX_RATINGS * scale)),
        )
        shape.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**shape)

    def as_dict(self) -> dict:
        return asdict(self)


def _apportion(weights: np.ndarray, total: int, cap: int) -> np.ndarray:
    """Integer counts in [1, cap] proportional to ``weights``, summing to ``total``.

    Water-filling: ``x = min(cap - 1, t · w)`` with ``t`` found by bisection, then
    the largest remainders take the last units.
    """
    n = weights.shape[0]
    if not n <= total <= n * cap:
        raise ValueError(f"cannot give {n} users between 1 and {cap} ratings each, {total} in all")
    spare = total - n
    room = cap - 1
    lo, hi = 0.0, 1.0
    while np.minimum(room, hi * weights).sum() < spare:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if np.minimum(room, mid * weights).sum() < spare:
            lo = mid
        else:
            hi = mid
    x = np.minimum(room, hi * weights)
    extra = np.floor(x).astype(np.int64)
    left = spare - int(extra.sum())
    if left > 0:
        frac = np.where(extra < room, x - extra, -1.0)
        extra[np.argsort(-frac, kind="stable")[:left]] += 1
    elif left < 0:
        extra[np.argsort(-extra, kind="stable")[:-left]] -= 1
    return extra + 1


@dataclass(frozen=True)
class TrueModel:
    """The model synthetic ratings are drawn from.

    ``P`` (n_users, k_true) and ``Q`` (n_items, k_true) float32 factors, ``user_bias`` and ``item_bias``
    float32; ``counts`` (n_users,) int64 ratings per user, summing to n_ratings; ``popularity_cdf``
    (n_items,) float64, the cumulative item popularity that items are drawn by.
    """

    P: np.ndarray
    Q: np.ndarray
    user_bias: np.ndarray
    item_bias: np.ndarray
    counts: np.ndarray
    popularity_cdf: np.ndarray


def make_true_model(spec: SyntheticSpec) -> TrueModel:
    """Draw the true model: factors, biases, activity and popularity."""
    rng = np.random.default_rng(np.random.SeedSequence(spec.seed, spawn_key=(_STREAM_MODEL,)))
    cap = spec.max_ratings_per_user
    activity = rng.lognormal(0.0, spec.activity_sigma, spec.n_users)
    popularity = rng.lognormal(0.0, spec.popularity_sigma, spec.n_items)
    cdf = np.cumsum(popularity)
    return TrueModel(
        P=rng.normal(0.0, spec.factor_std, (spec.n_users, spec.k_true)).astype(np.float32),
        Q=rng.normal(0.0, spec.factor_std, (spec.n_items, spec.k_true)).astype(np.float32),
        user_bias=rng.normal(0.0, spec.user_bias_std, spec.n_users).astype(np.float32),
        item_bias=rng.normal(0.0, spec.item_bias_std, spec.n_items).astype(np.float32),
        counts=_apportion(activity, spec.n_ratings, cap),
        popularity_cdf=cdf / cdf[-1],
    )


def chunk_bounds(model: TrueModel, ratings_per_chunk: int) -> np.ndarray:
    """User-index boundaries of chunks holding about ``ratings_per_chunk`` ratings each.

    Returns
    -------
    array of shape (n_chunks + 1,), int64, from 0 to n_users
    """
    counts = model.counts
    n_chunks = max(1, int(np.ceil(counts.sum() / ratings_per_chunk)))
    targets = np.linspace(0, counts.sum(), n_chunks + 1)[1:-1]
    inner = np.searchsorted(np.cumsum(counts), targets, side="left") + 1
    return np.unique(np.concatenate(([0], inner, [counts.shape[0]]))).astype(np.int64)


def expected_rating(score: np.ndarray, noise_std: float, step: float = 1.0) -> np.ndarray:
    """``E[clip(round_step(score + ε), low, 5)]`` for ``ε ~ N(0, noise_std²)``, where ``round_step`` rounds to
    a multiple of ``step`` and ``low`` is the scale's lowest rating.

    ``E[R] = 5 - step · Σ_{j < 5} P(R ≤ j)`` over the ratings ``j`` below five, and
    ``P(R ≤ j) = Φ((j + step/2 - score) / σ)``.
    """
    low = min(float(RATING_MIN), step)
    levels = np.arange(low, RATING_MAX, step)
    below = sum(ndtr((j + step / 2 - score) / noise_std) for j in levels)
    return (RATING_MAX - step * below).astype(np.float32)


def _sample_items(users: np.ndarray, want: np.ndarray, first_user: int, cdf: np.ndarray,
                  rng: np.random.Generator) -> np.ndarray:
    """Distinct items per user, drawn by popularity; returns sorted keys ``user·n_items + item``.

    Draw the missing count for every unfinished user, drop repeats, repeat; users
    leave the working set once complete so late rounds stay small.
    """
    n_items = cdf.shape[0]
    finished: list[np.ndarray] = []
    pending = np.empty(0, dtype=np.int64)
    need = want.copy()
    for _ in range(1000):
        who = np.repeat(users, need)
        if who.shape[0] == 0:
            return np.sort(np.concatenate(finished))
        items = np.minimum(np.searchsorted(cdf, rng.random(who.shape[0]), side="right"), n_items - 1)
        pending = np.sort(np.concatenate((pending, who * n_items + items)))
        pending = pending[np.concatenate(([True], pending[1:] != pending[:-1]))]
        owner = pending // n_items - first_user
        short = want - np.bincount(owner, minlength=want.shape[0])
        complete = (need > 0) & (short == 0)
        need = np.where(complete, 0, np.where(need > 0, short, 0))
        done = complete[owner]
        finished.append(pending[done])
        pending = pending[~done]
    raise RuntimeError("could not draw distinct items for every user; lower max_user_fraction")


def generate_chunk(spec: SyntheticSpec, model: TrueModel, chunk: int, first_user: int, end_user: int,
                   path: str) -> WrittenPart:
    """Generate the ratings of users ``[first_user, end_user)`` and write them to ``path``.

    The chunk's random stream is derived from (spec.seed, chunk), so the data do
    not depend on which worker, or how many, generated them.
    """
    rng = np.random.default_rng(np.random.SeedSequence(spec.seed, spawn_key=(_STREAM_CHUNK, chunk)))
    users = np.arange(first_user, end_user, dtype=np.int64)
    keys = _sample_items(users, model.counts[first_user:end_user], first_user, model.popularity_cdf, rng)
    user = (keys // spec.n_items).astype(np.int32)
    item = (keys % spec.n_items).astype(np.int32)
    score = (
        np.float32(spec.global_mean)
        + model.user_bias[user]
        + model.item_bias[item]
        + np.einsum("nk,nk->n", model.P[user], model.Q[item])
    ).astype(np.float64)
    noisy = score + rng.normal(0.0, spec.noise_std, score.shape[0])
    low, high = spec.rating_scale
    rating = np.clip(np.rint(noisy / spec.rating_step) * spec.rating_step, low, high).astype(np.float32)
    table = pa.table({
        "user": user,
        "item": item,
        "rating": rating,
        "expected": expected_rating(score, spec.noise_std, spec.rating_step),
    })
    write_parquet(table, path)
    return WrittenPart.of(path, int(table.num_rows))


def write_daily_csvs(folder: Path, seed: int = 11) -> tuple[Path, Path]:
    """Two days of a nightly retrain, as MovieLens-style CSV: ``day1.csv`` from a planted rank-4 model
    (1,200 users × 300 items, ~55k ratings) and ``day2.csv``: day 1 plus 5% more ratings, some of 60 new
    users and 10 new items."""
    rng = np.random.default_rng(seed)
    n_users, n_items = 1200, 300
    P, Q = rng.normal(0, 0.5, (n_users + 60, 4)), rng.normal(0, 0.5, (n_items + 10, 4))
    bu, bi = rng.normal(0, 0.3, n_users + 60), rng.normal(0, 0.3, n_items + 10)

    def ratings(users: np.ndarray, items: np.ndarray) -> list[str]:
        r = np.clip(np.rint(3.6 + bu[users] + bi[items] + np.einsum("nk,nk->n", P[users], Q[items])
                            + rng.normal(0, 0.5, users.shape[0])), 1, 5)
        return [f"{u + 1},{i + 1},{int(x)},{1000 + j}" for j, (u, i, x) in enumerate(zip(users, items, r))]

    pairs = np.unique(np.stack([rng.integers(0, n_users, 60_000), rng.integers(0, n_items, 60_000)], axis=1), axis=0)
    day1 = ratings(pairs[:, 0], pairs[:, 1])
    extra = np.unique(np.stack([rng.integers(0, n_users + 60, 6000), rng.integers(0, n_items + 10, 6000)], axis=1),
                      axis=0)
    seen = {tuple(p) for p in pairs}
    extra = np.array([p for p in extra if tuple(p) not in seen][: len(day1) // 20])
    header = "userId,movieId,rating,timestamp\n"
    (folder / "day1.csv").write_text(header + "\n".join(day1) + "\n")
    (folder / "day2.csv").write_text(header + "\n".join(day1 + ratings(extra[:, 0], extra[:, 1])) + "\n")
    return folder / "day1.csv", folder / "day2.csv"
