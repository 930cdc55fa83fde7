"""Nightly retrain as a Prefect flow on an existing Dask cluster (``pip install prefect``).

Each funkflow stage is a Prefect task, so the Prefect UI shows where a night
failed; funkflow's stage records make every task idempotent, so a Prefect
retry of a failed night redoes only what did not finish (training takes up
its own checkpoint). Only exit-75 failures (cluster trouble) are retried.

    python scripts/prefect_flow.py CONFIG --scheduler-file /shared/scheduler.json --export /data/exports/ratings
"""

from __future__ import annotations

import argparse
from pathlib import Path

from prefect import flow, task

from funkflow.pipeline.app.stages import run_pipeline
from funkflow.pipeline.core.config import load_config
from funkflow.pipeline.core.errors import ClusterError


def _retry_cluster_trouble(task, task_run, state) -> bool:
    """Retry when the cluster was the trouble (exit 75); bad data or config will not fix itself."""
    try:
        state.result()
    except ClusterError:
        return True
    except Exception:
        return False
    return False


@task(retries=3, retry_delay_seconds=300, retry_condition_fn=_retry_cluster_trouble)
def stage(config_path: str, overrides: list[str], last: str) -> dict | None:
    """Run funkflow's chain up to ``last`` (earlier stages are skipped when up to date)."""
    return run_pipeline(load_config(config_path, overrides), last=last)


@flow(name="funkflow-nightly")
def nightly(config_path: str, export: str, data_format: str, scheduler_file: str, run_dir: str,
            init_from: str | None = None) -> dict | None:
    overrides = [f"data.source={export}", f"data.format={data_format}", "data.generate=null",
                 f"cluster.scheduler_file={scheduler_file}", f"output.run_dir={run_dir}"]
    if init_from:
        overrides += [f"train.init_from={init_from}", "train.epochs=3"]
    for last in ("block", "train"):
        stage(config_path, overrides, last)
    return stage(config_path, overrides, "evaluate")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("--export", required=True)
    parser.add_argument("--format", default="parquet")
    parser.add_argument("--scheduler-file", required=True)
    parser.add_argument("--run-dir", type=Path, required=True)
    parser.add_argument("--init-from")
    args = parser.parse_args()
    print(nightly(args.config, args.export, args.format, args.scheduler_file, str(args.run_dir), args.init_from))
