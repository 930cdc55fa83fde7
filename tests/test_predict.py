"""predict: raw-id pairs in CSV, Parquet and the Netflix probe layout; unknown ids fall back and are counted."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from funkflow.pipeline.app.cli import main
from funkflow.pipeline.app.stages import run_pipeline
from funkflow.pipeline.serving.model import read_model


@pytest.fixture(scope="module")
def trained(tiny_config, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("predict") / "run"
    run_pipeline(tiny_config(run_dir), last="train")
    return run_dir


def _expected(run_dir: Path, user: int, item: int) -> float:
    """By hand: synthetic raw ids are 1-based indices; unknown ids drop their terms."""
    factors, info = read_model(run_dir / "model")
    u, i = user - 1, item - 1
    known_u, known_i = 0 <= u < factors.P.shape[0], 0 <= i < factors.Q.shape[0]
    score = factors.global_mean
    score += factors.user_bias[u] if known_u else 0.0
    score += factors.item_bias[i] if known_i else 0.0
    if known_u and known_i:
        score += float(np.dot(factors.P[u].astype(np.float64), factors.Q[i].astype(np.float64)))
    low, high = info["rating_scale"]
    return float(np.float32(min(max(score, low), high)))


def test_csv_pairs_with_unknown_ids(trained, tmp_path, capsys):
    (tmp_path / "pairs.csv").write_text("user,item\n1,1\n300,120\n5,999\n9999,3\n9999,999\n")
    assert main(["predict", str(trained), "--pairs", str(tmp_path / "pairs.csv"),
                 "--out", str(tmp_path / "p.parquet")]) == 0
    assert "5 predictions" in capsys.readouterr().out
    table = pq.read_table(tmp_path / "p.parquet").to_pylist()
    # Written as the model holds its ids (integers here), as recommend writes them.
    assert [(r["user"], r["item"]) for r in table] == [(1, 1), (300, 120), (5, 999), (9999, 3), (9999, 999)]
    for row in table:
        assert row["prediction"] == pytest.approx(_expected(trained, int(row["user"]), int(row["item"])), abs=1e-5)


def test_netflix_probe_and_qualifying_layouts(trained, tmp_path):
    (tmp_path / "probe.txt").write_text("1:\n2\n3\n7:\n4\n")
    (tmp_path / "qualifying.txt").write_text("1:\n2,2005-01-02\n7:\n4,2005-03-04\n")
    for name in ("probe.txt", "qualifying.txt"):
        out = tmp_path / f"{name}.csv"
        assert main(["predict", str(trained), "--pairs", str(tmp_path / name), "--out", str(out)]) == 0
        rows = pacsv.read_csv(out).to_pylist()
        wanted = [(2, 1), (3, 1), (4, 7)] if name == "probe.txt" else [(2, 1), (4, 7)]
        assert [(r["user"], r["item"]) for r in rows] == wanted
        for row in rows:
            assert row["prediction"] == pytest.approx(_expected(trained, row["user"], row["item"]), abs=1e-5)


def test_parquet_pairs_and_a_bad_line(trained, tmp_path, capsys):
    pq.write_table(pa.table({"user": [1, 2], "item": [2, 1]}), tmp_path / "pairs.parquet")
    assert main(["predict", str(trained), "--pairs", str(tmp_path / "pairs.parquet"),
                 "--out", str(tmp_path / "p.csv")]) == 0
    assert len(pacsv.read_csv(tmp_path / "p.csv").to_pylist()) == 2
    (tmp_path / "bad.csv").write_text("1,2\n3\n")
    assert main(["predict", str(trained), "--pairs", str(tmp_path / "bad.csv"), "--out", str(tmp_path / "q.csv")]) == 65
    assert "bad.csv:2: expected 2 fields, got 1" in capsys.readouterr().err
    assert not (tmp_path / "q.csv").exists() and not list(tmp_path.glob(".q.csv*"))


def test_pairs_columns_found_by_header_names_or_given_by_position(trained, tmp_path):
    # A header in another spelling and order: columns go by their names, as for rating files.
    (tmp_path / "named.csv").write_text("productId;customer_id\n120;300\n1;1\n")
    # No header, columns given by position: the first line is a pair, not a header.
    (tmp_path / "swapped.tsv").write_text("120\t300\n1\t1\n")
    runs = {"named.csv": [], "swapped.tsv": ["--user-col", "1", "--item-col", "0"]}
    for name, flags in runs.items():
        out = tmp_path / f"{name}.parquet"
        assert main(["predict", str(trained), "--pairs", str(tmp_path / name), "--out", str(out), *flags]) == 0
        rows = pq.read_table(out).to_pylist()
        assert [(r["user"], r["item"]) for r in rows] == [(300, 120), (1, 1)], name
        for row in rows:
            assert row["prediction"] == pytest.approx(_expected(trained, row["user"], row["item"]), abs=1e-5)
