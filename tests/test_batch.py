"""Scheduled batch runs: a re-run of a finished run touches nothing, and one run per run directory."""

from __future__ import annotations

import hashlib
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import cli_env, kill_when
from conftest import model_bytes as _model_bytes

from funkflow.pipeline.app.cli import main

TINY = ["--set", "data.generate.n_users=300", "--set", "data.generate.n_items=120",
        "--set", "data.generate.n_ratings=12000", "--set", "data.generate.max_user_fraction=0.5",
        "--set", "model.k=8", "--set", "train.epochs=4", "--set", "train.d=3", "--set", "cluster.scheduler=inprocess"]


def _snapshot(root: Path) -> dict[str, tuple[int, str]]:
    """Every file under ``root`` but the lock, with its mtime and checksum."""
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != ".funkflow.lock"}


def test_rerunning_a_finished_run_changes_no_file(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="funkflow")
    run_dir = tmp_path / "run"
    assert main(["run", "--run-dir", str(run_dir), *TINY]) == 0
    before = _snapshot(run_dir)
    assert {"summary.json", "metrics.jsonl", "config.yaml", "model/model.json", "model/user-0000.factors.npy"} \
        <= set(before)
    caplog.clear()
    assert main(["run", "--run-dir", str(run_dir), *TINY]) == 0
    assert _snapshot(run_dir) == before
    for stage in ("generate", "block", "train", "evaluate"):
        assert f"{stage}: up to date" in caplog.text


@pytest.mark.slow
def test_a_second_run_on_the_same_directory_exits_75_and_a_killed_run_leaves_no_lock(tmp_path):
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "funkflow", "run", "--run-dir", str(run_dir), *TINY,
               "--set", "train.epochs=400", "--set", "train.checkpoint_every=0",
               "--set", "train.early_stopping_patience=0"]
    env = cli_env()
    holder = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        lock = run_dir / ".funkflow.lock"
        deadline = time.monotonic() + 60
        while not (lock.exists() and f"pid {holder.pid}" in lock.read_text()) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert holder.poll() is None, "the first run must still hold the directory"
        second = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
        assert second.returncode == 75
        assert f"is in use by pid {holder.pid}" in second.stderr
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    third = subprocess.run([*command[:-6]], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert third.returncode == 0, third.stderr


@pytest.fixture(scope="module")
def uninterrupted_run(tmp_path_factory):
    """A MovieLens-layout CSV, the command that trains on it, and the model bytes of one run left alone: what
    every killed-and-run-again run must end with."""
    import numpy as np

    root = tmp_path_factory.mktemp("uninterrupted")
    rng = np.random.default_rng(4)
    users, items = rng.integers(1, 3000, 150_000), rng.integers(1, 400, 150_000)
    lines = [f"{u},{i},{r},{t}" for u, i, r, t in zip(users, items, rng.integers(1, 6, 150_000),
                                                       rng.integers(0, 10**9, 150_000))]
    (root / "ratings.csv").write_text("userId,movieId,rating,timestamp\n" + "\n".join(lines) + "\n")
    sets = [f"data.source={root / 'ratings.csv'}", "data.format=movielens", "data.generate=null",
            "model.k=8", "train.epochs=12", "train.d=3", "cluster.scheduler=inprocess"]
    command = [sys.executable, "-m", "funkflow", "run", *(a for s in sets for a in ("--set", s))]
    subprocess.run([*command, "--run-dir", str(root / "whole")], cwd=root, env=cli_env(), check=True,
                   capture_output=True, timeout=300)
    return command, _model_bytes(root / "whole")


@pytest.mark.slow
@pytest.mark.parametrize("moment", ["ingest", "training", "export"])
def test_a_run_killed_at_any_stage_and_run_again_ends_with_the_same_model(tmp_path, moment, uninterrupted_run):
    """SIGKILL `funkflow run` mid-ingest, mid-training or once the model is written but not yet evaluated;
    the same command, re-run, finishes the job."""
    command, whole = uninterrupted_run
    env = cli_env()
    run_dir = tmp_path / "killed"

    def reached() -> bool:
        if moment == "ingest":
            return any(run_dir.glob(".data.tmp-*/_staging/chunk-*.arrow"))
        if moment == "export":
            return (run_dir / "stages" / "train.json").exists()
        return (run_dir / "checkpoints" / "epoch-000003" / "manifest.json").exists()

    kill_when([*command, "--run-dir", str(run_dir)], tmp_path, reached)
    if moment == "export":
        assert not (run_dir / "summary.json").exists(), "the run must die before its summary"
    else:
        assert not (run_dir / "model").exists(), "the run must die before it has a model"
    if moment == "ingest":
        assert not (run_dir / "data").exists(), "a killed ingest leaves no dataset that looks valid"

    again = subprocess.run([*command, "--run-dir", str(run_dir)], cwd=tmp_path, env=env, capture_output=True,
                           text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    if moment == "training":
        # Killed once epoch 3's checkpoint existed; on a busy machine a later one may have been committed too.
        resumed = re.search(r"resuming after epoch (\d+)", again.stderr)
        assert resumed and 3 <= int(resumed[1]) < 12 and "ingest: up to date" in again.stderr, again.stderr
    assert _model_bytes(run_dir) == whole
    if moment == "export":
        assert "train: up to date" in again.stderr
        assert (run_dir / "summary.json").read_text().count("test_rmse") == 1


def test_json_logs_and_the_run_manifest(tmp_path, capsys):
    import json

    run_dir = tmp_path / "run"
    assert main(["--log-format", "json", "run", "--run-dir", str(run_dir), *TINY]) == 0
    captured = capsys.readouterr()
    # Every line, the results on stdout too: `>> nightly.jsonl 2>&1` must give JSON lines.
    results = [json.loads(line) for line in captured.out.splitlines()]
    assert results and all(r["level"] == "result" for r in results)
    assert any(r["message"].startswith("test RMSE") for r in results)
    lines = [json.loads(line) for line in captured.err.splitlines()]
    epochs = [line for line in lines if "epoch" in line]
    assert [line["epoch"] for line in epochs] == [1, 2, 3, 4]
    assert all(line["stage"] == "train" and line["level"] == "info" for line in epochs)
    assert epochs[-1]["metrics"]["train_rmse"] > 0 and epochs[-1]["time"].endswith("Z")
    assert {line["stage"] for line in lines} >= {"generate", "block", "train", "evaluate"}

    manifest = json.loads((run_dir / "run.json").read_text())
    assert manifest["status"] == "ok" and manifest["exit_code"] == 0
    assert manifest["stages_run"] == ["generate", "block", "train", "evaluate"]
    assert set(manifest["versions"]) >= {"funkflow", "dask", "distributed", "numba", "numpy", "pyarrow", "python"}
    assert manifest["data_fingerprint"] == json.loads((run_dir / "data" / "dataset.json").read_text())["fingerprint"]

    assert main(["run", "--run-dir", str(run_dir), *TINY, "--set", "train.lr=80", "--set", "train.max_rollbacks=0",
                 "--retrain"]) == 3
    failed = json.loads((run_dir / "run.json").read_text())
    assert (failed["status"], failed["exit_code"], failed["stages_run"]) == ("failed", 3, [])
    assert "TrainingDiverged: training diverged" in failed["error"]


def test_warm_start_of_three_epochs_matches_a_cold_start_on_day_two(tmp_path, caplog):
    from funkflow.pipeline.app.stages import run_pipeline
    from funkflow.pipeline.core.config import load_config
    from funkflow.tasks.synthetic import write_daily_csvs

    caplog.set_level(logging.INFO, logger="funkflow")
    day1, day2 = write_daily_csvs(tmp_path)
    # A step large enough that 20 epochs leave the slow start behind on both days: what is compared is the warm
    # start, not where the bold driver happened to halve the step in a plateau.
    common = ["data.format=movielens", "data.generate=null", "model.k=8", "train.d=3", "train.lr=0.03",
              "cluster.scheduler=inprocess"]
    run_pipeline(load_config(None, [f"data.source={day1}", *common, "train.epochs=20",
                                    f"output.run_dir={tmp_path / 'day1'}"]))
    cold = run_pipeline(load_config(None, [f"data.source={day2}", *common, "train.epochs=20",
                                           f"output.run_dir={tmp_path / 'cold'}"]))
    warm = run_pipeline(load_config(None, [f"data.source={day2}", *common, "train.epochs=3",
                                           f"train.init_from={tmp_path / 'day1'}",
                                           f"output.run_dir={tmp_path / 'warm'}"]))
    assert warm["test_rmse"] <= 1.02 * cold["test_rmse"], (warm["test_rmse"], cold["test_rmse"])
    assert "warm start: 1,200 of 1,2" in caplog.text and "users known to" in caplog.text


@pytest.mark.slow
def test_the_nightly_verb_trains_day_one_cold_and_day_two_warm_and_moves_latest(tmp_path, capsys):
    """The nightly retrain is an installed command (it had been a script in the repository only)."""
    import json

    from funkflow.tasks.synthetic import write_daily_csvs

    day1, day2 = write_daily_csvs(tmp_path)
    config = tmp_path / "nightly.yaml"
    config.write_text("model: {k: 8}\ntrain: {epochs: 10, d: 3}\ncluster: {scheduler: inprocess}\n")
    runs = tmp_path / "runs"

    def night(date: str, export: Path) -> tuple[int, str, str]:
        code = main(["--log-format", "json", "nightly", str(config), "--export", str(export), "--format",
                     "movielens", "--runs", str(runs), "--date", date])
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    assert night("2026-01-01", day1)[0] == 0
    assert os.readlink(runs / "latest") == "2026-01-01"
    code, out, err = night("2026-01-02", day2)
    assert code == 0, err
    messages = [json.loads(line)["message"] for line in err.splitlines()]
    assert any(m.startswith("warm start:") and "2026-01-01" in m for m in messages)
    assert os.readlink(runs / "latest") == "2026-01-02"
    assert len((runs / "2026-01-02" / "metrics.jsonl").read_text().splitlines()) == 3
    assert all(json.loads(line)["level"] == "result" for line in out.splitlines())
    code, _, err = night("2026-01-02", day2)
    assert code == 0 and "train: up to date" in err
    (runs / "latest").unlink()
    (runs / "latest").mkdir()  # someone else's: never replaced
    assert night("2026-01-03", day2)[0] == 73
    assert not (runs / "2026-01-03").exists()


@pytest.mark.cluster
def test_ctrl_c_on_a_local_cluster_is_one_line_and_exit_130(tmp_path):
    """Ctrl-C in a terminal reaches the whole process group, the LocalCluster's workers too: the driver
    answers with one line and 130, and no worker prints a traceback."""
    metrics = tmp_path / "run" / "metrics.jsonl"
    command = [sys.executable, "-m", "funkflow", "run", "--run-dir", str(tmp_path / "run"), *TINY,
               "--set", "cluster.scheduler=local", "--set", "train.epochs=100000",
               "--set", "train.early_stopping_patience=0", "--set", "train.checkpoint_every=0"]
    # As a shell starts a foreground job: its own process group, SIGINT not ignored (a test runner started in
    # the background would pass SIG_IGN on; exec keeps the default set here).
    restore = ("import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
               "os.execv(sys.argv[1], sys.argv[1:])")
    driver = subprocess.Popen([sys.executable, "-c", restore, *command], cwd=tmp_path, env=cli_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, process_group=0)
    try:
        deadline = time.monotonic() + 120
        while not (metrics.exists() and len(metrics.read_text().splitlines()) > 3) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert driver.poll() is None, driver.stderr.read()[-2000:]
        os.killpg(driver.pid, signal.SIGINT)
        _, err = driver.communicate(timeout=60)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    assert driver.returncode == 130, err[-3000:]
    assert err.rstrip().endswith("funkflow: interrupted") and "Traceback" not in err, err[-3000:]


def test_the_interrupt_race_in_distributeds_sync_is_not_printed_and_other_loop_errors_are(capsys):
    """distributed's sync() can fail to cancel on Ctrl-C with a NameError logged from the event loop (a race
    the test above meets now and then); that one record is dropped, any other loop error still shows."""
    from funkflow.pipeline.core.logs import configure

    configure("text", quiet=False)
    loop_errors = logging.getLogger("tornado.application")
    for error in (NameError("cannot access free variable 'future' where it is not associated with a value in "
                            "enclosing scope"), RuntimeError("a real failure")):
        try:
            raise error
        except Exception:
            loop_errors.error("Exception in callback", exc_info=True)
    err = capsys.readouterr().err
    assert "a real failure" in err and "'future'" not in err, err
