"""Choose configs/movielens.yaml's settings on generated data of MovieLens shapes.

Trains a small grid (k, reg, lr) in-process on synthetic data shaped like
MovieLens 100k (943 users × 1,682 items × 100k ratings) and ml-latest-small
(610 × 9,724 × 100k), each with early stopping on the validation RMSE, and
prints the test RMSE of each setting beside the biases-only baseline; the
setting with the best mean rank over both shapes is marked. Whole stars 1..5
(the generator rounds to whole stars).

    python scripts/tune_movielens.py [--out /tmp/funkflow-tune]
"""

from __future__ import annotations

import argparse
import itertools
import logging
import shutil
from pathlib import Path

from funkflow.pipeline.config import load_config
from funkflow.pipeline.stages import run_pipeline

SHAPES = {"ml-100k": (943, 1682, 100_000, 0.44), "ml-latest-small": (610, 9724, 100_000, 0.28)}
GRID = {"model.k": [10, 20, 50], "model.reg": [0.02, 0.05, 0.1], "train.lr": [0.01, 0.02]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("/tmp/funkflow-tune"))
    parser.add_argument("--epochs", type=int, default=60)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    settings = [dict(zip(GRID, values)) for values in itertools.product(*GRID.values())]
    results: dict[str, list[tuple[float, float, int]]] = {}
    floors: dict[str, float] = {}
    for shape, (users, items, ratings, max_fraction) in SHAPES.items():
        data = [f"data.generate.n_users={users}", f"data.generate.n_items={items}",
                f"data.generate.n_ratings={ratings}", f"data.generate.max_user_fraction={max_fraction}",
                "data.generate.activity_sigma=0.9", "data.generate.popularity_sigma=1.3"]
        results[shape] = []
        for setting in settings:
            run_dir = args.out / shape
            shutil.rmtree(run_dir / "model", ignore_errors=True)
            shutil.rmtree(run_dir / "stages" / "train.json", ignore_errors=True)
            config = load_config(None, [*data, *(f"{k}={v}" for k, v in setting.items()), "train.d=2",
                                        f"train.epochs={args.epochs}", "train.early_stopping_patience=3",
                                        "cluster.scheduler=inprocess", f"output.run_dir={run_dir}"])
            summary = run_pipeline(config)
            results[shape].append((summary["test_rmse"], summary["baselines"]["biases"]["rmse"], summary["epochs"]))
            floors[shape] = summary["floor_rmse"]
    ranks = [0.0] * len(settings)
    for rows in results.values():
        for rank, j in enumerate(sorted(range(len(settings)), key=lambda j: rows[j][0])):
            ranks[j] += rank / len(results)
    best = min(range(len(settings)), key=ranks.__getitem__)
    shapes = list(SHAPES)
    print("| k | reg | lr | " + " | ".join(f"{s} test RMSE (biases) | epochs" for s in shapes) + " | mean rank |")
    print("| ---: | ---: | ---: | " + " | ".join("---: | ---:" for _ in shapes) + " | ---: |")
    for j, setting in enumerate(settings):
        cells = " | ".join(f"{results[s][j][0]:.4f} ({results[s][j][1]:.4f}) | {results[s][j][2]}" for s in shapes)
        mark = " **best**" if j == best else ""
        print(f"| {setting['model.k']} | {setting['model.reg']} | {setting['train.lr']} | {cells} | "
              f"{ranks[j]:.1f}{mark} |")
    print("floor (the true model's RMSE): " + ", ".join(f"{s} {floors[s]:.4f}" for s in shapes))


if __name__ == "__main__":
    main()
