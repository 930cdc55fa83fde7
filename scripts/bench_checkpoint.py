"""What a checkpoint after every epoch costs: epoch time with and without, in one run.

Workers write their factor blocks at the end of their share of the epoch (so the
write is inside the epoch's time) and the driver commits the state and manifest
after it; this trains the same epochs twice on one LocalCluster, with
``train.checkpoint_every`` 1 and 0, and compares the median epoch, taking the
commit time from the driver's debug log ("checkpoint of epoch N committed in S s").

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

from funkflow.pipeline.app.stages import run_pipeline
from funkflow.pipeline.core.cluster import open_executor
from funkflow.pipeline.core.config import load_config

_COMMITTED = re.compile(r"checkpoint of epoch (\d+) committed in ([0-9.]+)s")


class _CommitTimes(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.seconds: dict[int, float] = {}

    def emit(self, record: logging.LogRecord) -> None:
        match = _COMMITTED.search(record.getMessage())
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
    commits = _CommitTimes()
    train_log = logging.getLogger("funkflow.pipeline.training.train")
    train_log.setLevel(logging.DEBUG)
    train_log.addHandler(commits)

    dataset = dataset_at(args.scale, args.cache)
    epochs: dict[int, list[dict]] = {}
    config = load_config(None, [f"data.source={dataset.root}", "data.generate=null"])
    with open_executor(config.cluster) as executor:
        for every in (1, 0):
            run_dir = args.cache / f"checkpoint-{dataset.root.name}-k{args.k}-d{args.d}-every{every}"
            shutil.rmtree(run_dir, ignore_errors=True)
            overrides = [f"data.source={dataset.root}", "data.generate=null", f"model.k={args.k}",
                         f"train.d={args.d}", f"train.epochs={args.epochs}", f"train.checkpoint_every={every}",
                         f"output.run_dir={run_dir}"]
            if args.checkpoints:
                overrides.append(f"output.checkpoints={args.checkpoints}")
            run_pipeline(load_config(None, overrides), last="train", executor=executor)
            epochs[every] = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]

    print(f"scale {args.scale:g} ({dataset.n_ratings:,} ratings), k={args.k}, d={args.d}")
    print("| epoch | with checkpoint s | without s | commit s |")
    print("| ---: | ---: | ---: | ---: |")
    for with_row, without_row in zip(epochs[1], epochs[0]):
        epoch = with_row["epoch"]
        print(f"| {epoch} | {with_row['seconds']:.3f} | {without_row['seconds']:.3f} | "
              f"{commits.seconds[epoch]:.3f} |")
    later = slice(1, None) if args.epochs > 1 else slice(None)
    with_median = statistics.median(r["seconds"] + commits.seconds[r["epoch"]] for r in epochs[1][later])
    without_median = statistics.median(r["seconds"] for r in epochs[0][later])
    print(f"median epoch with its checkpoint / without: {with_median / without_median:.2f}")


if __name__ == "__main__":
    main()
