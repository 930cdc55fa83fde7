"""The DSGD driver: the epoch loop, its step size, rollbacks, early stopping and checkpoints.

Worker ``i`` of ``W`` owns a contiguous range of row blocks for the whole run
(their ratings and their user states ``(P_r, b_r)``); column blocks ``(Q_c,
b_c)`` travel around a ring of the workers. The driver submits one task per
worker and epoch: each runs the worker's rows through every step and hands a
column block straight to the peer whose row takes it next, and after its last
visit to the worker whose row takes it first in the next epoch
(:mod:`funkflow.tasks.epoch`, :mod:`funkflow.pipeline.training.exchange`). So
the scheduler sees W tasks an epoch, no worker ever holds more than its share
of either side, and every block sees the same inputs as under a global stratum
barrier: the factors are the same bits whatever the number of workers and
threads.

The factors stay on the workers between epochs, and the workers write the
model's blocks themselves. When workers are lost mid-epoch, the driver calls
the epoch off and starts again from the newest checkpoint (or the start) on
the workers that are left; the epochs it replays give the same bits, so the
run ends as if nothing happened.
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from funkflow.pipeline.core.cluster import Executor
from funkflow.pipeline.core.config import ModelConfig, TrainConfig
from funkflow.pipeline.core.errors import ClusterError, TrainingDiverged, WorkersLost
from funkflow.pipeline.training.checkpoints import Checkpoint, CheckpointStore
from funkflow.pipeline.training.exchange import (
    DSGDExchange,
    abort_training,
    epoch_share,
    load_share,
    release_training,
    write_version_share,
)
from funkflow.pipeline.training.placement import BlockPlacement, row_sum
from funkflow.pipeline.training.records import EpochReport, LoopState
from funkflow.tasks.artifacts import FileEntry
from funkflow.tasks.blocks import TRAIN, VALIDATION
from funkflow.tasks.checkpoint_io import BlockWriter
from funkflow.tasks.epoch import EpochPlan, StartFrom, rows_of
from funkflow.tasks.schedule import ring
from funkflow.tasks.training import Hyper

log = logging.getLogger(__name__)

# SGD that ends an epoch this much worse than predicting the global mean (about where the small random start
# is) has diverged.
_EXPLODED_FACTOR = 2.0
# Times training starts again on the workers that are left before the run gives up (exit 75).
_MAX_RESTARTS = 3


@dataclass(frozen=True)
class EpochOutcome:
    """What one epoch came to: its training and validation RMSE, its wall time, and the checkpoint files the
    workers wrote meanwhile (name → SHA-256)."""

    train_rmse: float
    val_rmse: float | None
    seconds: float
    files: dict[str, str]

    def diverged(self, exploded_at: float) -> bool:
        return (not math.isfinite(self.train_rmse) or self.train_rmse > exploded_at
                or not math.isfinite(self.val_rmse or 0.0))


@dataclass(frozen=True)
class WarmStart:
    """A previous model to start from: ``user_previous[u]`` is new user u's row in it, or -1; items alike.
    ``n_previous``: its users and items."""

    model_dir: Path
    user_previous: np.ndarray
    item_previous: np.ndarray
    n_previous: tuple[int, int]


@dataclass(frozen=True)
class TrainResult:
    history: list[EpochReport]
    best_epoch: int



def _next_lr(lr: float, cfg: TrainConfig, history: list[EpochReport]) -> float:
    """The step size for the epoch after ``history[-1]``."""
    if cfg.lr_schedule == "bold_driver":
        return lr * _bold_driver_factor(history)
    if cfg.lr_schedule == "decay":
        return lr * cfg.lr_decay
    if cfg.lr_schedule == "given" and cfg.lr_steps is not None and len(history) < len(cfg.lr_steps):
        return cfg.lr_steps[len(history)]
    return lr


# A validation RMSE within this fraction of the best so far is noise, not a rise.
_NOISE = 1e-3


def _bold_driver_factor(history: list[EpochReport]) -> float:
    """×1.05 after progress, ×0.5 after a setback; where there is a validation split, progress is judged on it.

    The training loss keeps falling long after the model starts to overfit, so a step grown on it alone climbs
    past the best validation epoch. Against the best validation RMSE so far: within noise of it or better, the
    step grows; above it, the step is halved, which lets SGD settle into a lower validation RMSE than its noise
    at a large step allows. While validation has not yet beaten its first epoch, a rise only holds the step:
    validation can rise for a dozen epochs while the factors grow from their small initial values, and then
    fall far below where it began. A rise of the training loss always halves the step."""
    last, earlier = history[-1], history[:-1]
    if not earlier:
        return 1.05
    if last.train_rmse >= earlier[-1].train_rmse:
        return 0.5
    earlier_val = [r.val_rmse for r in earlier if r.val_rmse is not None]
    if last.val_rmse is None or not earlier_val:
        return 1.05
    best = min(earlier_val)
    if last.val_rmse <= best * (1 + _NOISE):
        return 1.05
    improved_on_first = best < earlier_val[0]
    return 0.5 if improved_on_first else 1.0


def _version(epoch: int) -> str:
    """The name of the factors after ``epoch`` epochs in the workers' stores."""
    return f"after-{epoch}"


class _Session:
    """Training on the workers there are now: the run's factor versions live in their exchanges."""

    def __init__(self, executor: Executor, placement: BlockPlacement, row_blocks: list[Any], model: ModelConfig,
                 cfg: TrainConfig, warm: WarmStart | None) -> None:
        executor.register_worker_plugin(DSGDExchange())
        blocks = placement.blocks
        self.executor, self.placement, self.blocks, self.row_blocks = executor, placement, blocks, row_blocks
        self.cfg = cfg
        self.train_id = uuid.uuid4().hex
        self.workers = tuple(executor.workers)
        self.global_mean = blocks.global_mean if model.use_bias else 0.0
        self.validate = blocks.n_split(VALIDATION) > 0
        self.root = np.random.SeedSequence(cfg.seed)
        user_members, item_members = placement.user_members, placement.item_members
        self.source = StartFrom(
            k=model.k, init_std=model.init_std, seed=cfg.seed,
            user_sizes=tuple(len(m) for m in user_members), item_sizes=tuple(len(m) for m in item_members),
            warm_dir=None if warm is None else str(warm.model_dir),
            user_previous=() if warm is None else tuple(warm.user_previous[m] for m in user_members),
            item_previous=() if warm is None else tuple(warm.item_previous[m] for m in item_members),
            n_previous=(0, 0) if warm is None else warm.n_previous)

    def _rows(self, index: int) -> range:
        return rows_of(index, self.blocks.d, len(self.workers))

    def _ring(self, epoch: int) -> tuple[int, ...]:
        return ring(self.blocks.d, epoch, self.root)

    def _row_blocks_of(self, index: int) -> list[Any]:
        """The row blocks worker ``index`` trains, as futures (Dask can rebuild a lost one from Parquet)."""
        return [self.row_blocks[r] for r in self._rows(index)]

    def _gather(self, futures: list[Any]) -> list[Any]:
        """The results of tasks that may wait on each other; if any fails, the others are called off."""
        try:
            return self.executor.gather_watching(futures)
        except BaseException:
            self.executor.run_everywhere(abort_training, self.train_id, "the driver called the epoch off")
            self.executor.cancel(futures)
            raise

    def _by_row(self, per_worker: list[np.ndarray]) -> np.ndarray:
        """Per-row results of each worker, array of shape (d, ...), in row order."""
        return np.concatenate(per_worker)

    def load(self, epoch: int, checkpoint: str | None = None, measure: bool = False) -> float | None:
        """Put the factors that epoch ``epoch`` starts from (a checkpoint's, or the run's start) on the
        workers, each column block with the worker whose row takes it first.

        Returns, when ``measure``, the RMSE of predicting the global mean on the training ratings.
        """
        source = replace(self.source, checkpoint=checkpoint)
        order = self._ring(epoch)
        per_worker = self._gather([
            self.executor.submit(load_share, *self._row_blocks_of(index), name="load_share", worker=address,
                                 source=source, train_id=self.train_id, version=_version(epoch),
                                 rows=self._rows(index), ring_order=order, address=address,
                                 global_mean=self.global_mean, measure=measure)
            for index, address in enumerate(self.workers)])
        sse, n = row_sum(self._by_row(per_worker))
        return math.sqrt(sse / n) if measure and n else None

    def epoch(self, epoch: int, hyper: Hyper, keep: tuple[str, ...], write_start: str | None,
              release_start: bool) -> EpochOutcome:
        """One epoch from version ``epoch`` to ``epoch + 1``, keeping versions ``keep`` on the workers.

        ``write_start``: a checkpoint directory the workers write version ``epoch`` to meanwhile.
        ``release_start``: version ``epoch`` can be read back (a rollback does), so the workers update it in
        place instead of a copy, each row once its blocks are written (if they are). Error sums are added
        block by block in row and column order: never in the order results arrive.
        """
        began = time.perf_counter()
        plan = EpochPlan(train_id=self.train_id, run_id=uuid.uuid4().hex, epoch=epoch, ring=self._ring(epoch),
                         next_ring=self._ring(epoch + 1), seed=self.cfg.seed, hyper=hyper, k=self.source.k,
                         workers=self.workers, start=_version(epoch), end=_version(epoch + 1), keep=keep,
                         validate=self.validate, write_start=write_start, release_start=release_start)
        outcomes = self._gather([
            self.executor.submit(epoch_share, *self._row_blocks_of(index), name="epoch_share", worker=address,
                                 plan=plan, index=index, threads=self.executor.threads[address])
            for index, address in enumerate(self.workers)])
        train_sse = float(row_sum(self._by_row([o.sse for o in outcomes]).reshape(-1)))
        validation = row_sum(self._by_row([o.validation for o in outcomes]).reshape(-1, 3))
        files = {name: entry.sha256 for o in outcomes for name, entry in o.files.items()}
        val_rmse = math.sqrt(validation[0] / validation[2]) if self.validate and validation[2] else None
        return EpochOutcome(math.sqrt(train_sse / self.blocks.n_split(TRAIN)), val_rmse,
                            time.perf_counter() - began, files)

    def write(self, version: str, url: str) -> dict[str, FileEntry]:
        """The workers write ``version``'s blocks at ``url`` (a checkpoint's or a model's); the files written."""
        written = self._gather([
            self.executor.submit(write_version_share, name="write_version_share", worker=address,
                                 train_id=self.train_id, version=version, address=address, url=url)
            for address in self.workers])
        return {name: entry for files in written for name, entry in files.items()}

    def close(self) -> None:
        try:
            self.executor.run_everywhere(release_training, self.train_id)
        except Exception as exc:  # the cluster may be what failed; its workers drop the run with it
            log.debug("could not release training %s: %r", self.train_id, exc)


@dataclass
class _Loop:
    """Where the epoch loop is: what a checkpoint's ``state.json`` keeps."""

    epoch: int
    lr: float
    rollbacks: int
    exploded_at: float
    history: list[EpochReport]
    best: tuple[float, int] | None = None  # (validation RMSE, epoch)

    @classmethod
    def resumed(cls, checkpoint: Checkpoint, cfg: TrainConfig) -> _Loop:
        state = checkpoint.state
        lr = state.lr
        if state.train_lr != cfg.lr:  # a forced resume with a new train.lr starts the step size afresh
            log.warning("train.lr changed from %g to %g: step size reset to %g", state.train_lr, cfg.lr, cfg.lr)
            lr = cfg.lr
        best = None if state.best_epoch is None or state.best_val is None else (state.best_val, state.best_epoch)
        return cls(state.epoch, lr, state.rollbacks, state.exploded_at, list(state.history), best)

    def state(self, cfg: TrainConfig) -> LoopState:
        return LoopState(epoch=self.epoch, lr=self.lr, train_lr=cfg.lr, rollbacks=self.rollbacks,
                         exploded_at=self.exploded_at, history=tuple(self.history),
                         best_epoch=self.best[1] if self.best else None, best_val=self.best[0] if self.best else None)

    def roll_back(self, cfg: TrainConfig, epoch: int, train_rmse: float) -> None:
        """The epoch after ``epoch`` diverged: halve the step for another try, or raise after the last."""
        where = f"epoch {epoch + 1} (train RMSE {train_rmse:.4g})"
        self.rollbacks += 1
        if self.rollbacks > cfg.max_rollbacks:
            raise TrainingDiverged(
                f"training diverged at {where} with train.lr {self.lr:.4g} after {cfg.max_rollbacks} "
                f"rollbacks; lower train.lr (e.g. --set train.lr={self.lr / 4:.3g}) or raise model.reg")
        log.warning("%s diverged at lr %.4g: rolled back to the state after epoch %d, lr halved to %.4g",
                    where, self.lr, epoch, self.lr / 2)
        self.lr /= 2

    def accept(self, report: EpochReport, cfg: TrainConfig) -> None:
        """Take an epoch that did not diverge: its report, the next step size, the best epoch so far."""
        self.history.append(report)
        self.lr = _next_lr(self.lr, cfg, self.history)
        self.epoch = report.epoch
        if cfg.early_stopping_patience and report.val_rmse is not None and (
                self.best is None or report.val_rmse < self.best[0]):
            self.best = (report.val_rmse, self.epoch)

    def kept(self) -> tuple[str, ...]:
        """The factor versions the workers keep besides the newest: the best epoch's."""
        return (_version(self.best[1]),) if self.best else ()


class _Callback:
    """A part of the loop that watches it: asked before each epoch whether to stop and where to write a
    checkpoint, told after it ran and after it was accepted, and at the end."""

    def stops(self, loop: _Loop) -> bool:
        return False

    def write_start_to(self, epoch: int) -> str | None:
        return None

    def ran(self, epoch: int, outcome: EpochOutcome, loop: _Loop) -> None:
        pass

    def accepted(self, loop: _Loop) -> None:
        pass

    def finished(self, session: _Session, loop: _Loop) -> None:
        pass


class _EarlyStopping(_Callback):
    """Stop once validation has not improved for ``patience`` epochs; the best epoch's factors are kept."""

    def __init__(self, patience: int) -> None:
        self.patience = patience

    def stops(self, loop: _Loop) -> bool:
        # Counted only once validation has improved on the first epoch: before the factors grow from their
        # small initial values, validation can rise for many epochs and then fall far below where it began.
        if loop.best is None or loop.best[1] <= 1 or loop.epoch - loop.best[1] < self.patience:
            return False
        log.info("early stop: validation RMSE has not improved for %d epochs; keeping epoch %d", self.patience,
                 loop.best[1])
        return True


class _Checkpointing(_Callback):
    """Every ``checkpoint_every`` epochs and after the last, a checkpoint: the workers write an epoch's factors
    while the next epoch runs, and the driver commits them with the loop's state when it returns."""

    def __init__(self, store: CheckpointStore, cfg: TrainConfig) -> None:
        self.store, self.cfg = store, cfg
        self.unwritten: dict[int, LoopState] = {}  # epoch → the loop's state after it, until committed

    def write_start_to(self, epoch: int) -> str | None:
        return self.store.prepare(epoch) if epoch in self.unwritten else None

    def ran(self, epoch: int, outcome: EpochOutcome, loop: _Loop) -> None:
        if epoch in self.unwritten:  # the start version was written whatever this epoch turns out to be
            self._commit(epoch, outcome.files, loop)

    def accepted(self, loop: _Loop) -> None:
        if loop.epoch % self.cfg.checkpoint_every == 0 or loop.epoch == self.cfg.epochs:
            self.unwritten[loop.epoch] = loop.state(self.cfg)

    def finished(self, session: _Session, loop: _Loop) -> None:
        if loop.epoch in self.unwritten:  # the last checkpoint has no next epoch to hide behind
            written = session.write(_version(loop.epoch), self.store.prepare(loop.epoch))
            self._commit(loop.epoch, {name: entry.sha256 for name, entry in written.items()}, loop)

    def _commit(self, epoch: int, files: dict[str, str], loop: _Loop) -> None:
        began = time.perf_counter()
        self.store.commit(files, self.unwritten.pop(epoch), protect=loop.best[1] if loop.best else None)
        log.debug("checkpoint of epoch %d committed in %.3fs", epoch, time.perf_counter() - began)


def train(executor: Executor, placement: BlockPlacement, row_blocks: list[Any], model: ModelConfig,
          cfg: TrainConfig, save: Callable[[TrainResult, BlockWriter], None],
          on_epoch: Callable[[EpochReport], None] = lambda report: None,
          checkpoints: CheckpointStore | None = None, resume: Checkpoint | None = None,
          warm: WarmStart | None = None) -> TrainResult:
    """Run DSGD epochs up to ``cfg.epochs``, then ``save(result, write_blocks)`` the final (or, with early
    stopping, the best) factors: ``write_blocks(url)`` has the workers write their blocks there.

    With ``checkpoints``, every ``cfg.checkpoint_every`` epochs the workers write
    their factor blocks and the driver the state and manifest. ``resume``
    continues from a checkpoint exactly where the run that wrote it was.
    ``warm`` starts known users and items from a previous model's factors
    instead of random ones. Workers lost mid-epoch: training starts again from
    the newest checkpoint on the workers that are left, with ``row_blocks``
    loaded again in place, and ``on_epoch`` is not called again for the epochs
    it replays.
    """
    reported = 0

    def report_once(report: EpochReport) -> None:
        nonlocal reported
        if report.epoch > reported:
            on_epoch(report)
            reported = report.epoch

    start, restarts = resume, 0
    while True:
        session = _Session(executor, placement, row_blocks, model, cfg, warm)
        try:
            return _train(session, model, cfg, save, report_once, checkpoints, start)
        except WorkersLost as exc:
            restarts += 1
            if restarts > _MAX_RESTARTS:
                raise ClusterError(f"{exc}; training was restarted {_MAX_RESTARTS} times already") from exc
            executor.refresh()
            if not executor.workers:
                raise ClusterError(f"{exc}; no worker is left") from exc
            # Dask would recompute a lost worker's row blocks pinned to it, and never run them once every
            # such worker is gone: load them all again on the new owners, in the list the caller shares.
            executor.cancel(row_blocks)
            row_blocks[:] = placement.load_row_blocks()
            start = (checkpoints.latest(strict=False) if checkpoints is not None else None) or resume
            log.warning("%s mid-epoch: training again from %s on %d workers", exc,
                        f"the checkpoint of epoch {start.epoch}" if start else "the start", len(executor.workers))
        finally:
            session.close()


def _started(session: _Session, cfg: TrainConfig, checkpoints: CheckpointStore | None,
             start: Checkpoint | None) -> _Loop:
    """The loop's state, with the factors it starts from on the workers (the best epoch's, if another, stay in
    its checkpoint until the model is written)."""
    if start is None:
        return _Loop(0, cfg.lr, 0, _EXPLODED_FACTOR * (session.load(0, measure=True) or 1.0), [])
    loop = _Loop.resumed(start, cfg)
    session.load(loop.epoch, start.url)
    log.info("resuming after epoch %d from %s", loop.epoch, start.url)
    return loop


def _train(session: _Session, model: ModelConfig, cfg: TrainConfig, save: Callable[[TrainResult, BlockWriter], None],
           on_epoch: Callable[[EpochReport], None], checkpoints: CheckpointStore | None,
           start: Checkpoint | None) -> TrainResult:
    if cfg.early_stopping_patience and not session.validate and start is None:
        log.warning("early stopping is on (train.early_stopping_patience %d) but there is no validation split: "
                    "all %d epochs run and the last is kept%s", cfg.early_stopping_patience, cfg.epochs,
                    "; the bold driver watches the training loss" if cfg.lr_schedule == "bold_driver" else "")
    loop = _started(session, cfg, checkpoints, start)
    n_train = session.blocks.n_split(TRAIN)
    callbacks: list[_Callback] = []
    if cfg.early_stopping_patience:
        callbacks.append(_EarlyStopping(cfg.early_stopping_patience))
    if checkpoints is not None:
        callbacks.append(_Checkpointing(checkpoints, cfg))

    first_epoch = loop.epoch
    # Epochs whose factors a checkpoint holds (the best epoch's checkpoint is never pruned): the workers need
    # not keep them. A resumed run's best epoch, if not the one it resumes from, is one of them.
    on_disk = {loop.best[1]} if start is not None and loop.best is not None else set()
    while loop.epoch < cfg.epochs and not any(c.stops(loop) for c in callbacks):
        epoch = loop.epoch
        write_start = next((url for c in callbacks if (url := c.write_start_to(epoch))), None)
        if write_start is not None:
            on_disk.add(epoch)
        hyper = Hyper(lr=loop.lr, reg=model.reg, bias_reg=model.bias_reg, use_bias=model.use_bias,
                      global_mean=session.global_mean, order=cfg.order, users_per_run=cfg.users_per_run,
                      tile_items=cfg.tile_items)
        # The start version need not stay in memory beside the epoch's copies where it can be read back: the
        # checkpoint being written of it, or where the first epoch's came from. Then the workers hold their
        # share of the factors once, not twice; a rollback, or the model's write, reads it back.
        keep = () if loop.best is None or loop.best[1] in on_disk else loop.kept()
        readable = write_start is not None or epoch == first_epoch
        released = readable and _version(epoch) not in keep
        outcome = session.epoch(epoch, hyper, keep, write_start, release_start=released)
        for c in callbacks:
            c.ran(epoch, outcome, loop)
        if outcome.diverged(loop.exploded_at):
            loop.roll_back(cfg, epoch, outcome.train_rmse)
            if released:  # the epoch updated its start in place: read it back from where it can be read
                if write_start is not None and checkpoints is not None:
                    session.load(epoch, checkpoints.at(epoch).url)
                else:
                    session.load(epoch, start.url if start is not None else None)
            continue
        report = EpochReport(epoch=epoch + 1, train_rmse=outcome.train_rmse, val_rmse=outcome.val_rmse, lr=loop.lr,
                             seconds=outcome.seconds, ratings_per_second=n_train / outcome.seconds)
        on_epoch(report)
        loop.accept(report, cfg)
        for c in callbacks:
            c.accepted(loop)

    for c in callbacks:
        c.finished(session, loop)
    result = TrainResult(history=loop.history, best_epoch=loop.best[1] if loop.best else loop.epoch)
    if result.best_epoch != loop.epoch and result.best_epoch in on_disk and checkpoints is not None:
        session.load(result.best_epoch, checkpoints.at(result.best_epoch).url)
    save(result, lambda url: session.write(_version(result.best_epoch), url))
    return result
