"""What funkflow may touch: never a path it did not make, never a finished output without being asked, and
never a half-written file; and faults from outside (a full disk) told in one line with their own exit code.
Each test is a probe an adversarial user ran against an earlier version, which lost data, reported success
or answered with a traceback there; run this module alone to check them. Probes that need another module's
fixtures live beside them: a scheduler lost mid-run, TLS settings with a tcp:// address and a false "lost
workers" under load in test_cluster.py; models and checkpoints holding NaN in test_artifacts.py and
test_checkpoints.py; negative and int64-limit ids in test_ingest.py."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import cli_env

from funkflow.pipeline.app.cli import main
from funkflow.pipeline.core.rundir import MARK, built_in_place, locked
from funkflow.tasks.io import read_json

TINY = ["data.generate.n_users=300", "data.generate.n_items=120", "data.generate.n_ratings=12000",
        "data.generate.max_user_fraction=0.5", "model.k=4", "train.epochs=2", "train.d=2",
        "cluster.scheduler=inprocess"]


def _sets(*overrides: str) -> list[str]:
    return [arg for o in (*TINY, *overrides) for arg in ("--set", o)]


def _files(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` with its bytes, but the lock a command leaves empty when it ends."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != ".funkflow.lock"}


def test_a_run_directory_funkflow_did_not_make_is_refused_and_left_as_it_was(tmp_path, capsys):
    mine = tmp_path / "v"
    for sub in ("data", "model", "blocks"):
        (mine / sub).mkdir(parents=True)
    (mine / "data" / "thesis.txt").write_text("four years of work\n")
    before = _files(mine)
    assert main(["run", "--run-dir", str(mine), *_sets()]) == 73
    assert f"{mine}: exists, holds files, and was not made by funkflow" in capsys.readouterr().err
    assert _files(mine) == before and sorted(p.name for p in mine.iterdir()) == ["blocks", "data", "model"]


def test_an_empty_directory_becomes_a_run_directory(tmp_path):
    (tmp_path / "empty").mkdir()
    assert main(["run", "--run-dir", str(tmp_path / "empty"), *_sets()]) == 0
    assert (tmp_path / "empty" / MARK).is_file() and (tmp_path / "empty" / "model" / "model.json").is_file()


def test_an_output_funkflow_did_not_make_is_never_swapped_out(tmp_path):
    """Inside a run directory too: a model/ the user put there is refused, not moved aside."""
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "notes.txt").write_text("mine\n")
    with pytest.raises(Exception, match="was not made by funkflow"):
        with built_in_place(tmp_path / "model") as tmp:
            (tmp / "P.npy").write_bytes(b"new")
    assert (tmp_path / "model" / "notes.txt").read_text() == "mine\n"
    assert [p.name for p in tmp_path.iterdir()] == ["model"], "the build was removed, nothing else"


def test_a_stage_verb_on_a_run_directory_that_is_not_there_is_refused_creating_nothing(tmp_path, capsys):
    for verb in ("export", "evaluate", "train"):
        assert main([verb, "--run-dir", str(tmp_path / "runs" / "nope"), "-q"]) == 78
        assert "no run there (no config.yaml)" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def _ratings_csv(path: Path, n: int) -> Path:
    import pyarrow as pa
    import pyarrow.csv as pacsv

    rng = np.random.default_rng(0)
    pacsv.write_csv(pa.table({"user": rng.integers(1, 5000, n), "item": rng.integers(1, 2000, n),
                              "rating": rng.integers(1, 6, n)}), path,
                    pacsv.WriteOptions(quoting_style="none"))
    return path


@pytest.mark.slow
def test_a_second_ingest_into_the_same_out_exits_75_naming_the_first(tmp_path, capsys):
    source = _ratings_csv(tmp_path / "big.csv", 1_500_000)  # long enough to hold the lock while the second tries
    out = tmp_path / "data"
    first = subprocess.Popen([sys.executable, "-m", "funkflow", "ingest", str(source), "--format", "csv",
                              "--out", str(out), "--scheduler", "inprocess"], cwd=tmp_path, env=cli_env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lock = out / ".funkflow.lock"
    deadline = time.monotonic() + 60
    while not (lock.is_file() and f"pid {first.pid}" in lock.read_text()) and time.monotonic() < deadline:
        time.sleep(0.01)
    second = main(["ingest", str(_ratings_csv(tmp_path / "small.csv", 1000)), "--format", "csv", "--out", str(out),
                   "--scheduler", "inprocess"])
    _, first_err = first.communicate(timeout=240)
    assert first.returncode == 0, first_err
    assert second == 75 and f"is in use by pid {first.pid}" in capsys.readouterr().err
    assert read_json(out / "dataset.json")["n_ratings"] > 1000, "the first ingest's data, not the second's"


def test_ingest_never_replaces_a_finished_dataset(tmp_path, capsys):
    source = _ratings_csv(tmp_path / "r.csv", 1000)
    out = tmp_path / "data"
    assert main(["ingest", str(source), "--format", "csv", "--out", str(out), "--scheduler", "inprocess"]) == 0
    before = _files(out)
    assert main(["ingest", str(source), "--format", "csv", "--out", str(out), "--scheduler", "inprocess"]) == 73
    assert "exists and is not empty" in capsys.readouterr().err and _files(out) == before


def test_a_dataset_finished_by_another_command_meanwhile_is_not_replaced(tmp_path):
    out = tmp_path / "data"
    with locked(out):
        with pytest.raises(Exception, match="written by another command meanwhile"):
            with built_in_place(out, replace=False) as tmp:
                (out / "dataset.json").write_text("{}")  # another writer that took no lock
                (tmp / "dataset.json").write_text('{"mine": 1}')
    assert (out / "dataset.json").read_text() == "{}"


def test_the_leftovers_of_killed_commands_are_removed_by_the_next_that_holds_the_place(tmp_path):
    run_dir = tmp_path / "run"
    assert main(["run", "--run-dir", str(run_dir), *_sets()]) == 0
    for name in (".data.tmp-0123456789ab", ".model.old-0123456789ab"):
        (run_dir / name / "_staging").mkdir(parents=True)
        (run_dir / name / MARK).write_text("")
        (run_dir / name / "_staging" / "chunk-00000.arrow").write_bytes(b"x" * 1000)
    (run_dir / ".mine.tmp-notfunkflow").mkdir()
    (run_dir / ".mine.tmp-notfunkflow" / "keep.txt").write_text("mine\n")
    out = tmp_path / "ingested"
    (tmp_path / ".ingested.tmp-0123456789ab").mkdir()
    (tmp_path / ".ingested.tmp-0123456789ab" / MARK).write_text("")

    assert main(["run", "--run-dir", str(run_dir), *_sets()]) == 0
    assert main(["ingest", str(_ratings_csv(tmp_path / "r.csv", 100)), "--format", "csv", "--out", str(out),
                 "--scheduler", "inprocess"]) == 0
    assert sorted(p.name for p in run_dir.glob(".*.*-*")) == [".mine.tmp-notfunkflow"]
    assert not (tmp_path / ".ingested.tmp-0123456789ab").exists()


def test_checkpoints_cleared_for_a_new_configuration_leave_other_files_under_the_url(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "notes.txt").write_text("mine\n")
    (shared / "epoch-000001").mkdir()
    (shared / "epoch-000001" / "mine.txt").write_text("also mine\n")
    assert main(["run", "--run-dir", str(tmp_path / "a"), *_sets(f"output.checkpoints={shared}",
                                                                  "train.epochs=1")]) == 73
    assert (shared / "epoch-000001" / "mine.txt").is_file()
    (shared / "epoch-000001" / "mine.txt").unlink()
    (shared / "epoch-000001").rmdir()
    assert main(["run", "--run-dir", str(tmp_path / "a"), *_sets(f"output.checkpoints={shared}")]) == 0
    assert main(["run", "--run-dir", str(tmp_path / "b"), *_sets(f"output.checkpoints={shared}",
                                                                  "model.k=3")]) == 0
    assert (shared / "notes.txt").read_text() == "mine\n"


def _one_error_line(err: str) -> str:
    """The one ``funkflow: error`` line of a command's stderr (its log lines aside), with no traceback."""
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("funkflow: error")]
    assert len(errors) == 1, err
    return errors[0]


@pytest.mark.parametrize("full_at", [".model.tmp-", "checkpoints"])
def test_a_full_disk_exits_74_in_one_line_and_leaves_the_model_and_its_metrics(tmp_path, capsys, monkeypatch,
                                                                               full_at):
    run_dir = tmp_path / "run"
    assert main(["run", "--run-dir", str(run_dir), *_sets()]) == 0
    model, metrics = _files(run_dir / "model"), (run_dir / "metrics.jsonl").read_bytes()
    flush = os.fsync

    def full_disk(fd: int) -> None:  # the disk fills up where ``full_at`` is written, and only there
        if full_at in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        flush(fd)

    monkeypatch.setattr(os, "fsync", full_disk)
    capsys.readouterr()
    assert main(["run", "--run-dir", str(run_dir), *_sets("train.epochs=3"), "--retrain"]) == 74
    line = _one_error_line(capsys.readouterr().err)
    assert "No space left on device" in line and str(run_dir) in line
    assert _files(run_dir / "model") == model
    assert (run_dir / "metrics.jsonl").read_bytes() == metrics  # the rows of the model that is there
    record = read_json(run_dir / "run.json")
    assert (record["status"], record["exit_code"]) == ("failed", 74)
    assert not [p for p in run_dir.rglob("*") if ".tmp-" in p.name]  # no file half-written, under any name


@pytest.mark.parametrize("verb", ["ingest", "export"])
def test_a_full_disk_in_ingest_or_export_exits_74_in_one_line_leaving_nothing_half_made(tmp_path, capsys,
                                                                                        monkeypatch, verb):
    import pyarrow.parquet as pq

    run_dir, out = tmp_path / "run", tmp_path / "data"
    if verb == "export":
        assert main(["run", "--run-dir", str(run_dir), *_sets()]) == 0
    write = pq.write_table
    full_at = ".export.tmp-" if verb == "export" else ".data.tmp-"

    def full_disk(table, where, *args, **kwargs):  # the disk fills up where ``full_at`` is written
        if full_at in str(where):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return write(table, where, *args, **kwargs)

    monkeypatch.setattr(pq, "write_table", full_disk)
    capsys.readouterr()
    args = (["export", "--run-dir", str(run_dir)] if verb == "export" else
            ["ingest", str(_ratings_csv(tmp_path / "r.csv", 1000)), "--format", "csv", "--out", str(out),
             "--scheduler", "inprocess"])
    assert main(args) == 74
    line = _one_error_line(capsys.readouterr().err)
    assert "No space left on device" in line and full_at in line
    assert not [p for p in tmp_path.rglob("*") if ".tmp-" in p.name]
    if verb == "export":
        assert not (run_dir / "export").exists()
        assert read_json(run_dir / "run.json")["exit_code"] == 74
    else:
        assert not out.exists()


def test_a_d_with_more_blocks_than_ratings_is_refused_before_any_work(tmp_path, capsys):
    """train.d=3000 for 500 ratings hung after the block stage at 5.7 GB."""
    run_dir = tmp_path / "run"
    code = main(["run", "--run-dir", str(run_dir), *_sets("train.d=3000")])
    line = _one_error_line(capsys.readouterr().err)
    assert code == 78 and "train.d=3000 makes 9,000,000 blocks for" in line and "at most d=" in line
    assert not run_dir.exists()
    (tmp_path / "r.csv").write_text("user,item,rating\n" + "".join(f"{u},{u % 7},3\n" for u in range(500)))
    code = main(["run", "--run-dir", str(run_dir), *_sets("train.d=3000", f"data.source={tmp_path / 'r.csv'}",
                                                          "data.format=csv", "data.generate=null")])
    assert code == 78 and "for 500 ratings: at most d=22" in _one_error_line(capsys.readouterr().err)
    assert not (run_dir / "blocks").exists()


def test_a_parquet_file_among_csv_files_is_named_as_not_text(tmp_path, capsys):
    """Its binary bytes were quoted as "the header"."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "a.csv").write_text("user,item,rating\n1,2,3\n2,3,4\n")
    pq.write_table(pa.table({"user": [1, 2], "item": [3, 4], "rating": [3.0, 4.0]}), folder / "b.parquet")
    code = main(["ingest", str(folder), "--format", "csv", "--out", str(tmp_path / "out"), "--scheduler",
                 "inprocess"])
    line = _one_error_line(capsys.readouterr().err)
    assert code == 65 and f"{folder / 'b.parquet'}: a Parquet file, not text: --format parquet" in line
    assert "PAR1" not in line and not (tmp_path / "out").exists()


def test_everything_a_started_cluster_listens_on_is_127_0_0_1():
    """The LocalCluster's dashboard listened on 0.0.0.0 while the log printed http://127.0.0.1:…."""
    import psutil

    from funkflow.pipeline.core.cluster import open_executor
    from funkflow.pipeline.core.config import ClusterConfig

    with open_executor(ClusterConfig(scheduler="local", n_workers=1, threads_per_worker=1)) as executor:
        processes = [psutil.Process(), *psutil.Process().children(recursive=True)]
        listening = {c.laddr.ip for p in processes for c in p.net_connections(kind="inet")
                     if c.status == psutil.CONN_LISTEN}
        assert executor.dashboard_link is not None and "127.0.0.1" in executor.dashboard_link
    assert listening == {"127.0.0.1"}
