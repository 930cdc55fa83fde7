"""``funkflow tune``: find k, λ, λ_b and η by successive halving on the validation RMSE, then train the winner
on train and validation together for the epoch count early stopping chose.

Trial 0 is the config as given; the others are drawn log-uniformly from ``tune.space`` with ``tune.seed``.
Every trial trains for ``tune.min_epochs``; the best ``1/tune.reduction`` by their best validation RMSE go on
to ``reduction`` times as many epochs from their checkpoint, and so on up to ``tune.max_epochs``, early
stopping ending a trial sooner. Each trial is an ordinary run directory under ``tune/`` trained in one process
on one thread, so its curve, and the winner, are the same whatever the cluster: on a cluster the trials of a
rung run in parallel, one per worker thread. Data too large for one worker train one trial after another
with DSGD across the cluster.

Each finished (trial, rung) is a line of ``tune.jsonl`` in the run directory as it ends; a tune run again
takes them up and does not redo them. The winner's final config is ``best.yaml``, which ``funkflow run``
uses as is; tune then runs it, so the run directory holds the final model and its test RMSE, measured once.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from funkflow.pipeline.app.stages import run_pipeline
from funkflow.pipeline.core.cluster import Executor, InProcessExecutor, open_executor
from funkflow.pipeline.core.config import TUNABLE, Config, differences, dump_config
from funkflow.pipeline.core.errors import ConfigError
from funkflow.pipeline.core.rundir import RunDir, claim, remove_owned
from funkflow.pipeline.data.dataset import open_dataset
from funkflow.tasks.io import read_json, write_text

log = logging.getLogger(__name__)

TUNE_LOG = "tune.jsonl"
BEST_CONFIG = "best.yaml"
# Above this many ratings a trial does not fit one worker's share of a cluster: trials run one at a time on
# the whole cluster instead of side by side, one per worker thread.
TRIAL_RATINGS_LIMIT = 20_000_000


@dataclass(frozen=True)
class Trial:
    index: int
    params: dict[str, float]  # tune.space key -> value


@dataclass(frozen=True)
class RungResult:
    """One trial trained up to one rung's epochs: a line of ``tune.jsonl``."""

    trial: int
    rung: int
    epochs: int
    params: dict[str, float]
    val_rmse: list[float]
    best_val: float
    best_epoch: int
    seconds: float
    lr: list[float] = field(default_factory=list)  # the step size of each epoch


@dataclass(frozen=True)
class TrialCurve:
    """What a trial's training returns: its validation RMSE and step size by epoch, and the epoch early
    stopping kept."""

    val_rmse: list[float]
    best_epoch: int
    seconds: float
    lr: list[float]


@dataclass(frozen=True)
class TuneResult:
    best: RungResult
    results: list[RungResult]
    best_config: Path
    summary: dict[str, Any] | None


def draw_trials(config: Config) -> list[Trial]:
    """Trial 0: the config's own values; then ``tune.trials - 1`` draws, log-uniform in ``tune.space``."""
    tune = config.tune
    own = {key: config.value(TUNABLE[key]) for key in tune.space}
    rng = np.random.default_rng(tune.seed)
    trials = [Trial(0, own)]
    for index in range(1, tune.trials):
        params = {}
        for key, (low, high) in sorted(tune.space.items()):
            value = math.exp(rng.uniform(math.log(low), math.log(high)))
            params[key] = round(value) if key == "k" else float(f"{value:.3g}")
        trials.append(Trial(index, params))
    return trials


def rung_epochs(min_epochs: int, max_epochs: int, reduction: int) -> list[int]:
    """Each rung's epoch count: ``min_epochs`` times powers of ``reduction``, ending at ``max_epochs``."""
    epochs = [min_epochs]
    while epochs[-1] * reduction < max_epochs:
        epochs.append(epochs[-1] * reduction)
    if epochs[-1] < max_epochs:
        epochs.append(max_epochs)
    return epochs


_quiet_lock = threading.Lock()
_quiet_trials = 0  # trials running in this process, which may be side by side on threads
_loud_level = logging.NOTSET


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """A trial's stage and epoch lines would drown the tuner's own: warnings only while any trial runs."""
    global _quiet_trials, _loud_level
    logger = logging.getLogger("funkflow")
    with _quiet_lock:
        if _quiet_trials == 0:
            _loud_level = logger.level
            logger.setLevel(logging.WARNING)
        _quiet_trials += 1
    try:
        yield
    finally:
        with _quiet_lock:
            _quiet_trials -= 1
            if _quiet_trials == 0:
                logger.setLevel(_loud_level)


def train_trial(config_data: dict[str, Any], executor: Executor | None = None) -> TrialCurve:
    """Train one trial's run directory up to its ``train.epochs`` (from its newest checkpoint, if any) and
    return its validation curve and the epoch early stopping kept. In one process on one thread unless given
    an ``executor``; its blocks are removed afterwards, since a tune may hold many trials."""
    config = Config.model_validate(config_data)
    run_dir = Path(config.output.run_dir)
    began = time.perf_counter()
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file() and len(metrics.read_text().splitlines()) > config.train.epochs:
        # Trained past this rung by a tune that was stopped before it recorded the rung: train it afresh (the
        # same bits as continuing, since a resume is exact) rather than from a later checkpoint.
        remove_owned(run_dir)
    with _quiet():
        run_pipeline(config, last="train", executor=executor or InProcessExecutor(1), retrain=True)
    rows = RunDir(run_dir).metrics_rows()
    best_epoch = read_json(RunDir(run_dir).stage_record("train"))["best_epoch"]
    remove_owned(RunDir(run_dir).blocks)
    return TrialCurve([row["val_rmse"] for row in rows], best_epoch, time.perf_counter() - began,
                      [row["lr"] for row in rows])


def _trial_run(root: Path, trial: Trial) -> RunDir:
    return RunDir(root / f"trial-{trial.index:03d}")


def _trial_config(config: Config, trial: Trial, dataset: str, root: Path, epochs: int, parallel: bool) -> Config:
    values = {TUNABLE[key]: value for key, value in trial.params.items()}
    return config.with_values({
        **values, "data.source": dataset, "data.format": "canonical", "data.generate": None,
        "train.epochs": epochs, "train.checkpoint_every": 1, "train.keep_checkpoints": 1,
        "train.refit": False, "output.run_dir": str(_trial_run(root, trial).root), "output.checkpoints": None,
        # One thread each, whatever the cores of the worker it lands on: its d, and so its bits, follow.
        **({"cluster.scheduler": "inprocess", "cluster.n_workers": 1, "cluster.threads_per_worker": 1}
           if parallel else {})})


def _identity(config: Config, dataset_fingerprint: str) -> dict[str, Any]:
    """What a tune's trials depend on: a ``tune.jsonl`` of another identity is not taken up."""
    sections = config.to_dict()
    return {"dataset": dataset_fingerprint, "split": sections["split"], "model": sections["model"],
            "train": {k: v for k, v in sections["train"].items() if k not in ("epochs", "checkpoint_every",
                                                                              "keep_checkpoints")},
            "tune": {k: v for k, v in sections["tune"].items() if k != "time_budget"}}


def _done_results(path: Path, identity: dict[str, Any], retrain: bool) -> list[RungResult]:
    """The results of an earlier tune of the same identity in ``path``; another identity is refused."""
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    head = json.loads(lines[0]) if lines else {}
    if head.get("identity") != json.loads(json.dumps(identity)):
        if retrain:
            return []
        changed = differences(head.get("identity", {}), json.loads(json.dumps(identity)), "the tune has")
        raise ConfigError(f"{path} holds a tune of another configuration or dataset:\n  " + "\n  ".join(changed[:10])
                          + "\nchoose another --run-dir, or pass --retrain to start the tune afresh")
    results = []
    for line in lines[1:]:
        try:
            results.append(RungResult(**json.loads(line)))
        except (ValueError, TypeError):  # a line cut short by a kill: that rung is trained again
            log.warning("%s: a damaged line is left out and its trial trained again", path)
    return results


def _write_log(path: Path, identity: dict[str, Any], results: list[RungResult]) -> None:
    lines = [json.dumps({"identity": identity}, sort_keys=True)]
    lines += [json.dumps(asdict(r), sort_keys=True) for r in sorted(results, key=lambda r: (r.rung, r.trial))]
    write_text("\n".join(lines) + "\n", path)


def _prepared_dataset(config: Config, root: Path) -> tuple[str, str, int]:
    """The canonical dataset the trials and the final run read: the config's own, or its files ingested
    (its ratings generated) once under ``root``."""
    if config.data.generate is None and config.data.format == "canonical":
        dataset = open_dataset(config.data.dataset_dir())
        return str(Path(config.data.dataset_dir()).resolve()), dataset.fingerprint, dataset.n_ratings
    with _quiet():
        run_pipeline(config.with_values({"output.run_dir": str(root / "prepared")}), last="generate", retrain=True)
    dataset = open_dataset(RunDir(root / "prepared").data)
    return str(Path(dataset.root).resolve()), dataset.fingerprint, dataset.n_ratings


class _Search:
    """Successive halving over the trials, recording each (trial, rung) as it ends."""

    def __init__(self, config: Config, dataset: str, parallel: bool, log_path: Path, identity: dict[str, Any],
                 done: dict[tuple[int, int], RungResult]) -> None:
        self.config, self.dataset, self.parallel = config, dataset, parallel
        self.log_path, self.identity, self.done = log_path, identity, done
        self.root = log_path.parent / "tune"
        self.began = time.monotonic()

    def out_of_time(self) -> bool:
        budget = self.config.tune.time_budget
        return budget is not None and time.monotonic() - self.began > budget

    def run(self, trials: list[Trial], rungs: list[int], executor: Executor) -> None:
        slots = max(1, executor.total_threads) if self.parallel else 1
        alive = trials
        for rung, epochs in enumerate(rungs):
            for start in range(0, len(alive), slots):
                if self.out_of_time():
                    log.warning("tune.time_budget of %gs spent: the winner is the best of the trials trained so far",
                                self.config.tune.time_budget)
                    return
                self._train(alive[start:start + slots], rung, epochs, executor)
            ranked = sorted((self.done[(trial.index, rung)] for trial in alive), key=lambda r: (r.best_val, r.trial))
            keep = {r.trial for r in ranked[:max(1, math.ceil(len(ranked) / self.config.tune.reduction))]}
            for trial in alive:
                if trial.index not in keep:  # stopped here: its checkpoints are no longer needed
                    for checkpoint in _trial_run(self.root, trial).checkpoints.glob("epoch-*"):
                        remove_owned(checkpoint)
            alive = [trial for trial in alive if trial.index in keep]

    def _train(self, batch: list[Trial], rung: int, epochs: int, executor: Executor) -> None:
        batch = [trial for trial in batch if (trial.index, rung) not in self.done]
        configs = [_trial_config(self.config, trial, self.dataset, self.root, epochs, self.parallel).to_dict()
                   for trial in batch]
        if self.parallel:
            outcomes = executor.gather([executor.submit(train_trial, data, name=f"trial-{trial.index}")
                                        for trial, data in zip(batch, configs)])
        else:
            outcomes = [train_trial(data, executor) for data in configs]
        for trial, curve in zip(batch, outcomes):
            result = RungResult(trial.index, rung, epochs, trial.params, curve.val_rmse,
                                curve.val_rmse[curve.best_epoch - 1], curve.best_epoch, curve.seconds, curve.lr)
            self.done[(trial.index, rung)] = result
            log.info("trial %d, %d epochs: best validation RMSE %.4f at epoch %d (%s)", trial.index, epochs,
                     result.best_val, curve.best_epoch, ", ".join(f"{k} {v:g}" for k, v in trial.params.items()))
        _write_log(self.log_path, self.identity, list(self.done.values()))


def tune(config: Config, retrain: bool = False) -> TuneResult:
    """Search ``config.tune.space``, write ``tune.jsonl`` and ``best.yaml``, and train the winner."""
    t = config.tune
    split = config.split
    if (split.validation_per_user if split.method == "per_user" else split.validation_fraction) == 0:
        raise ConfigError("tune chooses by the validation RMSE: set split.validation_fraction (or, for per_user, "
                          "split.validation_per_user) above 0")
    run_dir = Path(config.output.run_dir)
    log_path = run_dir / TUNE_LOG
    if RunDir(run_dir).model_json.is_file() and not log_path.is_file() and not retrain:
        raise ConfigError(f"{run_dir} holds a model that no tune made; choose another --run-dir, or pass "
                          "--retrain to replace it with the tune's")
    claim(run_dir)  # funkflow's before anything is written into it; its stages then lock it
    claim(run_dir / "tune")
    write_text(dump_config(config), run_dir / "tune" / "config.yaml")  # what a re-run without CONFIG uses
    dataset, fingerprint, n_ratings = _prepared_dataset(config, run_dir / "tune")
    identity = _identity(config, fingerprint)
    results = _done_results(log_path, identity, retrain)
    done = {(r.trial, r.rung): r for r in results}
    trials = draw_trials(config)
    rungs = rung_epochs(t.min_epochs, t.max_epochs, t.reduction)
    parallel = n_ratings <= TRIAL_RATINGS_LIMIT
    if not parallel:
        log.info("%s ratings, more than a trial on one worker should hold: trials run one after another with "
                 "DSGD across the cluster", f"{n_ratings:,}")
    if done:
        log.info("tune: %d trained (trial, rung) pairs taken up from %s", len(done), log_path)
    search = _Search(config, dataset, parallel, log_path, identity, done)
    with open_executor(config.cluster, n_ratings) as executor:
        log.info("tune: %d trials, rungs of %s epochs keeping the best 1/%d of each, %d at a time", len(trials),
                 "/".join(map(str, rungs)), t.reduction, max(1, executor.total_threads) if parallel else 1)
        search.run(trials, rungs, executor)
    results = sorted(done.values(), key=lambda r: (r.rung, r.trial))
    if not results:
        raise ConfigError(f"tune.time_budget {t.time_budget}s ran out before any trial ended; allow more")
    top_rung = max(r.rung for r in results)
    best = min((r for r in results if r.rung == top_rung), key=lambda r: (r.best_val, r.trial))
    if len(best.lr) < best.best_epoch:  # a tune.jsonl written before the step sizes were recorded
        raise ConfigError(f"{log_path} does not record the step sizes of trial {best.trial}: pass --retrain to "
                          "tune afresh")
    best_config = config.with_values({
        **{TUNABLE[k]: v for k, v in best.params.items()}, **config.refit_values(best.lr[:best.best_epoch]),
        "data.source": dataset, "data.format": "canonical", "data.generate": None})
    path = run_dir / BEST_CONFIG
    write_text(_best_yaml(best, len(trials), rungs[top_rung], best_config), path)
    log.info("tune: trial %d wins (validation RMSE %.4f at epoch %d); training it on the training and validation "
             "ratings for %d epochs: %s", best.trial, best.best_val, best.best_epoch, best.best_epoch, path)
    # The run directory is this tune's (checked above): its final model is replaced by the winner's.
    summary = run_pipeline(best_config, retrain=True)
    return TuneResult(best, results, path, summary)


def _best_yaml(best: RungResult, n_trials: int, epochs: int, config: Config) -> str:
    params = ", ".join(f"{k} {v:g}" for k, v in best.params.items())
    header = (f"# Chosen by `funkflow tune` among {n_trials} trials (successive halving up to {epochs} epochs):\n"
              f"# trial {best.trial} ({params}) had the best validation RMSE, {best.best_val:.4f}, at epoch "
              f"{best.best_epoch}.\n# This config trains it on the training and validation ratings for that many "
              "epochs, at the step sizes the trial took; the test ratings are the tune's.\n")
    return header + dump_config(config)


def read_tune_log(run_dir: Path) -> list[RungResult]:
    """The (trial, rung) results of a run directory's ``tune.jsonl``; none if it was not tuned."""
    path = run_dir / TUNE_LOG
    if not path.is_file():
        return []
    return [RungResult(**json.loads(line)) for line in path.read_text(encoding="utf-8").splitlines()[1:]]
