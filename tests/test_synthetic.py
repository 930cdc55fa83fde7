"""The synthetic generator: exact counts, distinct pairs, the true expected rating."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from funkflow.tasks.synthetic import (
    SyntheticSpec,
    chunk_bounds,
    expected_rating,
    generate_chunk,
    make_true_model,
)


def test_netflix_shape_at_full_scale():
    spec = SyntheticSpec.netflix_shaped(1.0)
    assert (spec.n_users, spec.n_items, spec.n_ratings) == (480_189, 17_770, 100_480_507)


def test_chunks_hold_exact_counts_of_distinct_pairs(tmp_path):
    spec = SyntheticSpec.netflix_shaped(0.0005, seed=4)
    model = make_true_model(spec)
    assert model.counts.sum() == spec.n_ratings
    assert model.counts.min() >= 1
    bounds = chunk_bounds(model, 20_000)
    assert bounds[0] == 0 and bounds[-1] == spec.n_users and len(bounds) > 2
    tables = [pq.read_table(generate_chunk(spec, model, j, int(a), int(b), str(tmp_path / f"{j}.parquet")).path)
              for j, (a, b) in enumerate(zip(bounds[:-1], bounds[1:]))]
    users = np.concatenate([t["user"].to_numpy() for t in tables])
    items = np.concatenate([t["item"].to_numpy() for t in tables])
    ratings = np.concatenate([t["rating"].to_numpy() for t in tables])
    assert users.shape[0] == spec.n_ratings
    np.testing.assert_array_equal(np.bincount(users, minlength=spec.n_users), model.counts)
    assert np.unique(users.astype(np.int64) * spec.n_items + items).shape[0] == spec.n_ratings
    assert set(np.unique(ratings).tolist()) <= {1.0, 2.0, 3.0, 4.0, 5.0}
    popularity = np.sort(np.bincount(items, minlength=spec.n_items))
    assert popularity[-1] > 10 * np.median(popularity)  # heavy-tailed


def test_same_seed_same_chunk(tmp_path):
    spec = SyntheticSpec(n_users=50, n_items=40, n_ratings=400, seed=9)
    model = make_true_model(spec)
    a = generate_chunk(spec, model, 0, 0, 50, str(tmp_path / "a.parquet"))
    b = generate_chunk(spec, make_true_model(spec), 0, 0, 50, str(tmp_path / "b.parquet"))
    assert a.sha256 == b.sha256


@pytest.mark.parametrize("score", [0.2, 1.4, 3.0, 4.7, 6.0])
@pytest.mark.parametrize("step", [1.0, 0.5])
def test_expected_rating_matches_monte_carlo(score, step):
    rng = np.random.default_rng(0)
    draws = np.clip(np.rint((score + rng.normal(0, 0.8, 400_000)) / step) * step, min(1, step), 5)
    assert expected_rating(np.array([score]), 0.8, step)[0] == pytest.approx(draws.mean(), abs=5e-3)


def test_half_star_ratings_lie_on_the_half_star_scale(tmp_path):
    spec = SyntheticSpec(n_users=200, n_items=60, n_ratings=3000, seed=2, rating_step=0.5)
    part = generate_chunk(spec, make_true_model(spec), 0, 0, 200, str(tmp_path / "half.parquet"))
    ratings = pq.read_table(part.path)["rating"].to_numpy()
    assert spec.rating_scale == (0.5, 5.0)
    assert set(np.unique(ratings).tolist()) == {0.5 * j for j in range(1, 11)}


def test_impossible_shape_is_refused():
    with pytest.raises(ValueError, match="cannot be spread over n_users=10"):
        SyntheticSpec(n_users=10, n_items=4, n_ratings=100)
