"""Ingest against the bare work it cannot avoid, in one run: wall time and peak RSS of `funkflow ingest`.

From one Netflix-shaped generated dataset at ``--scale`` (1.0 = 100,480,507 ratings), the same ratings as
exports of four kinds: one Parquet file sorted by user, one Parquet file in random row order (float64
ratings, row groups of 1M rows), the many Parquet parts of the generated dataset itself, and the Netflix
Prize text layout (four ``combined_data_N.txt`` files, by ``write_netflix_text.py``). For each, `funkflow
ingest` on the default LocalCluster (one worker process, a thread per core; a subprocess, its process tree
sampled for peak RSS), and beside it the bare reference in this process: for Parquet,
``pyarrow.parquet.read_table`` of the user and item columns and the distinct values of each, by
``numpy.sort`` and a mask (what ``numpy.unique`` did before numpy 2.4, whose ``numpy.unique`` takes 60x as
long on large integer arrays); for the text, ``pyarrow.csv.read_csv`` of the rating lines (the header lines
skipped) and the distinct users.

    python scripts/bench_ingest.py [--scale 1] [--cache /tmp/funkflow-bench] [--only "Netflix Prize text"]
"""

from __future__ import annotations

import argparse
import logging
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from _bench_data import dataset_at
from peak_rss import _tree_rss


def _exports(dataset_root: Path, cache: Path, name: str) -> dict[str, Path]:
    """The dataset's ratings as a user-sorted file, a shuffled file, and its own parts (raw ids 1-based)."""
    parts = sorted((dataset_root / "ratings").glob("*.parquet"))
    folder = cache / f"exports-{name}"
    sorted_file, shuffled_file, many = folder / "sorted.parquet", folder / "shuffled.parquet", folder / "parts"
    if not shuffled_file.exists():
        folder.mkdir(parents=True, exist_ok=True)
        schema = pa.schema([("user", pa.int64()), ("item", pa.int64()), ("rating", pa.float32())])
        many.mkdir(exist_ok=True)
        with pq.ParquetWriter(sorted_file, schema) as writer:
            for j, part in enumerate(parts):
                table = pq.read_table(part, columns=["user", "item", "rating"])
                table = pa.table({"user": pc.add(pc.cast(table["user"], pa.int64()), 1),
                                  "item": pc.add(pc.cast(table["item"], pa.int64()), 1), "rating": table["rating"]})
                writer.write_table(table, row_group_size=1_000_000)
                pq.write_table(table, many / f"part-{j:05d}.parquet")
        table = pq.read_table(sorted_file)
        order = np.random.default_rng(0).permutation(table.num_rows)
        pq.write_table(pa.table({"user": table["user"].to_numpy()[order], "item": table["item"].to_numpy()[order],
                                 "rating": table["rating"].to_numpy().astype(np.float64)[order]}),
                       shuffled_file, row_group_size=1_000_000)
    text = folder / "netflix-text"
    if not text.exists():
        subprocess.run([sys.executable, str(Path(__file__).with_name("write_netflix_text.py")), str(dataset_root),
                        str(text)], check=True)
    return {"one file, sorted by user": sorted_file, "one file, shuffled": shuffled_file,
            f"{len(parts)} files": many, "Netflix Prize text, 4 files": text}


def _is_text(source: Path) -> bool:
    return source.is_dir() and not any(source.glob("*.parquet"))


def _distinct(values: np.ndarray) -> np.ndarray:
    ordered = np.sort(values)
    return ordered[np.concatenate(([True], ordered[1:] != ordered[:-1]))]


def _bare(source: Path) -> float:
    began = time.perf_counter()
    if _is_text(source):
        for file in sorted(source.glob("*.txt")):
            table = pacsv.read_csv(file, read_options=pacsv.ReadOptions(column_names=["user", "rating", "date"]),
                                   parse_options=pacsv.ParseOptions(invalid_row_handler=lambda row: "skip"),
                                   convert_options=pacsv.ConvertOptions(column_types={"user": pa.int64()}))
            _distinct(table["user"].to_numpy())
        return time.perf_counter() - began
    table = pq.read_table(source, columns=["user", "item"])
    for column in ("user", "item"):
        _distinct(table[column].to_numpy())
    return time.perf_counter() - began


def _ingest(source: Path, out: Path) -> tuple[float, int]:
    shutil.rmtree(out, ignore_errors=True)
    layout = "netflix" if _is_text(source) else "parquet"
    began = time.perf_counter()
    child = subprocess.Popen(["funkflow", "-q", "ingest", str(source), "--format", layout, "--out", str(out)])
    peak = 0
    while child.poll() is None:
        peak = max(peak, sum(_tree_rss(child.pid)))
        time.sleep(0.2)
    if child.returncode != 0:
        raise SystemExit(f"funkflow ingest {source} failed with exit {child.returncode}")
    return time.perf_counter() - began, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--cache", type=Path, default=Path("/tmp/funkflow-bench"))
    parser.add_argument("--only", metavar="EXPORT", help="one of the exports, by the start of its label")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    dataset = dataset_at(args.scale, args.cache)
    exports = _exports(dataset.root, args.cache, f"scale-{args.scale:g}")
    if args.only:
        exports = {label: source for label, source in exports.items() if label.startswith(args.only)}
    print(f"scale {args.scale:g}: {dataset.n_ratings:,} ratings; one run", flush=True)
    print("| export | funkflow ingest s | peak RSS | bare read + sort-unique s | ingest / bare |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for label, source in exports.items():
        seconds, peak = _ingest(source, args.cache / "ingested")
        bare = _bare(source)
        print(f"| {label} | {seconds:.1f} | {peak / 1024**3:.2f} GiB | {bare:.1f} | {seconds / bare:.2f} |",
              flush=True)
    shutil.rmtree(args.cache / "ingested", ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
