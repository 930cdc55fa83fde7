"""Checkpoint write time per epoch, as a fraction of the epoch's training time.

Trains a few epochs on a LocalCluster with a checkpoint after every epoch and
reads the write times from the driver's debug log ("checkpoint of epoch N
written in S s"): workers write their user blocks, the driver the item blocks,
state and manifest.

    python scripts/bench_checkpoint.py [--scale 0.1] [--k 32] [--epochs 4] [--d 4] [--checkpoints URL]
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import shutil
import statistics
from pathlib import Path

from _bench_data import dataset_at

from pipeline.config import load_config
from pipeline.stages import run_pipeline

_WRITTEN = re.compile(r"checkpoint of epoch (\d+) written in ([0-9.]+)s")


class _WriteTimes(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.seconds: dict[int, float] = {}

    def emit(self, record: logging.LogRecord) -> None:
        match = _WRITTEN.search(record.getMessage())
        if match:
            self.seconds[int(match[1])] = float(match[2])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=float, default=0.1)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--d", type=int, default=4)
    parser.add_argument("--checkpoints", help="checkpoint URL (default: the run directory)")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/funkflow-bench"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    times = _WriteTimes()
    train_log = logging.getLogger("pipeline.train")
    train_log.setLevel(logging.DEBUG)
    train_log.addHandler(times)

    dataset = dataset_at(args.scale, args.cache)
    run_dir = args.cache / f"checkpoint-{dataset.root.name}-k{args.k}-d{args.d}"
    shutil.rmtree(run_dir, ignore_errors=True)
    overrides = [f"data.source={dataset.root}", "data.generate=null", f"model.k={args.k}", f"train.d={args.d}",
                 f"train.epochs={args.epochs}", "train.checkpoint_every=1", f"output.run_dir={run_dir}"]
    if args.checkpoints:
        overrides.append(f"output.checkpoints={args.checkpoints}")
    run_pipeline(load_config(None, overrides), last="train")
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]

    print(f"scale {args.scale:g} ({dataset.n_ratings:,} ratings), k={args.k}, d={args.d}")
    print("| epoch | epoch seconds | checkpoint seconds | checkpoint / epoch |")
    print("| ---: | ---: | ---: | ---: |")
    for row in metrics:
        written = times.seconds[row["epoch"]]
        print(f"| {row['epoch']} | {row['seconds']:.3f} | {written:.3f} | {written / row['seconds']:.1%} |")
    later = metrics[1:] or metrics
    ratio = statistics.median(times.seconds[r["epoch"]] / r["seconds"] for r in later)
    print(f"median over epochs {later[0]['epoch']}..{later[-1]['epoch']}: checkpoint / epoch = {ratio:.1%}")


if __name__ == "__main__":
    main()
