"""Write a canonical dataset's ratings as two shuffled Parquet files, a random 90% for training and the rest
for test: the input of the whole Netflix-scale run in docs/benchmarks.md (``split.method: given``).

Raw ids are the dataset's indices plus one (as an export would number them), rows in a seeded random order,
float32 ratings. Reads the whole dataset into memory (about 2.4 GB for 100M ratings). Refuses to replace
``train.parquet`` or ``test.parquet`` already in OUT_DIR.

    python scripts/write_split_parquet.py DATASET OUT_DIR [--test-fraction 0.1] [--seed 0]
    funkflow run netflix-like --set data.source=OUT_DIR/train.parquet --set data.format=parquet \\
        --set split.method=given --set split.test_source=OUT_DIR/test.parquet
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from funkflow.pipeline.data.dataset import open_dataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--test-fraction", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    outputs = {name: args.out / f"{name}.parquet" for name in ("train", "test")}
    if any(path.exists() for path in outputs.values()):
        raise SystemExit(f"{args.out}: already holds {' or '.join(p.name for p in outputs.values() if p.exists())};"
                         " choose another directory or remove them")

    dataset = open_dataset(args.dataset)
    table = pa.concat_tables([pq.read_table(part, columns=["user", "item", "rating"]) for part in dataset.parts])
    users = table["user"].to_numpy().astype(np.int64) + 1
    items = table["item"].to_numpy().astype(np.int64) + 1
    ratings = table["rating"].to_numpy()
    rng = np.random.default_rng(args.seed)
    order = rng.permutation(users.shape[0])
    users, items, ratings = users[order], items[order], ratings[order]
    test = rng.random(users.shape[0]) < args.test_fraction
    args.out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train", ~test), ("test", test)):
        pq.write_table(pa.table({"user": users[rows], "item": items[rows], "rating": ratings[rows]}),
                       outputs[name], row_group_size=1_000_000)
        print(f"{outputs[name]}: {int(rows.sum()):,} ratings")


if __name__ == "__main__":
    main()
