"""Write a canonical dataset's ratings in the Netflix Prize text layout, to test ingest at scale.

One ``combined_data_N.txt`` per group of items (``MovieID:`` then
``CustomerID,Rating,YYYY-MM-DD`` lines, as in the Prize's combined files),
with raw ids from the dataset's id maps and a date derived from each rating's
position (the generator has no times). Items are written in parallel on a
LocalCluster, each task reading only the parts' columns it needs.

    python scripts/write_netflix_text.py DATASET OUT_DIR [--files 4]
    python scripts/peak_rss.py -- funkflow ingest OUT_DIR --format netflix --out DIR
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from funkflow.pipeline.core.cluster import open_executor
from funkflow.pipeline.core.config import ClusterConfig
from funkflow.pipeline.data.dataset import open_dataset

_EPOCH_DAY = np.datetime64("1999-11-11", "D")


def write_file(parts: list[str], users_file: str, items_file: str, first_item: int, last_item: int,
               out: str) -> int:
    """Write the ratings of items [first_item, last_item) to ``out``; return the line count."""
    user_ids = pq.read_table(users_file)["id"].to_numpy()
    item_ids = pq.read_table(items_file)["id"].to_numpy()
    chosen = []
    for part in parts:
        table = pq.read_table(part, columns=["user", "item", "rating"],
                              filters=[("item", ">=", first_item), ("item", "<", last_item)])
        chosen.append(table)
    table = pa.concat_tables(chosen)
    table = table.take(pc.sort_indices(table, [("item", "ascending"), ("user", "ascending")]))
    users = table["user"].to_numpy()
    items = table["item"].to_numpy()
    ratings = np.rint(table["rating"].to_numpy()).clip(1, 5).astype(np.int64)
    days = _EPOCH_DAY + ((users.astype(np.int64) * 7919 + items * 104729) % 2200).astype("timedelta64[D]")
    lines = 0
    tmp = Path(out).with_name(f".{Path(out).name}.tmp")
    with open(tmp, "w", encoding="ascii") as f:
        starts = np.flatnonzero(np.diff(items, prepend=-1)) if items.shape[0] else np.zeros(0, np.int64)
        bounds = np.append(starts, items.shape[0])
        for s, e in zip(bounds[:-1], bounds[1:]):
            body = np.char.add(np.char.add(np.char.add(user_ids[users[s:e]].astype(str), ","),
                                           np.char.add(ratings[s:e].astype(str), ",")),
                               days[s:e].astype(str))
            f.write(f"{item_ids[items[s]]}:\n" + "\n".join(body.tolist()) + "\n")
            lines += 1 + (e - s)
    tmp.replace(out)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--files", type=int, default=4)
    parser.add_argument("--tasks-per-file", type=int, default=8)
    args = parser.parse_args()
    dataset = open_dataset(args.dataset)
    args.out.mkdir(parents=True, exist_ok=True)
    n_pieces = args.files * args.tasks_per_file
    edges = np.linspace(0, dataset.n_items, n_pieces + 1).astype(int)
    parts = [str(p) for p in dataset.parts]
    with open_executor(ClusterConfig()) as executor:
        futures = [executor.submit(write_file, parts, str(args.dataset / "users.parquet"),
                                   str(args.dataset / "items.parquet"), int(edges[j]), int(edges[j + 1]),
                                   str(args.out / f".piece-{j:04d}.txt"), name="write_netflix_piece")
                   for j in range(n_pieces)]
        lines = sum(executor.gather(futures))
    for f in range(args.files):
        with open(args.out / f"combined_data_{f + 1}.txt", "wb") as target:
            for j in range(f * args.tasks_per_file, (f + 1) * args.tasks_per_file):
                piece = args.out / f".piece-{j:04d}.txt"
                with open(piece, "rb") as source:
                    while block := source.read(1 << 24):
                        target.write(block)
                piece.unlink()
    print(f"{lines:,} lines in {args.files} files in {args.out}")


if __name__ == "__main__":
    main()
