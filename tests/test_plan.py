"""funkflow plan: the sizing arithmetic, the calibration, the command."""

from __future__ import annotations

from dataclasses import replace

import pytest

from funkflow.pipeline.running.cli import main
from funkflow.pipeline.training.plan import (
    BALANCE,
    ITEM_BLOCK_BYTES,
    MIN_BLOCK_RATINGS,
    MIN_CACHED_BLOCK_RATINGS,
    Plan,
    auto_d,
    calibrate,
    state_bytes,
)


def test_plan_arithmetic_for_netflix_on_two_workers():
    plan = Plan(ratings=100_000_000, users=480_000, items=17_770, k=49, d=4, workers=2, threads=1,
                train_fraction=0.85, rate=20e6, hop=0.005, bandwidth=1e9)
    rows = dict(plan.rows())
    assert rows["ratings per worker (loaded blocks)"] == "572.2 MiB"        # 2 of 4 blocks × 25M × 12 B
    assert rows["user factors per worker"] == "119.0 MiB"                   # 240k users × (64 + 1) floats × 2 versions
    assert rows["item factors moved per epoch"] == "10.2 MiB"               # 17,770 × 200 B × (4 × 1/2 + 1), unpadded
    assert rows["checkpoint per epoch"] == "94.9 MiB"                       # 497,770 rows × 50 floats, unpadded
    assert rows["scheduler tasks per epoch"] == "2"
    sgd, waiting, rest = plan.epoch_parts()
    assert sgd == pytest.approx(85e6 / (20e6 * 2 * BALANCE))
    assert waiting == 0                                                      # 5.3M-rating blocks hide a 5 ms hop
    assert plan.epoch_seconds() == pytest.approx(sgd + rest)


def test_plan_turns_latency_bound_as_workers_grow_and_names_the_fastest_count():
    netflix = Plan(ratings=100_000_000, users=480_000, items=17_770, k=50, d=4, workers=2, threads=1,
                   train_fraction=0.85, rate=30e6, hop=0.005, bandwidth=1e9)
    at = {w: replace(netflix, workers=w, d=auto_d(netflix.ratings, w)) for w in (2, 16, 256)}
    assert at[16].epoch_seconds() < at[2].epoch_seconds()
    sgd, waiting, _ = at[256].epoch_parts()
    assert waiting > sgd and at[256].epoch_seconds() > at[16].epoch_seconds()
    fastest = netflix.fastest_workers()
    assert 2 < fastest.workers < 256
    assert "more workers make an epoch slower" in dict(netflix.rows())["fastest at"]
    # A faster network moves the turning point out.
    assert replace(netflix, hop=0.0005).fastest_workers().workers > fastest.workers


def test_calibration_measures_a_plausible_rate():
    assert 1e5 < calibrate(8, seconds=0.2) < 1e10


def test_plan_command_prints_the_estimate(capsys):
    assert main(["plan", "--ratings", "1e10", "--users", "5e7", "--items", "1e6", "--k", "64", "--d", "64",
                 "--workers", "32", "--rate", "2e7"]) == 0
    out = capsys.readouterr().out
    assert "estimated epoch time" in out and "parallel blocks" in out and "32 (d=64, 32×1 threads)" in out


def test_auto_d_gives_two_blocks_per_thread_only_while_blocks_stay_large():
    assert auto_d(100_000_000, 2) == 4                     # Netflix on 2 threads: 6.25M ratings a block
    assert auto_d(10_000_000, 2) == 2                      # 10M: 0.6M a block at d=4 would be overhead-bound
    assert auto_d(16 * MIN_BLOCK_RATINGS, 2) == 4 and auto_d(16 * MIN_BLOCK_RATINGS - 1, 2) == 2
    assert auto_d(10**11, 64) == 128 and auto_d(10**10, 64) == 64
    assert auto_d(1_000, 1) == 1 and auto_d(1_000, 0) == 1  # never below one block, nor below the threads


def test_auto_d_cuts_a_large_catalogue_into_item_blocks_that_stay_cached():
    assert auto_d(20_000_000, 2, 500_000, 50) == 8          # a shop: 130 MB of item factors, 16 MB blocks
    assert 500_000 * state_bytes(50) / 8 <= ITEM_BLOCK_BYTES < 500_000 * state_bytes(50) / 6
    assert auto_d(100_000_000, 2, 17_770, 50) == 4          # Netflix's 4.6 MB of item factors: as before
    assert auto_d(10_000_000, 2, 17_770, 50) == 2
    assert auto_d(20_000_000, 2, 500_000, 16) == 4          # k=16: 34 MB of item factors
    assert auto_d(20_000_000, 2, 500_000, 50, workers=2) == 2  # between processes a hand-off serialises a block
    # Too few ratings to cut finer: blocks keep MIN_CACHED_BLOCK_RATINGS.
    d = auto_d(2_000_000, 2, 10_000_000, 50)
    assert d == 2 and 2_000_000 / (d + 2) ** 2 < MIN_CACHED_BLOCK_RATINGS


def test_plan_command_defaults_d_to_the_auto_choice(capsys):
    assert main(["plan", "--ratings", "1e8", "--users", "480189", "--items", "17770", "--workers", "2",
                 "--rate", "2e7"]) == 0
    assert "2 (d=4, 2×1 threads)" in capsys.readouterr().out
