"""The chain of stages behind ``funkflow run``: generate or ingest → block → train → evaluate (or export).

Each stage records the fingerprint of its inputs when it completes; a stage
whose record matches is skipped, so a re-run after a crash starts at the first
stage that did not finish (training takes up its own checkpoint), and a re-run
after success does nothing and rewrites no file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import platform
import socket
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import fsspec

from funkflow.pipeline.core.cluster import IN_PROCESS, Executor, open_executor
from funkflow.pipeline.core.config import Config, GenerateConfig, differences, dump_config, load_config
from funkflow.pipeline.core.errors import (
    EXIT_OK,
    EXIT_SOFTWARE,
    ConfigError,
    FunkflowError,
    UsageError,
    outside_fault,
)
from funkflow.pipeline.core.logs import stage_context
from funkflow.pipeline.core.rundir import RunDir, claim, package_version
from funkflow.pipeline.data.blocking import Blocks, block_dataset, given_test_set, open_blocks
from funkflow.pipeline.data.dataset import Dataset, generate_dataset, open_dataset
from funkflow.pipeline.data.ingest import ingest
from funkflow.pipeline.data.sources import (
    estimated_ratings,
    expand_sources,
    ingest_options,
    rating_file_format,
    source_stamp,
)
from funkflow.pipeline.serving.evaluate import evaluate
from funkflow.pipeline.serving.model import export_model, read_id_maps, verify_model, write_model
from funkflow.pipeline.training.checkpoints import Checkpoint, CheckpointStore, open_storage
from funkflow.pipeline.training.placement import BlockPlacement
from funkflow.pipeline.training.plan import auto_d, check_d
from funkflow.pipeline.training.records import EpochReport
from funkflow.pipeline.training.train import TrainResult, WarmStart, train
from funkflow.tasks.artifacts import MANIFEST, MODEL_JSON
from funkflow.tasks.checkpoint_io import BlockWriter
from funkflow.tasks.idmap import index_of
from funkflow.tasks.io import read_json, restore_text, update_text, write_json, write_text
from funkflow.tasks.synthetic import SyntheticSpec

log = logging.getLogger(__name__)


def synthetic_spec(cfg: GenerateConfig) -> SyntheticSpec:
    """The generator's spec for ``data.generate``; an impossible shape is a config error."""
    overrides = cfg.model_dump(exclude={"scale", "ratings_per_part"})
    try:
        return SyntheticSpec.netflix_shaped(cfg.scale, **overrides)
    except ValueError as exc:
        raise ConfigError(f"data.generate: {exc}") from None


def _chain(*parts: str) -> str:
    return hashlib.sha256("|".join(parts).encode()).hexdigest()


def _format_rate(per_second: float) -> str:
    return f"{per_second / 1e6:.2f}M" if per_second >= 1e5 else f"{per_second:,.0f}"


class _Progress:
    """One terminal line per epoch, and ``metrics.jsonl`` rewritten whole after each."""

    def __init__(self, run: RunDir, epochs: int, rows: list[dict[str, Any]],
                 callbacks: Sequence[Callable[[EpochReport], None]] = ()) -> None:
        self.run = run
        self.epochs = epochs
        self.rows = list(rows)
        self.callbacks = callbacks

    def __call__(self, report: EpochReport) -> None:
        self.rows.append(report.row())
        write_text("".join(json.dumps(row) + "\n" for row in self.rows), self.run.metrics)
        mean_seconds = sum(r["seconds"] for r in self.rows) / len(self.rows)
        eta = mean_seconds * (self.epochs - report.epoch)
        val = f"  val {report.val_rmse:.4f}" if report.val_rmse is not None else ""
        log.info("epoch %d/%d  train RMSE %.4f%s  lr %.4g  %s ratings/s  ETA %.0fs", report.epoch, self.epochs,
                 report.train_rmse, val, report.lr, _format_rate(report.ratings_per_second), eta,
                 extra={"epoch": report.epoch, "metrics": report.row()})
        for callback in self.callbacks:
            callback(report)


class Pipeline:
    """The stages of one run directory, run against one executor."""

    def __init__(self, config: Config, executor: Executor, resume: bool = False, force: bool = False,
                 callbacks: Sequence[Callable[[EpochReport], None]] = ()) -> None:
        self.config = config
        self.callbacks = callbacks
        self.executor = executor
        self.resume = resume
        self.force = force
        self.run = RunDir(Path(config.output.run_dir))
        self.checkpoint_url = config.output.checkpoints or str(self.run.checkpoints)
        self.seconds: dict[str, float] = {}
        self.ran: list[str] = []  # the stages this invocation ran (not up to date)
        self.data_fingerprint: str | None = None
        self._row_blocks: list[Any] | None = None

    def _stage(self, name: str, fingerprint: str, work, output: Path) -> dict[str, Any]:
        """Run ``work`` unless the stage's record matches ``fingerprint`` and its ``output`` exists."""
        with stage_context(name):
            record = self.run.completed(name, fingerprint) if output.exists() else None
            if record is not None:
                log.info("%s: up to date", name)
            else:
                began = time.perf_counter()
                facts = work() or {}
                # Never recorded as done unless its output is where the run directory says (a worker that
                # resolved a relative path against its own working directory wrote it elsewhere).
                if output != self.run.stage_record(name) and not output.exists():
                    raise RuntimeError(f"{name} finished without writing {output}")
                self.run.mark_complete(name, fingerprint, time.perf_counter() - began, **facts)
                record = self._stage_record(name, fingerprint)
                self.ran.append(name)
                log.info("%s: done in %.1fs", name, record["seconds"])
        self.seconds[name] = record["seconds"]
        return record

    def _stage_record(self, name: str, fingerprint: str) -> dict[str, Any]:
        record = self.run.completed(name, fingerprint)
        assert record is not None, f"{name} ran before"
        return record

    def dataset(self) -> tuple[Dataset, str]:
        data = self.config.data
        if data.generate is None and data.format == "canonical":
            dataset = open_dataset(data.dataset_dir())
            return dataset, dataset.fingerprint
        if data.generate is None:
            files = expand_sources(data.sources())
            # The sources' sizes and modification stamps stand for their content: a new export re-ingests.
            fingerprint = _chain(self.config.fingerprint("data"), *(source_stamp(f) for f in files))

            def ingest_work() -> dict[str, Any]:
                meta = ingest(self.executor, files, ingest_options(data), self.run.data).meta
                return {"n_ratings": meta["n_ratings"], "rejects": meta["rejects"]["total"]}

            self._stage("ingest", fingerprint, ingest_work, self.run.data / "dataset.json")
            return open_dataset(self.run.data), fingerprint
        fingerprint = self.config.fingerprint("data")
        generate = data.generate
        assert generate is not None, "data.source or data.generate, as validated"

        def work() -> None:
            generate_dataset(self.executor, synthetic_spec(generate), self.run.data, generate.ratings_per_part)

        self._stage("generate", fingerprint, work, self.run.data / "dataset.json")
        return open_dataset(self.run.data), fingerprint

    def test_set(self, dataset: Dataset) -> Dataset | None:
        """The test ratings of ``split.method: given``: a dataset ingested with the training id maps, or raw
        files ingested here with them (and the training data's rating scale)."""
        split, data = self.config.split, self.config.data
        if split.method != "given":
            return None
        source = split.test_source
        assert source is not None, "split.method given has a test_source, as validated"
        fs, path = fsspec.core.url_to_fs(source)
        if fs.isfile(f"{path.rstrip('/')}/dataset.json"):
            return given_test_set(source, dataset)
        files = expand_sources([source])
        fmt = data.format if data.format != "canonical" else rating_file_format(files[0])
        scale = dataset.meta.get("rating_scale")
        options = ingest_options(data).model_copy(update={
            "format": fmt, "id_maps": dataset.root, "rating_scale": tuple(scale) if scale else None})

        def work() -> dict[str, Any]:
            meta = ingest(self.executor, files, options, self.run.test_data).meta
            return {"n_ratings": meta["n_ratings"], "rejects": meta["rejects"]["total"]}

        fingerprint = _chain(dataset.fingerprint, options.model_dump_json(), *(source_stamp(f) for f in files))
        self._stage("ingest-test", fingerprint, work, self.run.test_data / "dataset.json")
        return given_test_set(self.run.test_data, dataset)

    def blocks(self, dataset: Dataset, upstream: str) -> tuple[Blocks, str]:
        t = self.config.train
        test_set = self.test_set(dataset)

        d = t.d
        if d != "auto":
            check_d(d, dataset.n_ratings)
        else:
            d = auto_d(dataset.n_ratings)
            log.info("train.d: auto chose d=%d for %s ratings (%d×%d blocks of about %s; the same on any cluster)",
                     d, f"{dataset.n_ratings:,}", d, d, f"{dataset.n_ratings // d ** 2:,}")
        fingerprint = _chain(upstream, dataset.fingerprint, test_set.fingerprint if test_set else "",
                             self.config.fingerprint("split"), str(d), str(t.seed))

        def work() -> None:
            block_dataset(self.executor, dataset, self.run.blocks, d, self.config.split, t.seed, test_set)

        self._stage("block", fingerprint, work, self.run.blocks / "blocks.json")
        return open_blocks(self.run.blocks), fingerprint

    def _checkpoints(self, blocks: Blocks, blocks_fingerprint: str) -> tuple[CheckpointStore | None,
                                                                              Checkpoint | None]:
        """The run's checkpoint store and, with ``--resume``, the checkpoint to continue from."""
        t = self.config.train
        if not t.checkpoint_every:
            return None, None
        sections = self.config.to_dict()
        identity = {"blocks": blocks_fingerprint, "model": sections["model"],
                    "train": {k: v for k, v in sections["train"].items()
                              if k not in ("epochs", "checkpoint_every", "keep_checkpoints")}}
        layout = {"model.k": self.config.model.k, "train.d": blocks.d, "train.seed": blocks.seed,
                  "n_users": blocks.n_users, "n_items": blocks.n_items}
        store = CheckpointStore(self.checkpoint_url, identity, layout, t.keep_checkpoints, self.force)
        # Without --resume, a checkpoint of exactly this run (an attempt that died, or a shorter
        # run being extended) is still taken up; any other is cleared, never resumed into.
        checkpoint = store.latest(max_epoch=t.epochs, strict=self.resume)
        if checkpoint is None:
            if self.resume:
                log.warning("--resume: no valid checkpoint in %s; training from the start", self.checkpoint_url)
            store.clear()
        return store, checkpoint

    def row_blocks(self, placement: BlockPlacement) -> list[Any]:
        if self._row_blocks is None:
            self._row_blocks = placement.load_row_blocks()
        return self._row_blocks

    def _warm_start(self, dataset: Dataset) -> tuple[WarmStart | None, str]:
        """The previous model of ``train.init_from`` mapped onto this dataset's ids, and its content stamp."""
        source = self.config.train.init_from
        if source is None:
            return None, ""
        model_dir = RunDir(Path(source)).model if RunDir(Path(source)).model_json.is_file() else Path(source)
        if not (model_dir / MODEL_JSON).is_file():
            raise ConfigError(f"train.init_from: no model in {source} (neither {source}/model/{MODEL_JSON} nor "
                              f"{source}/{MODEL_JSON})")
        verify_model(model_dir)
        info = read_json(model_dir / MODEL_JSON)
        if info["k"] != self.config.model.k:
            raise ConfigError(f"train.init_from: {source} has k={info['k']}, this run model.k={self.config.model.k}")
        maps, n_previous = {}, []
        for name, new_ids, old_ids in zip(("users", "items"), read_id_maps(dataset.root), read_id_maps(model_dir)):
            maps[name] = index_of(new_ids, old_ids)
            n_previous.append(len(old_ids))
            known = int((maps[name] >= 0).sum())
            log.info("warm start: %s of %s %s known to %s (%s new, %s dropped)", f"{known:,}", f"{len(new_ids):,}",
                     name, source, f"{len(new_ids) - known:,}", f"{len(old_ids) - known:,}")
        stamp = _chain(*(source_stamp(str(model_dir / f)) for f in (MODEL_JSON, MANIFEST)))
        return WarmStart(model_dir, maps["users"], maps["items"], (n_previous[0], n_previous[1])), stamp

    def train(self, dataset: Dataset, blocks: Blocks, placement: BlockPlacement, upstream: str) -> str:
        warm, warm_stamp = self._warm_start(dataset)
        fingerprint = _chain(upstream, self.config.fingerprint("model", "train"), warm_stamp)

        def work() -> dict[str, Any]:
            store, checkpoint = self._checkpoints(blocks, upstream)
            progress = _Progress(self.run, self.config.train.epochs,
                                 [r.row() for r in checkpoint.state.history] if checkpoint else [],
                                 self.callbacks)
            def save(result: TrainResult, write_blocks: BlockWriter) -> None:
                global_mean = blocks.global_mean if self.config.model.use_bias else 0.0
                info = {"global_mean": global_mean, "k": self.config.model.k,
                        "use_bias": self.config.model.use_bias, "d": blocks.d, "epochs": len(result.history),
                        "best_epoch": result.best_epoch, "dataset_fingerprint": dataset.fingerprint,
                        "rating_scale": dataset.meta.get("rating_scale"), "config": self.config.to_dict()}
                write_model(self.run.model, info, *read_id_maps(dataset.root), write_blocks, (blocks.d, blocks.seed))
                saved.append(True)

            # metrics.jsonl grows an epoch at a time; if training fails with the previous model still in place
            # (a full disk at its write, a lost cluster), its rows are put back, so that the file describes the
            # model there. Without a model, the failed run's rows stay to read.
            saved: list[bool] = []
            previous = (self.run.metrics.read_text(encoding="utf-8")
                        if self.run.metrics.is_file() and self.run.model_json.is_file() else None)
            try:
                result = train(self.executor, placement, self.row_blocks(placement), self.config.model,
                               self.config.train, save, progress, store, checkpoint, warm)
            except BaseException:
                if previous is not None and not saved:
                    restore_text(previous, self.run.metrics)
                raise
            return {"epochs": len(result.history), "best_epoch": result.best_epoch}

        self._stage("train", fingerprint, work, self.run.model_json)
        return fingerprint

    def evaluate(self, dataset: Dataset, blocks: Blocks, placement: BlockPlacement, upstream: str) -> dict[str, Any]:
        def work() -> dict[str, Any]:
            global_mean = blocks.global_mean if self.config.model.use_bias else 0.0
            return evaluate(self.executor, placement, self.row_blocks(placement), self.run.model, global_mean,
                            blocks.meta["has_expected"], self.config.evaluate, self.config.split.seed).as_json()

        fingerprint = _chain(upstream, self.config.fingerprint("evaluate"))
        record = self._stage("evaluate", fingerprint, work, self.run.stage_record("evaluate"))
        c = self.config
        summary = {
            **{k: record[k] for k in ("test_rmse", "test_mae", "train_rmse", "baselines", "n_test")},
            "ranking": record.get("ranking"),
            "floor_rmse": record.get("floor_rmse"),
            "epochs": self._stage_record("train", upstream)["epochs"],
            "k": c.model.k, "d": blocks.d, "seed": c.train.seed,
            "n_ratings": dataset.n_ratings,
            "dataset_fingerprint": dataset.fingerprint,
            "seconds": dict(self.seconds),
            "run_dir": str(self.run.root),
        }
        update_text(json.dumps(summary, indent=2, sort_keys=True) + "\n", self.run.summary)
        return summary

    def run_until(self, last: str) -> dict[str, Any] | None:
        dataset, fingerprint = self.dataset()
        self.data_fingerprint = dataset.fingerprint
        if last == "generate":
            return None
        blocks, fingerprint = self.blocks(dataset, fingerprint)
        if last == "block":
            return None
        placement = BlockPlacement(self.executor, blocks)
        fingerprint = self.train(dataset, blocks, placement, fingerprint)
        if last == "train":
            return None
        if last == "export":
            self._stage("export", fingerprint, lambda: export_model(self.executor, self.run.model, self.run.export),
                        self.run.export / "users.parquet")
            return None
        return self.evaluate(dataset, blocks, placement, fingerprint)


def _check_checkpoint_storage(config: Config) -> None:
    """Fail before the cluster starts when ``output.checkpoints`` cannot work."""
    url = config.output.checkpoints
    if url is None or not config.train.checkpoint_every:
        return
    fs, _ = open_storage(url, "output.checkpoints")
    if "memory" in fs.protocol and config.cluster.scheduler != IN_PROCESS:
        raise ConfigError(f"output.checkpoints: {url} lives in one process's memory, where the workers' "
                          "writes cannot be seen; use it only with cluster.scheduler=inprocess")


# What may differ from the configuration a run directory's model was trained with: where and how the run
# goes, what it measures, and how long it trains (a longer train.epochs extends the same model).
_FREE_KEYS = ("cluster", "output", "evaluate", "tune", "train.epochs", "train.checkpoint_every",
              "train.keep_checkpoints")


def _refuse_another_model(run: RunDir, config: Config) -> None:
    """A run directory that holds a model keeps it unless the run asks to retrain: a config that would train
    a different one is a config error naming the keys."""
    saved = run.root / "config.yaml"
    if not saved.is_file() or not run.model_json.is_file():
        return
    changed = [line for line in differences(load_config(saved).to_dict(), config.to_dict(), "the run has")
               if not any(line.startswith((f"{free}:", f"{free}.")) for free in _FREE_KEYS)]
    if changed:
        raise ConfigError(f"{run.root} holds a model trained with another configuration ({saved}):\n  "
                          + "\n  ".join(changed) + "\nrun without CONFIG to use the run's own, choose another "
                          "--run-dir, or pass --retrain to replace its model")


def run_pipeline(config: Config, last: str = "evaluate", resume: bool = False, force: bool = False,
                 report: Path | None = None, callbacks: Sequence[Callable[[EpochReport], None]] = (),
                 executor: Executor | None = None, retrain: bool = False) -> dict[str, Any] | None:
    """Run the stages up to and including ``last``; return the summary when ``last`` is evaluate.

    With ``resume``, training continues from the newest valid checkpoint; with
    ``force`` as well, even one written under a different config. ``report``:
    an HTML file for Dask's performance report of the run. ``callbacks`` are
    called with each epoch's report. ``executor``: run on this one (e.g. a
    caller's Dask client) instead of opening one from ``config.cluster``.
    A run directory whose model was trained with another configuration is
    refused (:class:`ConfigError`) unless ``retrain`` (or ``resume``, whose
    checkpoint must match instead).
    """
    config = config.with_absolute_paths()  # before anything reaches a worker with its own working directory
    if config.train.refit and last in ("train", "export", "evaluate"):
        return _refit(config, last, resume, force, report, callbacks, executor, retrain)
    # Everything that can be checked without the cluster is checked before it starts, and the data's size
    # found, for the choice between a cluster and this process when cluster.scheduler is unset.
    estimated = False
    if config.data.generate is not None:
        n_ratings = synthetic_spec(config.data.generate).n_ratings
    elif config.data.format == "canonical":
        n_ratings = open_dataset(config.data.dataset_dir()).n_ratings
    else:
        n_ratings, estimated = estimated_ratings(config.data.sources()), True
        ingest_options(config.data).scale()
    if config.train.d != "auto" and (config.data.generate is not None or config.data.format == "canonical"):
        check_d(config.train.d, n_ratings)  # known exactly: refused before anything starts
    _check_checkpoint_storage(config)
    if force and not resume:
        raise UsageError("--force only applies with --resume")
    if report is not None:
        if config.cluster.scheduler == IN_PROCESS:
            raise UsageError("--report needs a Dask cluster, not cluster.scheduler=inprocess")
        try:
            import bokeh  # noqa: F401  (Dask's report is drawn with it)
        except ImportError:
            raise UsageError("--report needs bokeh: pip install 'funkflow[report]'") from None
    run = RunDir(Path(config.output.run_dir))
    with run.locked():
        if not (retrain or resume):  # --resume has its own check: the checkpoint's identity
            _refuse_another_model(run, config)
        started = time.time()
        pipeline: Pipeline | None = None
        try:
            with _executor(config, executor, n_ratings, estimated) as running, _performance_report(report):
                update_text(dump_config(config), run.root / "config.yaml")
                if running.dashboard_link:
                    log.info("Dask dashboard: %s (%d worker(s), %d threads)", running.dashboard_link,
                             len(running.workers), running.total_threads)
                if config.train.d != "auto" and config.train.d < running.total_threads:
                    log.warning("train.d=%d is below the %d worker threads: some threads will idle; raise "
                                "train.d", config.train.d, running.total_threads)
                pipeline = Pipeline(config, running, resume, force, callbacks)
                result = pipeline.run_until(last)
        except BaseException as exc:
            fault = outside_fault(exc)
            _write_run_manifest(run, config, pipeline, started, fault or exc)
            if fault is not None and fault is not exc:
                raise fault from exc
            raise
        if pipeline.ran:  # an up-to-date re-run leaves every file, this one too, as it was
            _write_run_manifest(run, config, pipeline, started, None)
        return result


def _refit(config: Config, last: str, resume: bool, force: bool, report: Path | None,
           callbacks: Sequence[Callable[[EpochReport], None]], executor: Executor | None,
           retrain: bool) -> dict[str, Any] | None:
    """``train.refit``: train with validation and early stopping in ``RUN_DIR/selection``, then the final model
    in the run directory on the training and validation ratings for the epoch count early stopping chose.
    The run directory's ``config.yaml`` is that final config; the one asked for is the selection's."""
    claim(Path(config.output.run_dir))  # funkflow's before the selection run is made inside it
    selected = RunDir(RunDir(Path(config.output.run_dir)).selection)
    selection = config.with_values({"train.refit": False, "output.run_dir": str(selected.root)})
    run_pipeline(selection, last="train", resume=resume, force=force, callbacks=callbacks, executor=executor,
                 retrain=True)
    best_epoch = read_json(selected.stage_record("train"))["best_epoch"]
    steps = [row["lr"] for row in selected.metrics_rows()]
    canonical = config.data.generate is None and config.data.format == "canonical"
    dataset = config.data.dataset_dir() if canonical else str(selected.data.resolve())
    final = config.with_values({**config.refit_values(steps[:best_epoch]), "data.source": dataset,
                                "data.format": "canonical", "data.generate": None})
    log.info("train.refit: early stopping kept epoch %d; training it again on the training and validation "
             "ratings for %d epochs at the step sizes it took", best_epoch, best_epoch)
    return run_pipeline(final, last, resume=resume, force=force, report=report, callbacks=callbacks,
                        executor=executor, retrain=retrain)


@contextlib.contextmanager
def _executor(config: Config, given: Executor | None, n_ratings: int, estimated: bool) -> Iterator[Executor]:
    if given is not None:
        yield given
        return
    with open_executor(config.cluster, n_ratings, estimated) as executor:
        yield executor


@contextlib.contextmanager
def _performance_report(path: Path | None) -> Iterator[None]:
    if path is None:
        yield
        return
    from distributed import performance_report

    with performance_report(filename=str(path)):
        yield
    log.info("Dask performance report: %s", path)


def _versions() -> dict[str, str]:
    return {"python": platform.python_version(),
            **{name: package_version(name) for name in ("funkflow", "dask", "distributed", "numba", "numpy",
                                                        "pyarrow")}}


def _write_run_manifest(run: RunDir, config: Config, pipeline: Pipeline | None, started: float,
                        error: BaseException | None) -> None:
    """``run.json``: when, with what, on which data, how it ended, and the time of each stage."""
    if error is None:
        status, code = "ok", EXIT_OK
    elif isinstance(error, FunkflowError):
        status, code = "failed", error.exit_code
    elif isinstance(error, KeyboardInterrupt):
        status, code = "interrupted", 130
    else:
        status, code = "failed", EXIT_SOFTWARE

    def stamp(t: float) -> str:
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))

    manifest = {
        "status": status,
        "exit_code": code,
        "error": None if error is None else f"{type(error).__name__}: {error}",
        "started": stamp(started),
        "ended": stamp(time.time()),
        "seconds": round(time.time() - started, 3),
        "command": sys.argv,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "versions": _versions(),
        "config_hash": config.fingerprint(),
        "data_fingerprint": None if pipeline is None else pipeline.data_fingerprint,
        "stages_run": [] if pipeline is None else pipeline.ran,
        "stage_seconds": {} if pipeline is None else pipeline.seconds,
    }
    path = run.root / "run.json"
    try:
        write_json(manifest, path)
    except OSError:  # a full disk: the previous record's space may be enough, and a stale "ok" is worse than none
        path.unlink(missing_ok=True)
        try:
            write_json(manifest, path)
        except OSError as exc:
            log.warning("%s: cannot record how the run ended (%s); the previous record is removed", path, exc)
