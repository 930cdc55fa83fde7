"""The benchmark scripts run end to end at a tiny scale (a smoke test; speed is not asserted)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

SCRIPTS = Path(__file__).parents[1] / "scripts"


TINY = ["--scale", "0.0005"]


@pytest.mark.parametrize("script,args,row", [
    ("bench_kernel.py", [*TINY, "--k", "8", "--repeat", "1"], "| 8 |"),
    ("bench_roofline.py", [*TINY, "--k", "8", "--repeat", "1"], "| rows only |"),
    ("bench_scheduler_memory.py", ["--epochs", "2"], "| 2 |"),
    ("bench_checkpoint.py", [*TINY, "--epochs", "2"], "| 2 |"),
    ("bench_scale.py", ["--ratings", "20000", "--epochs", "2", "--d", "4", "--workers", "2", "--delays-ms", "0", "1"],
     "| 2 | "),
    ("bench_warm_start.py", ["--epochs", "2", "--upto", "1"], "| 1 |"),
    ("bench_peers.py", [*TINY, "--epochs", "2", "--threads", "1", "--peers", "funkflow", "LIBMF"], "| funkflow |"),
    ("bench_ingest.py", [*TINY, "--only", "Netflix Prize text"], "| Netflix Prize text, 4 files |"),
])
def test_benchmark_script_runs_at_tiny_scale(script, args, row, tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPTS / script), "--cache", str(tmp_path), *args],
                          cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    assert any(line.startswith(row) for line in done.stdout.splitlines()), done.stdout


def test_peak_rss_reports_a_command(tmp_path):
    hold_200_mib = "import time; x = b'x' * (200 * 1024 * 1024); time.sleep(1)"
    trace = tmp_path / "rss.csv"
    done = subprocess.run([sys.executable, str(SCRIPTS / "peak_rss.py"), "--trace", str(trace), "--",
                           sys.executable, "-c", hold_200_mib], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0
    assert "peak RSS of the process tree" in done.stderr
    peak = float(done.stderr.split("process tree ")[1].split(" GiB")[0])
    assert peak >= 0.15
    header, *samples = trace.read_text().splitlines()
    assert header == "seconds,time,tree_gib,largest_gib" and len(samples) >= 4
    assert max(float(row.split(",")[2]) for row in samples) == pytest.approx(peak, abs=0.01)


def test_split_parquet_writes_every_rating_once_shuffled(tmp_path):
    import numpy as np
    import pyarrow.parquet as pq

    from funkflow.pipeline.app.cli import main
    from funkflow.pipeline.data.dataset import open_dataset

    assert main(["-q", "generate", "--scale", "0.0005", "--out", str(tmp_path / "data"),
                 "--scheduler", "inprocess"]) == 0
    done = subprocess.run([sys.executable, str(SCRIPTS / "write_split_parquet.py"), str(tmp_path / "data"),
                           str(tmp_path / "split")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    train, test = (pq.read_table(tmp_path / "split" / f"{name}.parquet") for name in ("train", "test"))
    dataset = open_dataset(tmp_path / "data")
    assert train.num_rows + test.num_rows == dataset.n_ratings
    assert 0.08 < test.num_rows / dataset.n_ratings < 0.12
    written = np.concatenate([t["user"].to_numpy() * 10**7 + t["item"].to_numpy() for t in (train, test)])
    source = np.concatenate([(pq.read_table(p)["user"].to_numpy().astype(np.int64) + 1) * 10**7
                             + pq.read_table(p)["item"].to_numpy() + 1 for p in dataset.parts])
    assert np.array_equal(np.sort(written), np.sort(source))
    assert not np.array_equal(written, source), "rows are shuffled"
    again = subprocess.run([sys.executable, str(SCRIPTS / "write_split_parquet.py"), str(tmp_path / "data"),
                            str(tmp_path / "split"), "--seed", "1"], capture_output=True, text=True, timeout=120)
    assert again.returncode != 0 and "already holds train.parquet or test.parquet" in again.stderr
    assert pq.read_table(tmp_path / "split" / "train.parquet").equals(train), "the first files stay as written"
