"""The nightly retrain (``funkflow nightly``): ingest the day's export into a run directory named by the date,
train warm from the newest earlier run that finished, and point ``RUNS/latest`` at it.

Safe to re-run: every stage is skipped when up to date, a crashed run takes up its own checkpoint, and a
second copy started while one runs exits 75 (the run directory is locked).
"""

from __future__ import annotations

import datetime
import logging
import os
import uuid
from pathlib import Path
from typing import Any

from funkflow.pipeline.app.stages import run_pipeline
from funkflow.pipeline.core.config import Config
from funkflow.pipeline.core.errors import OutputError

log = logging.getLogger(__name__)

LATEST = "latest"


def previous_run(runs: Path, today: str) -> Path | None:
    """The newest run directory under ``runs`` before ``today`` whose model exists: run directories are named
    by date, so the last in name order."""
    finished = [run for run in sorted(runs.iterdir()) if run.is_dir() and not run.is_symlink()
                and run.name < today and (run / "model" / "model.json").is_file()]
    return finished[-1] if finished else None


def nightly(config: Config, export: str, data_format: str, runs: Path, warm_epochs: int,
            today: str | None = None) -> dict[str, Any] | None:
    """Train ``config`` on ``export`` in ``runs/DATE`` (warm from the previous run, for ``warm_epochs``), then
    move ``runs/latest`` to it; returns the run's summary."""
    today = today or datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d")
    runs.mkdir(parents=True, exist_ok=True)
    _refuse_foreign_latest(runs / LATEST)  # before the night's work, not after it
    values: dict[str, Any] = {"output.run_dir": str(runs / today), "data.source": export, "data.format": data_format,
                              "data.generate": None}
    previous = previous_run(runs, today)
    if previous is not None:
        log.info("nightly: warm from %s for %d epochs", previous, warm_epochs)
        values |= {"train.init_from": str(previous), "train.epochs": warm_epochs}
    summary = run_pipeline(config.with_values(values))
    point_latest_at(runs, today)
    return summary


def point_latest_at(runs: Path, today: str) -> None:
    """Switch the symlink ``runs/latest`` to ``today`` at once (a new link renamed over the old one); a
    ``latest`` that is not a symlink is someone else's and is never replaced."""
    latest = runs / LATEST
    _refuse_foreign_latest(latest)
    staged = runs / f".{LATEST}.tmp-{uuid.uuid4().hex[:12]}"
    os.symlink(today, staged)
    os.replace(staged, latest)


def _refuse_foreign_latest(latest: Path) -> None:
    if latest.exists() and not latest.is_symlink():
        raise OutputError(f"{latest}: exists and is not the symlink funkflow keeps there; move it away")
