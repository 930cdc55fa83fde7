"""What `funkflow tune` buys: test RMSE and wall time against the shipped config and a grid without early stopping.

On generated data of several shapes, in one run: MovieLens 100k (943 users × 1,682 items, whole stars, dense
users); ml-latest-small (610 × 9,724, half stars from 0.5, long-tailed items); sparse users (20,000 × 3,000,
about 10 ratings a user, whole stars); optionally Netflix-shaped and sparse (480,189 × 17,770 × 10M):

- the shipped config (``configs/movielens.yaml``'s model and training values) trained as is;
- ``funkflow tune`` with each of ``--trials`` from that config (its trial 0), by successive halving with early
  stopping, the winner refit on train and validation;
- a grid of the same size: every trial of the tune's draw trained for the full ``tune.max_epochs`` without
  early stopping, the best by its last validation RMSE kept (its test RMSE as trained, no refit).

Every row of a shape reads the same test ratings; validation is the kept epoch's validation RMSE (for tune,
its winning trial's, before the validation ratings join training). The script exits 1 if tune's final model
is worse on test than the shipped config on any shape. Wall times include the trials' set-up; the machine is
shared, so read them as ratios within one run.

    python scripts/bench_tune.py [--trials 30 100] [--shapes ml-100k ml-latest-small] [--surprise] [--out tune.md]
        [--set train.early_stopping_patience=8]
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from pathlib import Path

import numpy as np

from funkflow.pipeline.app.stages import run_pipeline
from funkflow.pipeline.app.tune import draw_trials, tune
from funkflow.pipeline.core.config import TUNABLE, Config, load_config

SHAPES = {  # users, items, ratings, largest share of the items one user rates, rating step
    "ml-100k": (943, 1682, 100_000, 0.44, 1.0),
    "ml-latest-small": (610, 9724, 100_000, 0.28, 0.5),
    "sparse-users": (20_000, 3000, 200_000, 0.1, 1.0),
    "netflix-sparse-10M": (480_189, 17_770, 10_000_000, 0.6, 1.0),
}
SHIPPED = ("model.k", "model.reg", "model.bias_reg", "train.lr", "train.epochs", "train.early_stopping_patience")


def _base(shape: str, root: Path) -> Config:
    users, items, ratings, max_fraction, step = SHAPES[shape]
    return load_config(None, [f"data.generate.n_users={users}", f"data.generate.n_items={items}",
                              f"data.generate.n_ratings={ratings}", f"data.generate.max_user_fraction={max_fraction}",
                              f"data.generate.rating_step={step}",
                              "data.generate.activity_sigma=1.1", "data.generate.popularity_sigma=1.6",
                              f"output.run_dir={root / 'base'}"])


def _kept_val(run_dir: Path) -> float:
    """The best validation RMSE of a run's epochs: the epoch early stopping kept."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return min(row["val_rmse"] for row in rows)


def _summary(config: Config) -> tuple[float, float, float]:
    began = time.perf_counter()
    summary = run_pipeline(config, retrain=True)
    return _kept_val(Path(config.output.run_dir)), summary["test_rmse"], time.perf_counter() - began


def _grid(config: Config, root: Path, dataset: str) -> tuple[float, float, float, int]:
    """Every trial of the tune's draw for max_epochs without early stopping; the test RMSE of the best."""
    began = time.perf_counter()
    best = None
    for trial in draw_trials(config):
        run_dir = root / f"grid-{trial.index:03d}"
        trial_config = config.with_values({
            **{TUNABLE[k]: v for k, v in trial.params.items()}, "train.epochs": config.tune.max_epochs,
            "train.early_stopping_patience": 0, "train.checkpoint_every": 0, "data.source": dataset,
            "data.format": "canonical", "data.generate": None, "output.run_dir": str(run_dir)})
        summary = run_pipeline(trial_config, retrain=True)
        last_val = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])["val_rmse"]
        if best is None or last_val < best[0]:
            best = (last_val, summary["test_rmse"], trial.index)
        shutil.rmtree(run_dir / "blocks", ignore_errors=True)
    return best[0], best[1], time.perf_counter() - began, best[2]


SURPRISE_GRID = {"n_factors": [8, 32, 100], "reg_all": [0.02, 0.05, 0.1], "lr_all": [0.005, 0.01, 0.02]}


def _surprise_grid(dataset_dir: str) -> tuple[float, float, float, dict]:
    """Surprise's GridSearchCV over SURPRISE_GRID (27 fits, 20 epochs each, 2 jobs), holding out 5% of the
    training and validation ratings, refit on them; its test RMSE on the tune's test ratings. Returns
    (seconds, best validation RMSE, test RMSE, best parameters)."""
    import pandas as pd
    import pyarrow.parquet as pq
    from surprise import SVD, Dataset, Reader
    from surprise.model_selection import GridSearchCV, ShuffleSplit

    from funkflow.pipeline.core.config import SplitConfig
    from funkflow.pipeline.data.dataset import open_dataset
    from funkflow.tasks.blocks import TEST, split_codes

    split, frames = SplitConfig(), []
    for part in open_dataset(dataset_dir).parts:
        table = pq.read_table(part, columns=["user", "item", "rating"]).to_pandas()
        table["test"] = split_codes(table["user"].to_numpy(), table["item"].to_numpy(), split.test_fraction,
                                    split.validation_fraction, split.seed) == TEST
        frames.append(table)
    ratings = pd.concat(frames)
    train, test = ratings[~ratings["test"]], ratings[ratings["test"]]
    data = Dataset.load_from_df(train[["user", "item", "rating"]], Reader(rating_scale=(1, 5)))
    began = time.perf_counter()
    search = GridSearchCV(SVD, {**SURPRISE_GRID, "n_epochs": [20], "random_state": [0]}, measures=["rmse"],
                          cv=ShuffleSplit(n_splits=1, test_size=0.05, random_state=0), refit=True, n_jobs=2)
    search.fit(data)
    seconds = time.perf_counter() - began
    predicted = np.array([search.predict(u, i).est for u, i in zip(test["user"], test["item"])])
    test_rmse = float(np.sqrt(np.mean((predicted - test["rating"].to_numpy()) ** 2)))
    return seconds, float(search.best_score["rmse"]), test_rmse, search.best_params["rmse"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["ml-100k", "ml-latest-small", "sparse-users"],
                        choices=list(SHAPES))
    parser.add_argument("--trials", type=int, nargs="+", default=[30, 100])
    parser.add_argument("--grid", action=argparse.BooleanOptionalAction, default=True,
                        help="also train the grid of each trial count without early stopping")
    parser.add_argument("--max-epochs", type=int, default=60)
    parser.add_argument("--cache", type=Path, default=Path("/tmp/funkflow-bench-tune"))
    parser.add_argument("--surprise", action="store_true",
                        help="also Surprise's GridSearchCV over a grid of 27 (pip install scikit-surprise)")
    parser.add_argument("--out", type=Path, help="also write the Markdown table here")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="change a value of the shipped config for every run (repeatable)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    shipped = load_config("movielens", args.overrides)
    rows = ["| shape | what | validation RMSE | test RMSE | seconds | note |",
            "| --- | --- | ---: | ---: | ---: | --- |"]
    worse = []
    for shape in args.shapes:
        root = args.cache / shape
        shutil.rmtree(root, ignore_errors=True)
        values = {key: shipped.value(key) for key in SHIPPED}
        base = _base(shape, root).with_values(values)  # the tune's trial 0 is the shipped config
        val, shipped_rmse, seconds = _summary(base)
        rows.append(f"| {shape} | shipped movielens.yaml | {val:.4f} | {shipped_rmse:.4f} | {seconds:.1f} | "
                    + ", ".join(f"{k.split('.')[1]} {v}" for k, v in values.items()) + " |")
        dataset = str((root / "base" / "data").resolve())
        if args.surprise:
            seconds, val, rmse, best = _surprise_grid(dataset)
            rows.append(f"| {shape} | Surprise GridSearchCV, 27 | {val:.4f} | {rmse:.4f} | {seconds:.1f} | "
                        + ", ".join(f"{k} {v:g}" for k, v in best.items() if k != "random_state") + " |")
        for trials in args.trials:
            config = base.with_values({"tune.trials": trials, "tune.max_epochs": args.max_epochs,
                                        "output.run_dir": str(root / f"tune-{trials}")})
            began = time.perf_counter()
            result = tune(config)
            seconds = time.perf_counter() - began
            best = result.best
            tuned_rmse = result.summary["test_rmse"]
            if tuned_rmse > shipped_rmse:
                worse.append(f"{shape}, {trials} trials: {tuned_rmse:.4f} against {shipped_rmse:.4f}")
            rows.append(f"| {shape} | tune, {trials} trials | {best.best_val:.4f} | {tuned_rmse:.4f} | {seconds:.1f} | "
                        f"trial {best.trial}: " + ", ".join(f"{k} {v:g}" for k, v in best.params.items())
                        + f", {best.best_epoch} epochs; {len(result.results)} rung trainings |")
            if args.grid:
                grid_config = config.with_values({"data.source": dataset, "data.format": "canonical",
                                                   "data.generate": None})
                val, rmse, seconds, index = _grid(grid_config, root, dataset)
                rows.append(f"| {shape} | grid of the same {trials}, {args.max_epochs} epochs each | {val:.4f} | "
                            f"{rmse:.4f} | {seconds:.1f} | trial {index} |")
        print("\n".join(rows[-1 - len(args.trials) * (1 + args.grid) - args.surprise:]), flush=True)
    table = "\n".join(rows)
    print(table)
    if args.out:
        args.out.write_text(table + "\n")
    if worse:
        raise SystemExit("tune's final model is worse on test than the shipped config: " + "; ".join(worse))
    print("tune's final model is no worse on test than the shipped config on every shape")


if __name__ == "__main__":
    main()
