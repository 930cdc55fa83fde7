"""funkflow tune: seeded trials, successive halving, a resumable tune.jsonl, best.yaml that runs as is, and the
same winner in-process and on a cluster."""

from __future__ import annotations

import json
import logging
import math

import pytest
from conftest import model_bytes

from funkflow.pipeline.app.cli import main
from funkflow.pipeline.app.tune import draw_trials, read_tune_log, rung_epochs
from funkflow.pipeline.core.config import load_config
from funkflow.pipeline.core.errors import EXIT_CONFIG, EXIT_OK
from funkflow.pipeline.serving.model import read_model

DATA = ["data.generate.n_users=400", "data.generate.n_items=150", "data.generate.n_ratings=20000",
        "data.generate.max_user_fraction=0.5", "tune.trials=6", "tune.min_epochs=2", "tune.max_epochs=12"]


def _sets(*overrides: str) -> list[str]:
    return [arg for s in (*DATA, *overrides) for arg in ("--set", s)]


def test_trials_are_seeded_draws_in_the_space_after_the_configs_own():
    config = load_config(None, ["tune.trials=40", "tune.space.k=[4,64]", "tune.space.lr=[0.001,0.1]"])
    trials = draw_trials(config)
    assert trials == draw_trials(config)
    assert trials[0].params == {"k": 32, "reg": 0.05, "bias_reg": 0.01, "lr": 0.01}
    for trial in trials[1:]:
        assert isinstance(trial.params["k"], int) and 4 <= trial.params["k"] <= 64
        assert 0.001 <= trial.params["lr"] <= 0.1 and 0.005 <= trial.params["reg"] <= 0.3
    # Log-uniform: as many draws below the range's geometric middle as above it, roughly.
    below = sum(t.params["lr"] < math.sqrt(0.001 * 0.1) for t in trials[1:])
    assert 10 <= below <= 29
    assert draw_trials(load_config(None, ["tune.trials=40", "tune.seed=1"]))[1:] != trials[1:]


def test_a_trial_side_by_side_trains_on_one_thread_whatever_the_cores(monkeypatch, tmp_path):
    """Its d, and so its bits, must not follow the cores of the worker the trial lands on."""
    from funkflow.pipeline.app.tune import _trial_config
    from funkflow.pipeline.core.cluster import local_shape

    monkeypatch.setattr("os.cpu_count", lambda: 8)
    config = load_config(None, [])
    trial = draw_trials(config)[1]
    side_by_side = _trial_config(config, trial, str(tmp_path / "data"), tmp_path, 6, parallel=True)
    assert side_by_side.cluster.scheduler == "inprocess" and local_shape(side_by_side.cluster) == (1, 1)
    assert _trial_config(config, trial, str(tmp_path / "data"), tmp_path, 6, parallel=False).cluster == config.cluster


@pytest.mark.parametrize(("low", "high", "factor", "rungs"), [
    (3, 60, 3, [3, 9, 27, 60]), (2, 12, 3, [2, 6, 12]), (5, 5, 3, [5]), (1, 16, 2, [1, 2, 4, 8, 16])])
def test_rungs_grow_by_the_reduction_factor_up_to_max_epochs(low, high, factor, rungs):
    assert rung_epochs(low, high, factor) == rungs


def test_a_space_key_that_cannot_be_searched_names_the_key(capsys):
    assert main(["tune", "--set", "tune.space.epochs=[1,5]", "--run-dir", "unused"]) == EXIT_CONFIG
    assert "tune.space.epochs: not a searchable key" in capsys.readouterr().err


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("tune") / "run"
    assert main(["tune", "--run-dir", str(run_dir), *_sets("cluster.scheduler=inprocess")]) == EXIT_OK
    return run_dir


def test_tune_halves_the_trials_at_each_rung_and_trains_the_winner_on_train_and_validation(tuned):
    results = read_tune_log(tuned)
    by_rung = [sorted(r.trial for r in results if r.rung == rung) for rung in range(3)]
    assert by_rung[0] == list(range(6)) and len(by_rung[1]) == 2 and len(by_rung[2]) == 1
    # The survivors of each rung are the best of the rung before.
    rung0 = sorted((r for r in results if r.rung == 0), key=lambda r: (r.best_val, r.trial))
    assert by_rung[1] == sorted(r.trial for r in rung0[:2])
    winner = next(r for r in results if r.rung == 2)
    assert winner.best_val == min(winner.val_rmse) and len(winner.val_rmse) <= 12
    best = load_config(tuned / "best.yaml")
    assert best.model.k == winner.params["k"] and best.train.lr == winner.params["lr"]
    assert best.train.epochs == winner.best_epoch and best.split.validation_fraction == 0
    summary = json.loads((tuned / "summary.json").read_text())
    blocks = json.loads((tuned / "blocks" / "blocks.json").read_text())
    assert sum(row[1] for row in blocks["counts"]) == 0  # the validation ratings trained
    assert summary["epochs"] == winner.best_epoch and summary["k"] == winner.params["k"]
    # The final training takes the step sizes the winning trial took, epoch by epoch: without validation the
    # bold driver would grow the step every epoch and train another model than the one scored.
    assert best.train.lr_schedule == "given" and best.train.lr_steps == winner.lr[:winner.best_epoch]
    final = [json.loads(line)["lr"] for line in (tuned / "metrics.jsonl").read_text().splitlines()]
    assert final == winner.lr[:winner.best_epoch]


def test_best_yaml_runs_as_is_to_the_tunes_model(tuned, capsys):
    before = model_bytes(tuned)
    assert main(["run", str(tuned / "best.yaml")]) == EXIT_OK
    assert "train: up to date" in capsys.readouterr().err
    assert model_bytes(tuned) == before


def test_an_interrupted_tune_takes_up_the_trials_it_finished(tuned, tmp_path, caplog):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(tuned, copy)
    # Stopped in the second rung: the log holds the first (written whole after each batch of trials), while
    # the trial directories went further.
    lines = (copy / "tune.jsonl").read_text().splitlines()
    (copy / "tune.jsonl").write_text("\n".join(lines[:1 + 6]) + "\n")
    caplog.set_level(logging.INFO, logger="funkflow")
    assert main(["tune", "--run-dir", str(copy)]) == EXIT_OK  # the tune's own config, kept in the run
    assert "6 trained (trial, rung) pairs taken up" in caplog.text
    trained_again = [line for line in caplog.text.splitlines() if "epochs: best validation RMSE" in line]
    assert len(trained_again) == len(lines) - 1 - 6
    assert _curves(copy) == _curves(tuned)
    factors, _ = read_model(copy / "model")
    assert model_bytes(copy) == model_bytes(tuned)
    assert factors.P.shape[1] == load_config(tuned / "best.yaml").model.k


def _curves(run_dir) -> list[tuple]:
    return [(r.trial, r.rung, r.params, r.val_rmse, r.best_epoch) for r in read_tune_log(run_dir)]


def test_the_winner_is_the_same_on_a_cluster(tuned, local_cluster, tmp_path):
    run_dir = tmp_path / "run"
    assert main(["tune", "--run-dir", str(run_dir), "--scheduler", local_cluster.scheduler_address,
                 *_sets()]) == EXIT_OK
    assert _curves(run_dir) == _curves(tuned)  # every trial's curve to the last bit, so the same winner
    assert load_config(run_dir / "best.yaml").model == load_config(tuned / "best.yaml").model


def test_another_tune_or_a_foreign_model_in_the_run_directory_is_refused(tuned, tmp_path, capsys):
    assert main(["tune", "--run-dir", str(tuned), *_sets("cluster.scheduler=inprocess", "tune.seed=5")]) \
        == EXIT_CONFIG
    assert "holds a tune of another configuration" in capsys.readouterr().err
    trained = tmp_path / "trained"
    assert main(["train", "--run-dir", str(trained), *_sets("cluster.scheduler=inprocess", "train.epochs=2")]) \
        == EXIT_OK
    assert main(["tune", "--run-dir", str(trained), *_sets("cluster.scheduler=inprocess")]) == EXIT_CONFIG
    assert "holds a model that no tune made" in capsys.readouterr().err


def test_tune_without_validation_ratings_is_refused(tmp_path, capsys):
    assert main(["tune", "--run-dir", str(tmp_path / "run"),
                 *_sets("cluster.scheduler=inprocess", "split.validation_fraction=0")]) == EXIT_CONFIG
    assert "tune chooses by the validation RMSE" in capsys.readouterr().err


def test_report_shows_the_trials_and_the_kept_epoch(tuned, tmp_path, capsys):
    import numpy as np
    from PIL import Image

    from funkflow.pipeline.app.report import tune_figure

    capsys.readouterr()
    assert main(["report", str(tuned), "--out", str(tmp_path)]) == EXIT_OK
    assert capsys.readouterr().out.split() == [str(tmp_path / name)
                                               for name in ("learning_curves.png", "tune.png", "report.html")]
    lr_axis = next(ax for ax in tune_figure(read_tune_log(tuned)).axes if ax.get_xlabel() == "lr")
    labels = [t.get_text() for t in lr_axis.get_xticklabels() if t.get_text()]
    assert labels and all("^" not in text and float(text) > 0 for text in labels)  # 0.01, not 10^-2
    image = np.asarray(Image.open(tmp_path / "tune.png").convert("L"))
    assert image.shape[1] > 1000 and np.unique(image).shape[0] > 20  # drawn, not blank
    page = (tmp_path / "report.html").read_text()
    assert "<h2>Tune</h2>" in page and page.count("<tr><td>") >= 6 + 1  # every trial, and the epochs table
    winner = next(r for r in read_tune_log(tuned) if r.rung == 2)
    assert f"<td>{winner.best_val:.4f}</td>" in page
