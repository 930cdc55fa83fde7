"""Shared fixtures: tiny rating problems and one real LocalCluster per session."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import settings

from funkflow.pipeline.core.config import load_config

# Properties are checked for what they compute, not how fast: on a loaded 2-core machine a pure example
# once took longer than hypothesis's 200 ms deadline, and the suite failed for it.
settings.register_profile("suite", deadline=None)
settings.load_profile("suite")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test that uses the session's LocalCluster is a cluster test, so ``-m "not cluster"`` leaves it out
    without each test saying so."""
    for item in items:
        if "local_cluster" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.cluster)


def write_canonical(root: Path, users: np.ndarray, items: np.ndarray, ratings: np.ndarray,
                    n_users: int | None = None, n_items: int | None = None, parts: int = 2) -> Path:
    """Write arrays as a canonical dataset (Parquet parts, id maps, dataset.json) at ``root``."""
    n_users = int(users.max()) + 1 if n_users is None else n_users
    n_items = int(items.max()) + 1 if n_items is None else n_items
    (root / "ratings").mkdir(parents=True)
    meta_parts = []
    for j, take in enumerate(np.array_split(np.arange(users.shape[0]), parts)):
        name = f"ratings/part-{j:05d}.parquet"
        pq.write_table(pa.table({"user": users[take].astype(np.int32), "item": items[take].astype(np.int32),
                                 "rating": ratings[take].astype(np.float32)}), root / name)
        meta_parts.append({"path": name, "n_ratings": int(take.shape[0]), "sha256": f"part{j}"})
    for name, n in (("users", n_users), ("items", n_items)):
        pq.write_table(pa.table({"index": np.arange(n, dtype=np.int32), "id": np.arange(n, dtype=np.int64)}),
                       root / f"{name}.parquet")
    meta = {"n_users": n_users, "n_items": n_items, "n_ratings": int(users.shape[0]), "parts": meta_parts,
            "fingerprint": f"test-{users.shape[0]}-{float(ratings.sum())}", "rating_scale": [1, 5]}
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


@pytest.fixture
def planted_low_rank(tmp_path: Path) -> Path:
    """A rank-3 matrix of 120 users × 80 items without noise, 60% observed, as a canonical dataset.

    A user with a single rating (user 0) is included: the edge case of a lonely row.
    """
    rng = np.random.default_rng(7)
    P = rng.normal(0, 0.6, (120, 3))
    Q = rng.normal(0, 0.6, (80, 3))
    mask = rng.random((120, 80)) < 0.6
    mask[0] = False
    mask[0, 5] = True
    users, items = np.nonzero(mask)
    ratings = 3.0 + np.einsum("nk,nk->n", P[users], Q[items])
    return write_canonical(tmp_path / "planted", users, items, ratings)


def _tiny_config(run_dir: Path, *overrides: str):
    return load_config(None, [
        "data.generate.n_users=300", "data.generate.n_items=120", "data.generate.n_ratings=12000",
        "data.generate.max_user_fraction=0.5", "data.generate.ratings_per_part=5000",
        "model.k=8", "train.epochs=4", "train.d=3", "cluster.scheduler=inprocess",
        f"output.run_dir={run_dir}", *overrides,
    ])


@pytest.fixture(scope="session")
def tiny_config():
    """A factory ``tiny_config(run_dir, *overrides)``: the default config shrunk to a few-second
    synthetic run (300 users × 120 items, 12k ratings, k=8, 4 epochs, d=3), in-process unless
    overridden."""
    return _tiny_config


@pytest.fixture(scope="session")
def local_cluster():
    """One real LocalCluster for the session: 2 worker processes of 1 thread each, set up as
    funkflow sets up its own."""
    import dask
    from distributed import LocalCluster

    from funkflow.pipeline.core.cluster import LOCAL_CLUSTER_CONFIG

    with dask.config.set(LOCAL_CLUSTER_CONFIG), LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address="127.0.0.1:0") as cluster:
        yield cluster


def cli_env() -> dict[str, str]:
    """The environment for a `funkflow` subprocess, without pytest's variables."""
    return {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}


def kill_when(command: list[str], cwd: Path, reached: Callable[[], bool], timeout: float = 240) -> None:
    """Start ``command``, SIGKILL it as soon as ``reached()`` (or when it ends, or at ``timeout``)."""
    victim = subprocess.Popen(command, cwd=cwd, env=cli_env(), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    while not reached() and victim.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=30)


def model_bytes(run_dir: Path) -> dict[str, bytes]:
    """The factor-block files of a run's model, name → bytes: two models are the same bits when these are."""
    return {p.name: p.read_bytes() for p in sorted((run_dir / "model").glob("*.npy"))}
