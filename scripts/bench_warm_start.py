"""How many epochs a warm start needs to match a cold start on the next day's data.

Day 1 and day 2 (day 1 + 5% new ratings, some from new users and items) come
from ``tasks.synthetic.write_daily_csvs``. Trains day 1, then day 2 cold for
``--epochs`` epochs, then day 2 cold and warm (``train.init_from`` day 1) for
1..``--upto`` epochs, and prints the test RMSE of each, in-process.

    python scripts/bench_warm_start.py [--epochs 20] [--upto 5]
"""

from __future__ import annotations

import argparse
import logging
import shutil
from pathlib import Path

from funkflow.pipeline.app.stages import run_pipeline
from funkflow.pipeline.core.config import load_config
from funkflow.tasks.synthetic import write_daily_csvs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--upto", type=int, default=5)
    parser.add_argument("--cache", type=Path, default=Path("/tmp/funkflow-warm"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    shutil.rmtree(args.cache, ignore_errors=True)
    args.cache.mkdir(parents=True)
    day1, day2 = write_daily_csvs(args.cache)
    common = ["data.format=movielens", "data.generate=null", "model.k=8", "train.d=3", "cluster.scheduler=inprocess"]

    def run(source: Path, epochs: int, name: str, *extra: str) -> float:
        config = load_config(None, [f"data.source={source}", *common, f"train.epochs={epochs}", *extra,
                                    f"output.run_dir={args.cache / name}"])
        return run_pipeline(config)["test_rmse"]

    run(day1, args.epochs, "day1")
    cold = run(day2, args.epochs, "cold")
    print(f"day 2, cold start, {args.epochs} epochs: test RMSE {cold:.4f}")
    print("| epochs | cold start | warm start | warm / cold-after-all-epochs |")
    print("| ---: | ---: | ---: | ---: |")
    for epochs in range(1, args.upto + 1):
        cold_n = run(day2, epochs, f"cold-{epochs}")
        warm_n = run(day2, epochs, f"warm-{epochs}", f"train.init_from={args.cache / 'day1'}")
        print(f"| {epochs} | {cold_n:.4f} | {warm_n:.4f} | {warm_n / cold:.4f} |")


if __name__ == "__main__":
    main()
