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
