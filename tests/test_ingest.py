"""Ingest: every format from files the tests write, every bad-line case in strict and rejects mode,
and a property: corrupting a valid file never yields a silently wrong dataset."""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from funkflow.pipeline.app.cli import main
from funkflow.pipeline.core.cluster import InProcessExecutor
from funkflow.pipeline.core.errors import DataError
from funkflow.pipeline.data.dataset import open_dataset
from funkflow.pipeline.data.ingest import ingest
from funkflow.pipeline.data.sources import IngestOptions


def _run(tmp_path: Path, sources: list[Path | str], fmt: str, *extra: str, out: str = "out") -> int:
    return main(["ingest", *map(str, sources), "--format", fmt, "--out", str(tmp_path / out),
                 "--scheduler", "inprocess", *extra])


def _ratings(out: Path) -> list[tuple]:
    """(raw user, raw item, rating, time) of a canonical dataset, sorted."""
    dataset = open_dataset(out)
    users = pq.read_table(out / "users.parquet")["id"].to_pylist()
    items = pq.read_table(out / "items.parquet")["id"].to_pylist()
    rows = []
    for part in dataset.parts:
        t = pq.read_table(part).to_pylist()
        rows += [(users[r["user"]], items[r["item"]], r["rating"], r.get("time")) for r in t]
    return sorted(rows, key=repr)


NETFLIX_1 = "1:\n1488844,3,2005-09-06\n822109,5,2005-05-13\n"
NETFLIX_2 = "2:\n1488844,4,2005-10-01\n30878,1,2004-12-28\n"


def test_netflix_training_files_in_a_directory(tmp_path):
    folder = tmp_path / "training_set"
    folder.mkdir()
    (folder / "mv_0000001.txt").write_text(NETFLIX_1)
    (folder / "mv_0000002.txt").write_text(NETFLIX_2)
    assert _run(tmp_path, [folder], "netflix") == 0
    rows = _ratings(tmp_path / "out")
    assert sorted((u, i, r) for u, i, r, _ in rows) == sorted([
        (1488844, 1, 3.0), (822109, 1, 5.0), (1488844, 2, 4.0), (30878, 2, 1.0)])
    times = {(u, i): t for u, i, _, t in rows}
    assert times[(30878, 2)] == int(np.datetime64("2004-12-28", "s").astype(np.int64))
    meta = json.loads((tmp_path / "out" / "dataset.json").read_text())
    assert (meta["n_users"], meta["n_items"], meta["n_ratings"]) == (3, 2, 4)
    assert meta["id_types"] == {"user": "int64", "item": "int64"}
    # Dense indices follow the sorted raw ids.
    assert pq.read_table(tmp_path / "out" / "users.parquet")["id"].to_pylist() == [30878, 822109, 1488844]


@pytest.mark.parametrize("chunk_bytes", [97, 1000, 7000, 20000])
def test_combined_file_gives_the_same_dataset_whatever_the_chunking(tmp_path, chunk_bytes, monkeypatch):
    """Chunks (and the pieces a scan reads) may start anywhere in a section: their rows keep their movie."""
    import funkflow.tasks.ingest

    rng = np.random.default_rng(3)
    sections = []
    for movie in range(1, 41):
        users = rng.choice(5000, size=rng.integers(1, 60), replace=False) + 1
        sections.append(f"{movie}:\n" + "".join(
            f"{u},{rng.integers(1, 6)},2005-0{rng.integers(1, 10)}-1{rng.integers(0, 10)}\n" for u in users))
    text = "".join(sections)
    (tmp_path / "combined_data_1.txt").write_text(text)
    expected = sorted(((int(line.split(",")[0]), movie, float(line.split(",")[1])) for movie, section in
                       enumerate(sections, start=1) for line in section.splitlines()[1:]), key=repr)
    executor = InProcessExecutor()
    whole = ingest(executor, [str(tmp_path / "combined_data_1.txt")], IngestOptions(format="netflix"),
                   tmp_path / "whole")
    monkeypatch.setattr(funkflow.tasks.ingest, "PIECE_BYTES", 3000)  # scans and parses read several pieces
    cut = ingest(executor, [str(tmp_path / "combined_data_1.txt")],
                 IngestOptions(format="netflix", chunk_bytes=chunk_bytes), tmp_path / "cut")
    for dataset in (whole, cut):
        assert sorted(((u, i, r) for u, i, r, _ in _ratings(dataset.root)), key=repr) == expected
        assert dataset.meta["duplicates"]["pairs"] == 0
    assert whole.fingerprint == cut.fingerprint


@settings(max_examples=150, deadline=None)
@given(st.lists(st.sampled_from([b"12:", b"7,3,2005-09-06", b"", b"12", b"\xff:", b"3,4", b"1:x", b"\r", b"5:\r",
                                 b"\r\r", b"\ra", b"\xff", b"a,\xff:"]), max_size=25), st.booleans())
def test_the_header_above_a_chunk_is_the_one_the_parser_sees(lines, pairs):
    """A scan finds the header above each chunk boundary by walking back from it; the parser's header mask
    must agree on every line start."""
    from funkflow.tasks import parse
    from funkflow.tasks.ingest import _header_above

    data = b"".join(line + b"\n" for line in lines)
    raw, bad = parse.split_lines(data)
    stripped = parse.strip_lines(raw)
    header = parse.header_mask(stripped, bad, pairs)
    position = 0
    for n in range(len(lines) + 1):
        above = np.flatnonzero(header[:n])
        expected = (stripped[int(above[-1])].as_py(), 100 + int(above[-1]) + 1) if above.shape[0] else ("x:", 1)
        assert _header_above(data, position, 100, pairs, ("x:", 1)) == expected
        position += len(lines[n]) + 1 if n < len(lines) else 0


@pytest.mark.parametrize("name,text,scale", [
    ("u.data", "196\t242\t3\t881250949\n186\t302\t3\t891717742\n", (1, 5)),
    ("ratings.dat", "1::1193::5::978300760\n1::661::3::978302109\n", (1, 5)),
    ("ratings.csv", "userId,movieId,rating,timestamp\n1,1,4.0,964982703\n1,3,4.5,964981247\n", (0.5, 5)),
])
def test_movielens_layouts_by_name(tmp_path, name, text, scale):
    (tmp_path / name).write_text(text)
    assert _run(tmp_path, [tmp_path / name], "movielens") == 0
    rows = _ratings(tmp_path / "out")
    expected = []
    for line in text.strip().splitlines()[1 if name.endswith(".csv") else 0:]:
        u, i, r, t = line.replace("::", "\t").replace(",", "\t").split("\t")
        expected.append((int(u), int(i), float(r), int(t)))
    assert rows == sorted(expected, key=repr)
    # u.data and ratings.dat are whole stars, ratings.csv half stars: predictions are clipped to this.
    assert json.loads((tmp_path / "out" / "dataset.json").read_text())["rating_scale"] == list(scale)


def test_movielens_layout_by_content_and_gzip(tmp_path):
    (tmp_path / "export.gz").write_bytes(gzip.compress(b"1::1193::5::978300760\n2::661::3::978302109\n"))
    assert _run(tmp_path, [tmp_path / "export.gz"], "movielens") == 0
    assert _ratings(tmp_path / "out") == [(1, 1193, 5.0, 978300760), (2, 661, 3.0, 978302109)]


def test_negative_ids_and_ids_at_the_int64_limits_stay_integers_in_numeric_order(tmp_path):
    """They all became strings, sorted as text ('-1', '-5', '0', ...), and predictions came back as strings."""
    from funkflow.tasks.idmap import index_of

    low, high = -2**63, 2**63 - 1
    rows = [(-1, low, 4), (-5, high, 3), (0, 5, 2), (7, -3, 5)]
    (tmp_path / "r.csv").write_text("user,item,rating\n" + "".join(f"{u},{i},{r}\n" for u, i, r in rows))
    assert _run(tmp_path, [tmp_path / "r.csv"], "csv") == 0
    assert json.loads((tmp_path / "out" / "dataset.json").read_text())["id_types"] == {"user": "int64",
                                                                                        "item": "int64"}
    users = pq.read_table(tmp_path / "out" / "users.parquet")["id"]
    items = pq.read_table(tmp_path / "out" / "items.parquet")["id"]
    assert users.to_pylist() == [-5, -1, 0, 7] and items.to_pylist() == [low, -3, 5, high]
    assert sorted(_ratings(tmp_path / "out")) == sorted((u, i, float(r), None) for u, i, r in rows)
    # Pairs to predict arrive as text: matched by value, the limits and the signs too.
    assert index_of(pa.array(["-5", "7", "-6", str(high), str(low)]), users).tolist() == [0, 3, -1, -1, -1]
    assert index_of(pa.array([str(high), str(low), "-3", str(high + 1)]), items).tolist() == [3, 0, 1, -1]


def test_csv_with_string_ids_named_columns_and_detected_delimiter(tmp_path):
    (tmp_path / "r.csv").write_text('when;who;what;stars\n2020-01-02;alice;"The Matrix; Reloaded";4\n'
                                    '2020-01-03T10:00:00;bob;Heat;3.5\n')
    assert _run(tmp_path, [tmp_path / "r.csv"], "csv", "--user-col", "who", "--item-col", "what",
                "--rating-col", "stars", "--time-col", "when", "--rating-scale", "0.5,5") == 0
    rows = _ratings(tmp_path / "out")
    assert rows == sorted([("alice", "The Matrix; Reloaded", 4.0, 1577923200), ("bob", "Heat", 3.5, 1578045600)],
                          key=repr)
    meta = json.loads((tmp_path / "out" / "dataset.json").read_text())
    assert meta["id_types"] == {"user": "large_string", "item": "large_string"}


@pytest.mark.parametrize("header,row", [
    ("item_id,user_id,score", "{i},{u},{r}"),
    ("timestamp,userId,movieId,rating", "{t},{u},{i},{r}"),
    ("Customer;SKU;Stars", "{u};{i};{r}"),
])
def test_a_header_maps_columns_by_name_never_by_position(tmp_path, caplog, header, row):
    """`item_id,user_id,score` was read with users and items swapped, by position."""
    ratings = [(7, 1001, 4, 1_600_000_000), (8, 1002, 2, 1_600_000_100), (7, 1002, 5, 1_600_000_200)]
    lines = [header] + [row.format(u=u, i=i, r=r, t=t) for u, i, r, t in ratings]
    (tmp_path / "r.csv").write_text("\n".join(lines) + "\n")
    caplog.set_level("INFO", logger="funkflow")
    assert _run(tmp_path, [tmp_path / "r.csv"], "csv", "--rating-scale", "1,5") == 0
    got = [(u, i, r) for u, i, r, _ in _ratings(tmp_path / "out")]
    assert got == sorted([(u, i, float(r)) for u, i, r, _ in ratings], key=repr)
    assert "columns by name: user=" in caplog.text


@pytest.mark.parametrize("header,flag", [
    ("user,customer,item,rating", "more than one user column .* --user-col"),
    ("user,item,stars,score", "more than one rating column .* --rating-col"),
    ("who,item,rating", "names no user column; say which with --user-col"),
    ("user,item,opinion", "names no rating column; say which with --rating-col"),
])
def test_a_header_that_names_no_column_or_one_twice_is_refused_saying_which_flag(tmp_path, capsys, header, flag):
    (tmp_path / "r.csv").write_text(header + "\n" + ",".join(["1", "2", "3", "4"][:len(header.split(","))]) + "\n")
    assert _run(tmp_path, [tmp_path / "r.csv"], "csv", "--rating-scale", "1,5") == 65
    assert re.search(flag, capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


def test_a_file_without_header_is_read_by_position(tmp_path):
    (tmp_path / "r.csv").write_text("7,1001,4\n8,1002,2\n")
    assert _run(tmp_path, [tmp_path / "r.csv"], "csv", "--rating-scale", "1,5") == 0
    assert [(u, i, r) for u, i, r, _ in _ratings(tmp_path / "out")] == [(7, 1001, 4.0), (8, 1002, 2.0)]


@pytest.mark.parametrize("fmt,ratings,scale", [
    ("csv", [4, 3.5, 0.5, 5], [0.5, 5]),
    ("csv", [4, 3, 1, 2], [1, 5]),
    ("csv", [7, 10, 1, 3], [1, 10]),
    ("parquet", [0.25, 0.75, 0.5, 0.5], [0.25, 0.75]),
])
def test_without_a_rating_scale_it_is_inferred_from_the_data_and_said(tmp_path, caplog, fmt, ratings, scale):
    table = pa.table({"user": [1, 1, 2, 2], "item": [10, 11, 10, 12], "rating": [float(r) for r in ratings]})
    source = tmp_path / f"r.{fmt}"
    if fmt == "csv":
        rows = zip(*table.to_pydict().values())
        source.write_text("user,item,rating\n" + "".join(f"{u},{i},{r}\n" for u, i, r in rows))
    else:
        pq.write_table(table, source)
    caplog.set_level("INFO", logger="funkflow")
    assert _run(tmp_path, [source], fmt) == 0
    assert json.loads((tmp_path / "out" / "dataset.json").read_text())["rating_scale"] == scale
    assert f"rating scale inferred from the data: [{scale[0]:g}, {scale[1]:g}]" in caplog.text


def test_parquet_directory_with_string_ids(tmp_path):
    folder = tmp_path / "export"
    folder.mkdir()
    pq.write_table(pa.table({"u": ["x", "y"], "i": [10, 11], "r": [4.0, 2.0]}), folder / "a.parquet")
    pq.write_table(pa.table({"u": ["z"], "i": [10], "r": [5.0]}), folder / "b.parquet")
    assert _run(tmp_path, [folder], "parquet", "--user-col", "u", "--item-col", "i", "--rating-col", "r",
                "--rating-scale", "1,5") == 0
    assert _ratings(tmp_path / "out") == sorted([("x", 10, 4.0, None), ("y", 11, 2.0, None), ("z", 10, 5.0, None)],
                                                key=repr)


def test_parquet_columns_are_mapped_by_name_as_a_csv_header_is(tmp_path, capsys):
    """`--format parquet` looked for columns named user, item and rating only."""
    pq.write_table(pa.table({"userId": [1, 2], "movieId": [10, 11], "rating": [4.0, 2.0],
                             "timestamp": [1_600_000_000, 1_600_000_100]}), tmp_path / "r.parquet")
    assert _run(tmp_path, [tmp_path / "r.parquet"], "parquet", "--rating-scale", "1,5") == 0
    assert _ratings(tmp_path / "out") == [(1, 10, 4.0, 1_600_000_000), (2, 11, 2.0, 1_600_000_100)]
    pq.write_table(pa.table({"a": [1], "b": [10], "c": [4.0]}), tmp_path / "other.parquet")
    assert _run(tmp_path, [tmp_path / "other.parquet"], "parquet", out="refused") == 65
    assert "the columns (a, b, c) names no user column; say which with --user-col NAME" in capsys.readouterr().err


BAD_LINES = [
    # (file text, line number of the bad line, reason)
    ("1:\n10,3,2005-01-02\n11,,2005-01-02\n", 3, "missing_field"),
    ("1:\n10,3,2005-01-02\n1x,3,2005-01-02\n", 3, "non_numeric"),
    ("1:\n10,3,2005-01-02\n11,7,2005-01-02\n", 3, "rating_out_of_scale"),
    ("1:\n10,3,2005-01-02\n11,NaN,2005-01-02\n", 3, "rating_nan"),
    ("1:\n10,3,2005-01-02\n99999999999999999999,3,2005-01-02\n", 3, "id_overflow"),
    ("10,3,2005-01-02\n1:\n11,3,2005-01-02\n", 1, "movie_header_missing"),
    ("1:\n10,3,2005-01-02\n2a:\n11,3,2005-01-02\n", 3, "movie_header_malformed"),
    ("1:\n10,3,2005-01-02\n11,3,2005-02-30\n", 3, "bad_time"),
    ("1:\n10,3,2005-01-02\n11,3\n", 3, "field_count"),
]


@pytest.mark.parametrize("text,line,reason", BAD_LINES)
def test_bad_line_strict_exits_65_naming_file_line_and_reason(tmp_path, capsys, text, line, reason):
    (tmp_path / "mv.txt").write_text(text)
    assert _run(tmp_path, [tmp_path / "mv.txt"], "netflix") == 65
    err = capsys.readouterr().err
    assert f"mv.txt:{line}: " in err and f"({reason})" in err
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


@pytest.mark.parametrize("text,line,reason", BAD_LINES)
def test_bad_line_goes_to_the_rejects_file(tmp_path, text, line, reason):
    (tmp_path / "mv.txt").write_text(text)
    assert _run(tmp_path, [tmp_path / "mv.txt"], "netflix", "--rejects", str(tmp_path / "bad.csv")) == 0
    rejects = pacsv.read_csv(tmp_path / "bad.csv").to_pylist()
    assert (rejects[0]["line"], rejects[0]["reason"]) == (line, reason)
    assert rejects[0]["source"].endswith("mv.txt")
    meta = json.loads((tmp_path / "out" / "dataset.json").read_text())
    assert meta["rejects"]["by_reason"][reason] >= 1
    assert meta["n_ratings"] + len(rejects) == sum(1 for t in text.splitlines() if not re.fullmatch(r"[0-9]+:", t))


def test_duplicate_policies(tmp_path, capsys):
    text = "userId,movieId,rating,timestamp\n1,10,4,200\n1,10,2,100\n2,10,5,1\n1,10,3,200\n"
    (tmp_path / "ratings.csv").write_text(text)
    expected = {"keep_last": 3.0, "keep_first": 2.0, "mean": 3.0}
    for policy, rating in expected.items():
        assert _run(tmp_path, [tmp_path / "ratings.csv"], "movielens", "--duplicates", policy, out=policy) == 0
        rows = {(u, i): r for u, i, r, _ in _ratings(tmp_path / policy)}
        assert rows == {(1, 10): rating, (2, 10): 5.0}
        meta = json.loads((tmp_path / policy / "dataset.json").read_text())
        assert meta["duplicates"] == {"policy": policy, "pairs": 1, "rows_dropped": 2}
    assert _run(tmp_path, [tmp_path / "ratings.csv"], "movielens", "--duplicates", "error", out="error") == 65
    err = capsys.readouterr().err
    assert "ratings.csv:3: duplicate of the (user, item) pair at" in err and "ratings.csv:2" in err


def test_empty_input_exits_65(tmp_path, capsys):
    (tmp_path / "empty.csv").write_text("")
    assert _run(tmp_path, [tmp_path / "empty.csv"], "csv", "--rating-scale", "1,5") == 65
    assert "no ratings found" in capsys.readouterr().err


def test_truncated_gzip_and_parquet_exit_65_naming_the_file(tmp_path, capsys):
    whole = gzip.compress(("1:\n" + "".join(f"{u},3,2005-01-02\n" for u in range(1, 5000))).encode())
    (tmp_path / "mv.txt.gz").write_bytes(whole[: len(whole) // 2])
    assert _run(tmp_path, [tmp_path / "mv.txt.gz"], "netflix") == 65
    assert "mv.txt.gz: unreadable, truncated or corrupt" in capsys.readouterr().err
    pq.write_table(pa.table({"user": [1, 2], "item": [1, 2], "rating": [3.0, 4.0]}), tmp_path / "r.parquet")
    data = (tmp_path / "r.parquet").read_bytes()
    (tmp_path / "r.parquet").write_bytes(data[: len(data) - 20])
    assert _run(tmp_path, [tmp_path / "r.parquet"], "parquet", "--rating-scale", "1,5", out="p") == 65
    assert "r.parquet: not a readable Parquet file" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not (tmp_path / "p").exists()


def test_a_parquet_file_that_changes_between_its_two_reads_is_refused(tmp_path):
    """Parquet chunks are read twice (ids, then encoding): a file rewritten in between must not lose rows."""
    from funkflow.tasks.ingest import Source, SourceError, encode_chunk, parquet_chunks, parse_chunk

    path = tmp_path / "r.parquet"
    pq.write_table(pa.table({"user": [1, 2, 3], "item": [1, 2, 1], "rating": [3.0, 4.0, 5.0]}), path)
    source = Source(0, str(path), None, {"user": "user", "item": "item", "rating": "rating", "time": None})
    (chunk,) = parquet_chunks(source, 100)
    parsed = parse_chunk(chunk, (1.0, 5.0), str(tmp_path), 0)
    pq.write_table(pa.table({"user": [1, 2], "item": [1, 2], "rating": [3.0, 4.0]}), path)
    with pytest.raises(SourceError, match=r"r\.parquet: changed while being ingested \(2 rows .* 3 at first\)"):
        encode_chunk(chunk, parsed.stats, (1.0, 5.0), 0, parsed.users, parsed.items, 1, str(tmp_path / "b"))


def test_missing_source_and_unknown_column_are_data_errors(tmp_path, capsys):
    assert _run(tmp_path, [tmp_path / "nowhere.csv"], "csv", "--rating-scale", "1,5") == 65
    assert "nowhere.csv: no such file or directory" in capsys.readouterr().err
    (tmp_path / "r.csv").write_text("a,b,c\n1,2,3\n")
    assert _run(tmp_path, [tmp_path / "r.csv"], "csv", "--user-col", "who", "--rating-scale", "1,5") == 65
    assert "no user column named 'who' (columns: a, b, c)" in capsys.readouterr().err


VALID = [f"{u},{(u * 7 + m) % 5 + 1},2005-0{(u + m) % 9 + 1}-1{u % 10}" for m in (1, 2) for u in range(1, 40)]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.integers(0, len(VALID) + 1), st.sampled_from(
    ["drop_char", "insert_char", "swap_digit", "empty_field", "garbage"])), max_size=6),
    st.integers(0, 2**32 - 1))
def test_corruption_never_yields_a_silently_wrong_dataset(tmp_path_factory, corruptions, seed):
    """Every input line is either a kept row equal to its source, or a rejected line."""
    rng = np.random.default_rng(seed)
    lines = ["1:", *VALID[:39], "2:", *VALID[39:]]
    for index, kind in corruptions:
        j = index % len(lines)
        text = lines[j]
        pos = int(rng.integers(0, max(len(text), 1)))
        if kind == "drop_char" and text:
            text = text[:pos] + text[pos + 1:]
        elif kind == "insert_char":
            text = text[:pos] + str(rng.choice(list("0123456789,:-x. "))) + text[pos:]
        elif kind == "swap_digit":
            text = "".join(str(rng.integers(0, 10)) if ch.isdigit() and rng.random() < 0.3 else ch for ch in text)
        elif kind == "empty_field":
            text = ",".join("" if k == pos % 3 else f for k, f in enumerate(text.split(",")))
        else:
            text = "".join(rng.choice(list("abc,:;1")) for _ in range(pos % 12))
        lines[j] = text
    tmp = tmp_path_factory.mktemp("corrupt")
    (tmp / "mv.txt").write_text("\n".join(lines) + "\n")
    try:
        ingest(InProcessExecutor(), [str(tmp / "mv.txt")], IngestOptions(format="netflix", rejects=tmp / "bad.csv",
                                                                         duplicates="error"), tmp / "out")
    except DataError as exc:
        assert "no ratings found" in str(exc) or "duplicate" in str(exc)
        return
    rejected = {r["line"] for r in pacsv.read_csv(tmp / "bad.csv").to_pylist()} if (tmp / "bad.csv").exists() else set()
    kept = _ratings(tmp / "out")
    # What each line means if read by hand: its movie is the last well-formed header above it.
    movie, truth = None, {}
    for n, text in enumerate(lines, start=1):
        if ":" in text or ("," not in text and text):
            movie = int(text[:-1]) if text[:-1].isdigit() and text.endswith(":") else None
            continue
        parts = text.split(",")
        if (movie is not None and len(parts) == 3 and parts[0].isdigit() and len(parts[0]) < 19
                and parts[1].replace(".", "", 1).isdigit() and 1 <= float(parts[1]) <= 5
                and re.fullmatch(r"[0-9]{4}-[0-9]{2}-[0-9]{2}", parts[2])):
            try:
                day = np.datetime64(parts[2], "D")
            except ValueError:
                continue
            if str(day) == parts[2]:
                truth[n] = (int(parts[0]), movie, float(np.float32(float(parts[1]))),
                            int(day.astype("datetime64[s]").astype(np.int64)))
    non_empty = {n for n, text in enumerate(lines, start=1) if text}
    headers = {n for n, text in enumerate(lines, start=1) if ":" in text or ("," not in text and text)}
    good_headers = {n for n in headers if lines[n - 1].endswith(":") and lines[n - 1][:-1].isdigit()}
    assert sorted(kept, key=repr) == sorted(truth.values(), key=repr)
    assert len(kept) + len(rejected - good_headers) == len(non_empty - good_headers)


@pytest.fixture(scope="module")
def ingested_movielens(tmp_path_factory) -> Path:
    """A MovieLens-like ratings.csv from a planted model (300 users × 80 items), ingested."""
    tmp = tmp_path_factory.mktemp("ml")
    rng = np.random.default_rng(5)
    P, Q = rng.normal(0, 0.5, (300, 3)), rng.normal(0, 0.5, (80, 3))
    lines = ["userId,movieId,rating,timestamp"]
    for u in range(300):
        for i in rng.choice(80, size=rng.integers(5, 40), replace=False):
            rating = float(np.clip(np.round(2 * (3.5 + P[u] @ Q[i] + rng.normal(0, 0.3))) / 2, 0.5, 5))
            lines.append(f"{u + 1},{i + 101},{rating},{int(9e8 + rng.integers(0, 10**8))}")
    (tmp / "ratings.csv").write_text("\n".join(lines) + "\n")
    assert _run(tmp, [tmp / "ratings.csv"], "movielens", out="data") == 0
    return tmp / "data"


@pytest.mark.parametrize("split", [["split.method=per_user"], ["split.method=time", "split.cutoff=1960-01-01"]])
def test_ingested_dataset_trains_with_each_split(ingested_movielens, tmp_path, split):
    from funkflow.pipeline.app.stages import run_pipeline
    from funkflow.pipeline.core.config import load_config

    if "split.cutoff=1960-01-01" in split:  # a cutoff that leaves a tenth of the ratings for test
        times = np.concatenate([pq.read_table(p)["time"].to_numpy() for p in open_dataset(ingested_movielens).parts])
        split = ["split.method=time", f"split.cutoff={int(np.quantile(times, 0.9))}"]
    summary = run_pipeline(load_config(None, [
        f"data.source={ingested_movielens}", "data.generate=null", *split, "model.k=4", "train.epochs=40",
        "train.lr=0.03",
        "train.d=2", "cluster.scheduler=inprocess", f"output.run_dir={tmp_path / 'run'}"]))
    blocks = json.loads((tmp_path / "run" / "blocks" / "blocks.json").read_text())
    counts = np.array(blocks["counts"]).sum(axis=0)
    assert counts[2] == summary["n_test"] > 0 and counts[0] > 0
    if split[0] == "split.method=per_user":
        assert counts[2] == 2 * 300  # every user has at least 5 ratings: 2 held out each
    assert summary["test_rmse"] < summary["baselines"]["global_mean"]["rmse"]


def test_per_user_split_refuses_a_dataset_without_whole_users_per_part(tmp_path, planted_low_rank):
    from funkflow.pipeline.app.stages import run_pipeline
    from funkflow.pipeline.core.config import load_config

    with pytest.raises(DataError, match="per_user needs every user's ratings in one part"):
        run_pipeline(load_config(None, [f"data.source={planted_low_rank}", "data.generate=null",
                                        "split.method=per_user", "cluster.scheduler=inprocess",
                                        f"output.run_dir={tmp_path / 'run'}"]))


def test_given_test_set_indexed_with_the_training_maps(ingested_movielens, tmp_path, capsys):
    from funkflow.pipeline.app.stages import run_pipeline
    from funkflow.pipeline.core.config import load_config

    # Test pairs of known users and items, one unseen user and one unseen item.
    (tmp_path / "test.csv").write_text("userId,movieId,rating,timestamp\n1,101,4,1\n2,102,3,1\n"
                                       "5000,101,4,1\n1,9999,2,1\n")
    assert main(["ingest", str(tmp_path / "test.csv"), "--format", "movielens", "--out", str(tmp_path / "test"),
                 "--id-maps", str(ingested_movielens), "--scheduler", "inprocess"]) == 0
    meta = json.loads((tmp_path / "test" / "dataset.json").read_text())
    assert meta["unseen"] == {"rows_with_unseen_user": 1, "rows_with_unseen_item": 1}
    assert meta["n_ratings"] == 2 and meta["id_maps_of"] == open_dataset(ingested_movielens).fingerprint
    assert (pq.read_table(tmp_path / "test" / "users.parquet").equals(
        pq.read_table(ingested_movielens / "users.parquet")))
    summary = run_pipeline(load_config(None, [
        f"data.source={ingested_movielens}", "data.generate=null", "split.method=given",
        f"split.test_source={tmp_path / 'test'}", "model.k=4", "train.epochs=3", "train.d=2",
        "cluster.scheduler=inprocess", f"output.run_dir={tmp_path / 'run'}"]))
    assert summary["n_test"] == 2
    # A test set indexed like another dataset is refused.
    with pytest.raises(DataError, match="not indexed like"):
        run_pipeline(load_config(None, [
            f"data.source={tmp_path / 'test'}", "data.generate=null", "split.method=given",
            f"split.test_source={tmp_path / 'test'}", "cluster.scheduler=inprocess",
            f"output.run_dir={tmp_path / 'run2'}"]))


def test_a_raw_test_file_is_ingested_in_the_run_with_the_training_id_maps(tmp_path, caplog):
    """data.source and split.test_source both raw files: one run ingests both, the test set indexed by the
    training ids (unseen ids left out and counted), and a re-run touches neither."""
    import logging

    from funkflow.pipeline.app.stages import run_pipeline
    from funkflow.pipeline.core.config import load_config

    rng = np.random.default_rng(9)
    rows = [f"u{u},m{i},{rng.integers(1, 6)}" for u in range(60) for i in rng.choice(30, 12, replace=False)]
    (tmp_path / "train.csv").write_text("user,item,stars\n" + "\n".join(rows) + "\n")
    (tmp_path / "test.csv").write_text("user,item,stars\nu1,m3,4\nu2,m5,2\nnewcomer,m1,5\nu3,unseen,1\n")
    config = load_config(None, [f"data.source={tmp_path / 'train.csv'}", "data.format=csv", "split.method=given",
                                f"split.test_source={tmp_path / 'test.csv'}", "model.k=4", "train.epochs=3",
                                "cluster.scheduler=inprocess", f"output.run_dir={tmp_path / 'run'}"])
    caplog.set_level(logging.INFO, logger="funkflow")
    summary = run_pipeline(config)
    assert summary["n_test"] == 2
    meta = json.loads((tmp_path / "run" / "test_data" / "dataset.json").read_text())
    assert meta["unseen"] == {"rows_with_unseen_user": 1, "rows_with_unseen_item": 1}
    assert meta["rating_scale"] == json.loads((tmp_path / "run" / "data" / "dataset.json").read_text())["rating_scale"]
    assert "ingest-test: done" in caplog.text
    caplog.clear()
    run_pipeline(config)
    assert "ingest-test: up to date" in caplog.text and "train: up to date" in caplog.text


def test_run_ingests_raw_files_as_a_stage_and_only_again_when_they_change(tmp_path, caplog):
    import logging

    from funkflow.pipeline.app.stages import run_pipeline
    from funkflow.pipeline.core.config import load_config

    caplog.set_level(logging.INFO, logger="funkflow")
    rng = np.random.default_rng(2)
    lines = ["userId,movieId,rating,timestamp"] + [
        f"{u},{i},{rng.integers(1, 6)},{1000 + u}" for u in range(1, 120) for i in rng.choice(60, 15, replace=False)]
    (tmp_path / "ratings.csv").write_text("\n".join(lines) + "\n")
    sets = [f"data.source={tmp_path / 'ratings.csv'}", "data.format=movielens", "data.generate=null", "model.k=4",
            "train.epochs=2", "train.d=2", "cluster.scheduler=inprocess", f"output.run_dir={tmp_path / 'run'}"]
    first = run_pipeline(load_config(None, sets))
    assert first["n_ratings"] == 119 * 15 and "ingest: done" in caplog.text
    caplog.clear()
    assert run_pipeline(load_config(None, sets)) == first
    assert "ingest: up to date" in caplog.text
    (tmp_path / "ratings.csv").write_text("\n".join(lines[:-15]) + "\n")
    assert run_pipeline(load_config(None, sets))["n_ratings"] == 118 * 15


def test_typed_parquet_rejects_like_text(tmp_path):
    """Integer ids and float ratings are checked as numbers; the reasons are those of the text path."""
    table = pa.table({"user": pa.array([1, None, 3, 4, 5], pa.int64()), "item": pa.array([7, 7, 7, 7, 7], pa.int32()),
                      "rating": pa.array([4.0, 3.0, float("nan"), 9.0, None]),
                      "time": pa.array([10, 11, 12, 13, 14], pa.int64())})
    pq.write_table(table, tmp_path / "r.parquet")
    assert _run(tmp_path, [tmp_path / "r.parquet"], "parquet", "--rating-scale", "1,5", "--time-col", "time",
                "--rejects", str(tmp_path / "bad.csv")) == 0
    assert _ratings(tmp_path / "out") == [(1, 7, 4.0, 10)]
    rejects = [(r["line"], r["reason"]) for r in pacsv.read_csv(tmp_path / "bad.csv").to_pylist()]
    assert rejects == [(2, "missing_field"), (3, "rating_nan"), (4, "rating_out_of_scale"), (5, "missing_field")]


_PLAIN_LINES = ["12:", "0012:", "7,3,2005-09-06", "00123,5,2000-02-29", "9,1,1969-12-31", "",
                "123456789012345678,2,2005-01-01"]
_ODD_LINES = ["12", "1,3", "1,6,2005-01-01", "1,3,1900-02-29", "1,3.5,2005-01-01", "x,3,2005-01-01",
              "1,3,2005-1-01", "1234567890123456789,3,2005-01-01", "1,3,2005-01-01,x", "\u00e9,3,2005-01-01", ":",
              "1234567890123456789:", "1, 3,2005-01-01"]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(_PLAIN_LINES + _ODD_LINES), st.sampled_from(["\n", "\r\n"])), max_size=30),
       st.sampled_from([None, ("5:", 3), ("bad:", 3)]), st.booleans())
def test_plain_netflix_text_is_read_in_one_pass_as_the_pattern_reads_it(lines, context, last_newline):
    """The one-pass reader takes exactly the pieces whose every line is plain, and reads them as the line by line
    parser does: the same rows, positions and context for the next piece."""
    from funkflow.tasks.parse import _netflix_by_pattern, _plain_netflix, parse_netflix

    text = "".join(line + end for line, end in lines)
    data = (text if last_newline else text.removesuffix("\n")).encode()
    expected = _netflix_by_pattern(data, 10, context, (1.0, 5.0), False)
    parsed = parse_netflix(data, 10, context, (1.0, 5.0))
    assert parsed.rows.to_pylist() == expected.rows.to_pylist()
    assert (parsed.reject_lines.tolist(), parsed.reject_reasons) == (expected.reject_lines.tolist(),
                                                                     expected.reject_reasons)
    assert parsed.context == expected.context
    if context != ("bad:", 3):  # a malformed header above the piece: never read in one pass
        placed, plain = context is not None, True
        for line, _ in lines:
            plain &= line in _PLAIN_LINES and (placed or line == "" or line.endswith(":"))
            placed |= line.endswith(":")
        assert _plain_netflix(np.frombuffer(data, dtype=np.uint8), 5 if context else -1, 1.0, 5.0)[0] == plain


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 40), st.integers(0, 9)), max_size=300),
       st.sampled_from([0, 1_000_000, 2**30]))
def test_sorted_pairs_is_a_stable_sort_of_the_pairs(pairs, spread):
    """Duplicates keep their row order; ``spread`` widens the ids until pair and row no longer share 63 bits."""
    from funkflow.tasks.ingest import sorted_pairs

    users = np.array([u * spread + u for u, _ in pairs], dtype=np.int64)
    items = np.array([i * spread + i for _, i in pairs], dtype=np.int64)
    expected = np.lexsort((np.arange(len(pairs)), items, users))
    order, sorted_users, sorted_items = sorted_pairs(users, items)
    np.testing.assert_array_equal(order, expected)
    np.testing.assert_array_equal(sorted_users, users[expected])
    np.testing.assert_array_equal(sorted_items, items[expected])
    # Rows already in pair order (an export sorted by user and item) come back as they are.
    order, again_users, again_items = sorted_pairs(users[expected], items[expected])
    np.testing.assert_array_equal(order, np.arange(len(pairs)))
    np.testing.assert_array_equal(again_users, users[expected])
    np.testing.assert_array_equal(again_items, items[expected])
