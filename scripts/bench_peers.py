"""funkflow against its peers on one data set, one split, the same k, epochs and threads, in one run.

funkflow runs where its defaults put it (in-process below 25M ratings, else one LocalCluster worker).
Peers, each where installed (``pip install 'funkflow[bench]'``; Spark also needs Java):
LIBMF (PyPI ``libmf``) twice, as the wheel ships it and built from its sdist with LIBMF's own Makefile flags
(``-march=native -DUSEAVX``, needs g++; the faster is the reference), Surprise's SVD (``scikit-surprise``)
and Spark ALS (``pyspark``, ``local[threads]``). A peer that is not installed is reported as
such. Each runs in its own process, whose process tree is sampled for its peak
RSS. The table gives the epoch time, training ratings per second, test RMSE on
the same test ratings, the training time if the final model is within 2% of
the floor (the synthetic data's best possible RMSE), the peak RSS, each
peer's epoch time over funkflow's measured in the same run, and each peer's
whole training time over the time funkflow took to reach the peer's final RMSE
(on its validation ratings). A peer whose measured memory per rating would not
fit in this machine (Surprise at scale 1) is reported, not run.

    python scripts/bench_peers.py [--scale 0.1] [--k 32] [--epochs 10] [--threads 2] [--out peers.md]
                                  [--funkflow-scheduler local]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from _bench_data import dataset_at
from _libmf import split_arrays, time_funkflow, time_libmf
from peak_rss import _tree_rss

PEERS = {"funkflow": "funkflow", "LIBMF": "libmf", "LIBMF AVX": "libmf", "Surprise": "surprise",
         "Spark ALS": "pyspark"}
PIP_NAMES = {"LIBMF": "libmf", "LIBMF AVX": "libmf", "Surprise": "scikit-surprise", "Spark ALS": "pyspark"}
# LIBMF's own Makefile flags (CXXFLAGS and DFLAG=-DUSEAVX): the PyPI wheel is built without them, and is
# slower; the faster of the two builds is funkflow's reference.
LIBMF_AVX_FLAGS = ["-Wall", "-O3", "-pthread", "-std=c++0x", "-march=native", "-DUSEAVX", "-fPIC", "-shared"]


def build_libmf_avx(cache: Path) -> Path:
    """LIBMF's C++ sources from the binding's sdist, compiled with LIBMF's own flags, once per cache."""
    import glob
    import tarfile

    target = cache / "libmf-avx" / "libmf-avx.so"
    if target.is_file():
        return target
    work = target.parent
    work.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-binary", ":all:", "--no-deps",
                    "--dest", str(work), "libmf"], check=True)
    with tarfile.open(max(glob.glob(str(work / "libmf-*.tar.gz")))) as sdist:
        sdist.extractall(work, filter="data")
    sources = sorted(glob.glob(str(work / "libmf-*" / "src_cpp" / "*.cpp")))
    subprocess.run(["g++", *LIBMF_AVX_FLAGS, *sources, "-o", str(target)], check=True, capture_output=True)
    return target
# Surprise holds every rating as Python objects: 3.59 GiB of peak RSS for 8.5M training ratings
# (scale 0.1), ~450 bytes each. At scale 1 that is ~38 GB; a peer that cannot fit is reported, not run.
BYTES_PER_TRAIN_RATING = {"Surprise": 450}


def _arrays(cache: Path, scale: float, shape: tuple[int, int, int] | None) -> tuple[np.ndarray, np.ndarray]:
    name = f"{scale:g}" if shape is None else "x".join(map(str, shape))
    train_file, test_file = cache / f"peers-{name}-train.npy", cache / f"peers-{name}-test.npy"
    if not train_file.exists():
        train, test = split_arrays(dataset_at(scale, cache, shape=shape))
        np.save(train_file, train, allow_pickle=False)
        np.save(test_file, test, allow_pickle=False)
    return np.load(train_file, allow_pickle=False), np.load(test_file, allow_pickle=False)


def _rmse(predicted: np.ndarray, actual: np.ndarray) -> float:
    return float(np.sqrt(np.mean((np.clip(predicted, 1, 5) - actual) ** 2)))


def time_surprise(train: np.ndarray, test: np.ndarray, k: int, epochs: int) -> dict:
    import pandas as pd
    from surprise import SVD, Dataset, Reader

    frame = pd.DataFrame({"user": train[:, 0].astype(np.int64), "item": train[:, 1].astype(np.int64),
                          "rating": train[:, 2]})
    trainset = Dataset.load_from_df(frame, Reader(rating_scale=(1, 5))).build_full_trainset()
    algo = SVD(n_factors=k, n_epochs=epochs, lr_all=0.005, reg_all=0.05, random_state=0)
    began = time.perf_counter()
    algo.fit(trainset)
    seconds = time.perf_counter() - began
    users = {raw: inner for raw, inner in trainset._raw2inner_id_users.items()}
    items = {raw: inner for raw, inner in trainset._raw2inner_id_items.items()}
    u = np.array([users.get(int(x), -1) for x in test[:, 0]])
    i = np.array([items.get(int(x), -1) for x in test[:, 1]])
    predicted = np.full(test.shape[0], trainset.global_mean)
    predicted[u >= 0] += algo.bu[u[u >= 0]]
    predicted[i >= 0] += algo.bi[i[i >= 0]]
    both = (u >= 0) & (i >= 0)
    predicted[both] += np.einsum("nk,nk->n", algo.pu[u[both]], algo.qi[i[both]])
    return {"epoch_seconds": seconds / epochs, "test_rmse": _rmse(predicted, test[:, 2])}


def time_spark(train: np.ndarray, test: np.ndarray, k: int, epochs: int, threads: int, cache: Path) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq
    from pyspark.ml.recommendation import ALS
    from pyspark.sql import SparkSession

    for name, rows in (("train", train), ("test", test)):
        pq.write_table(pa.table({"user": rows[:, 0].astype(np.int32), "item": rows[:, 1].astype(np.int32),
                                 "rating": rows[:, 2]}), cache / f"spark-{name}.parquet")
    spark = (SparkSession.builder.master(f"local[{threads}]").config("spark.driver.memory", "16g")
             .config("spark.ui.enabled", "false").getOrCreate())
    spark.sparkContext.setLogLevel("ERROR")
    spark.sparkContext.setCheckpointDir(str(cache / "spark-checkpoints"))
    train_df = spark.read.parquet(str(cache / "spark-train.parquet")).cache()
    train_df.count()
    als = ALS(rank=k, maxIter=epochs, regParam=0.05, userCol="user", itemCol="item", ratingCol="rating",
              coldStartStrategy="nan", seed=0)
    began = time.perf_counter()
    model = als.fit(train_df)
    model.userFactors.count()
    seconds = time.perf_counter() - began
    scored = model.transform(spark.read.parquet(str(cache / "spark-test.parquet"))).toPandas()
    spark.stop()
    predicted = scored["prediction"].fillna(float(train[:, 2].mean())).to_numpy()
    return {"epoch_seconds": seconds / epochs, "test_rmse": _rmse(predicted, scored["rating"].to_numpy())}


def run_one(peer: str, args: argparse.Namespace) -> dict:
    if peer == "funkflow":
        result = time_funkflow(dataset_at(args.scale, args.cache, shape=args.shape), args.cache, args.k, args.epochs,
                               args.threads, scheduler=args.funkflow_scheduler)
        return {k: result[k] for k in ("epoch_seconds", "test_rmse", "floor_rmse", "curve")}
    train, test = _arrays(args.cache, args.scale, args.shape)
    if peer in ("LIBMF", "LIBMF AVX"):  # the build is chosen by LIBMF_OBJ, set by the parent
        return time_libmf(train, test, args.k, args.epochs, args.threads)
    if peer == "Surprise":
        return time_surprise(train, test, args.k, args.epochs)  # Surprise is single-threaded
    return time_spark(train, test, args.k, args.epochs, args.threads, args.cache)


def _to_same_rmse(peer: dict, ours: dict, epochs: int) -> str:
    """The peer's training time over funkflow's until its validation RMSE first reached the peer's test RMSE
    (validation and test are hash splits drawn alike)."""
    reached = [seconds for seconds, val in ours.get("curve", []) if val is not None and val <= peer["test_rmse"]]
    if not reached:
        return "not reached"
    return f"{peer['epoch_seconds'] * epochs / reached[0]:.2f}"


def _measured(peer: str, args: argparse.Namespace) -> dict:
    """Run one peer in a child process; its JSON result plus the peak RSS of its process tree."""
    shape = [] if args.shape is None else ["--shape", *map(str, args.shape)]
    command = [sys.executable, __file__, "--run", peer, "--scale", str(args.scale), *shape, "--k", str(args.k),
               "--epochs", str(args.epochs), "--threads", str(args.threads), "--cache", str(args.cache),
               *(["--funkflow-scheduler", args.funkflow_scheduler] if args.funkflow_scheduler else [])]
    log_file = args.cache / f"peers-{peer.replace(' ', '_')}.log"
    env = dict(os.environ)
    if peer == "LIBMF AVX":
        try:
            env["LIBMF_OBJ"] = str(build_libmf_avx(args.cache))
        except (subprocess.CalledProcessError, OSError) as exc:
            return {"error": f"not built ({exc})"}
    else:
        env.pop("LIBMF_OBJ", None)
    with open(log_file, "w") as log:
        child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, text=True, env=env)
        peak = 0
        while child.poll() is None:
            peak = max(peak, sum(_tree_rss(child.pid)))
            time.sleep(0.2)
        out = child.stdout.read()
    if child.returncode != 0:
        return {"error": f"failed (exit {child.returncode}; see {log_file})"}
    return {**json.loads(out.strip().splitlines()[-1]), "peak_rss": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=float, default=0.1)
    parser.add_argument("--shape", type=int, nargs=3, metavar=("USERS", "ITEMS", "RATINGS"),
                        help="instead of --scale's Netflix shape: e.g. 480189 17770 10000000 (sparse), "
                             "2000000 500000 20000000 (a shop)")
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--funkflow-scheduler", choices=["local"],
                        help="funkflow's cluster.scheduler (default: as funkflow chooses, in-process below 25M "
                             "ratings; local: one LocalCluster worker at any size)")
    parser.add_argument("--peers", nargs="+", default=list(PEERS), choices=list(PEERS))
    parser.add_argument("--out", type=Path, help="also write the Markdown table here")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/funkflow-bench"))
    parser.add_argument("--run", choices=list(PEERS), help=argparse.SUPPRESS)  # the child's side
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    args.cache.mkdir(parents=True, exist_ok=True)
    if args.run:
        print(json.dumps(run_one(args.run, args)))
        return

    dataset = dataset_at(args.scale, args.cache, shape=args.shape)
    n_train = _arrays(args.cache, args.scale, args.shape)[0].shape[0]
    results = {}
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for peer in args.peers:
        installed = importlib.util.find_spec(PEERS[peer]) is not None
        needs = BYTES_PER_TRAIN_RATING.get(peer, 0) * n_train
        if peer == "Spark ALS" and installed and shutil.which("java") is None:
            results[peer] = {"error": "not runnable: no java on PATH"}
        elif installed and needs > 0.8 * memory:
            results[peer] = {"error": f"not run: needs about {needs / 1024**3:.0f} GiB "
                                      f"(measured per rating at scale 0.1), this machine has {memory / 1024**3:.0f}"}
        elif not installed:
            results[peer] = {"error": f"not installed (pip install {PIP_NAMES[peer]})"}
        else:
            results[peer] = _measured(peer, args)
    ours = results["funkflow"]
    floor = ours.get("floor_rmse")
    what = f"scale {args.scale:g}" if args.shape is None else f"{dataset.n_users:,} users × {dataset.n_items:,} items"
    lines = [f"{what} ({dataset.n_ratings:,} ratings, {n_train:,} for training), k={args.k}, "
             f"{args.epochs} epochs, {args.threads} threads; funkflow "
             f"{'on one LocalCluster worker' if args.funkflow_scheduler else 'where its defaults run it'}; one run",
             "", "| | epoch s | train ratings/s | test RMSE | within 2% of floor | peak RSS | epoch time / funkflow's "
             "| time to its RMSE / funkflow's |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for peer, r in results.items():
        if "error" in r:
            lines.append(f"| {peer} | {r['error']} | | | | | | |")
            continue
        reached = (f"{r['epoch_seconds'] * args.epochs:.1f} s" if floor and r["test_rmse"] <= 1.02 * floor
                   else f"not after {args.epochs} epochs")
        ratio = f"{r['epoch_seconds'] / ours['epoch_seconds']:.2f}" if "epoch_seconds" in ours else "-"
        lines.append(f"| {peer} | {r['epoch_seconds']:.3f} | {n_train / r['epoch_seconds']:,.0f} | "
                     f"{r['test_rmse']:.4f} | {reached} | {r['peak_rss'] / 1024**3:.2f} GiB | {ratio} | "
                     f"{'1.00' if peer == 'funkflow' else _to_same_rmse(r, ours, args.epochs)} |")
    builds = [r for peer, r in results.items() if peer.startswith("LIBMF") and "epoch_seconds" in r]
    if builds and "epoch_seconds" in ours:
        reference = min(builds, key=lambda r: r["epoch_seconds"])
        lines.append(f"\nfunkflow's epoch over LIBMF's faster build's: "
                     f"{ours['epoch_seconds'] / reference['epoch_seconds']:.2f} (goal: 0.4 or less)")
    if floor:
        lines.append(f"\nfloor (RMSE of the true expected rating on the test ratings): {floor:.4f}")
    table = "\n".join(lines)
    print(table)
    if args.out:
        args.out.write_text(table + "\n")


if __name__ == "__main__":
    main()
