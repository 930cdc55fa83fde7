"""funkflow plan: the sizing arithmetic, the calibration, the command; train.d: auto."""

from __future__ import annotations

from dataclasses import replace

import pytest

from funkflow.pipeline.app.cli import main
from funkflow.pipeline.training.plan import BALANCE, MIN_BLOCK_RATINGS, Plan, auto_d, calibrate

NETFLIX = Plan(ratings=100_000_000, users=480_000, items=17_770, k=49, d=128, workers=2, threads=1,
               train_fraction=0.85, rate=20e6, hop=0.0003, bandwidth=1e9)


def test_plan_arithmetic_for_netflix_on_two_workers():
    rows = dict(NETFLIX.rows())
    assert rows["ratings per worker (loaded blocks)"] == "572.2 MiB"        # 64 of 128 rows × 100M/128 × 12 B
    assert rows["user factors per worker"] == "59.5 MiB"                    # 240k users × (64 + 1) floats, once
    # 64 blocks working of 17,770/128 items × 65 floats: half of Q, and one in the mailbox
    assert rows["item factors per worker"] == "2.2 MiB (0.500 Q) and 35.2 KiB in flight"
    # 127 blocks enter in the epoch, and half of the 64 it starts the next one with: 1.24 Q, unpadded
    assert rows["received per worker per epoch"].endswith("(1.24 Q)")
    assert rows["checkpoint per epoch"] == "94.9 MiB"                       # 497,770 rows × 50 floats, unpadded
    assert rows["scheduler tasks per epoch"] == "2"
    assert NETFLIX.hidden() and rows["hand-offs hidden"].startswith("yes")
    sgd, waiting, rest = NETFLIX.epoch_parts()
    assert sgd == pytest.approx(NETFLIX.d * 64 * NETFLIX.block_seconds())
    assert sgd == pytest.approx(100e6 * (0.85 + 0.15 / 3 * 0.25) / (20e6 * 2 * BALANCE))
    assert waiting == 0 and NETFLIX.epoch_seconds() == pytest.approx(sgd + rest)


def test_item_factors_per_worker_fall_with_the_workers():
    """Every worker holds its share of Q, not all of it: about Q/W and a block a lane."""
    big = replace(NETFLIX, ratings=3_000_000_000, users=50_000_000, items=40_000_000, k=50, d=512)
    q_held, q_sent = big.items * big.state_bytes, big.items * big.row_bytes
    assert big.item_bytes()[0] == q_held / 2
    held, in_flight = replace(big, workers=64).item_bytes()
    assert held <= q_held / 64 and in_flight <= q_held / 512
    for w in (2, 4, 8, 64):
        assert replace(big, workers=w).received_bytes() <= 1.5 * q_sent


def test_latency_shows_once_a_lane_has_one_row_and_the_plan_names_the_fastest_count():
    at = {w: replace(NETFLIX, workers=w) for w in (2, 16, 64, 128)}
    assert at[16].epoch_seconds() < at[2].epoch_seconds()
    assert at[64].hidden() and not at[128].hidden()          # 2 rows a lane, then 1
    assert at[128].epoch_parts()[1] > 0
    fastest = NETFLIX.fastest_workers()
    assert fastest.workers <= NETFLIX.d
    assert "more workers make an epoch no faster" in dict(NETFLIX.rows())["fastest at"]
    # A slower network moves the turning point in.
    assert replace(NETFLIX, hop=0.02).fastest_workers().workers < fastest.workers


def test_calibration_measures_a_plausible_rate():
    assert 1e5 < calibrate(8, seconds=0.2) < 1e10


def test_plan_command_prints_the_estimate(capsys):
    assert main(["plan", "--ratings", "1e10", "--users", "5e7", "--items", "1e6", "--k", "64", "--d", "64",
                 "--workers", "32", "--rate", "2e7"]) == 0
    out = capsys.readouterr().out
    assert "estimated epoch time" in out and "hand-offs hidden" in out and "32 (d=64, 32×1 threads" in out


def test_auto_d_follows_the_ratings_alone():
    assert auto_d(100_480_507) == 64                       # Netflix: blocks of about 24,500 ratings
    assert auto_d(10_000_000) == 16 and auto_d(1_000_000) == 4
    assert auto_d(4 * MIN_BLOCK_RATINGS) == 2 and auto_d(4 * MIN_BLOCK_RATINGS - 1) == 1
    assert auto_d(12_000) == 1 and auto_d(0) == 1
    assert auto_d(3_000_000_000) == 256


def test_plan_command_defaults_d_to_the_auto_choice(capsys):
    assert main(["plan", "--ratings", "1e8", "--users", "480189", "--items", "17770", "--workers", "2",
                 "--rate", "2e7"]) == 0
    assert "2 (d=64, 2×1 threads, 32 rows a lane)" in capsys.readouterr().out
