"""The DSGD driver: epochs of strata of block updates on the workers.

Row block r (its ratings and its user state ``(P_r, b_r)``) lives on one worker
for the whole run; item states ``(Q_c, b_c)`` travel between workers. Each
block update is a task whose inputs are the futures of the latest ``P_r`` and
``Q_c``, so the stratum barrier holds per block through data dependencies: a
block of stratum s+1 starts as soon as the two blocks of stratum s it depends
on are done, and no two running tasks ever share a factor block. The result is
the same bits as with a global barrier, whatever the number of workers.
"""

from __future__ import annotations

import logging
import math
import operator
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.blocking import Blocks
from pipeline.checkpoints import Checkpoint, CheckpointStore
from pipeline.cluster import Executor
from pipeline.config import ModelConfig, TrainConfig
from pipeline.errors import TrainingDiverged
from pipeline.schedule import (
    STREAM_ITEM_INIT,
    STREAM_USER_INIT,
    block_order_seed,
    init_seed,
    strata,
)
from tasks.blocks import TRAIN, VALIDATION, load_row_block
from tasks.hashing import SALT_COLUMNS, SALT_ROWS, block_layout
from tasks.training import Hyper, init_factors, row_errors, sgd_update, warm_factors

log = logging.getLogger(__name__)

# SGD that ends an epoch this much worse than the random start has diverged.
_EXPLODED_FACTOR = 2.0


@dataclass(frozen=True)
class EpochReport:
    epoch: int
    train_rmse: float
    val_rmse: float | None
    lr: float
    seconds: float
    ratings_per_second: float

    def row(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "train_rmse": self.train_rmse, "val_rmse": self.val_rmse, "lr": self.lr,
                "seconds": round(self.seconds, 4), "ratings_per_second": round(self.ratings_per_second, 1)}


@dataclass(frozen=True)
class Factors:
    """A trained model in global index order.

    ``P`` (n_users, k) float32, ``Q`` (n_items, k) float32, ``user_bias``
    (n_users,) float32, ``item_bias`` (n_items,) float32; ``global_mean`` is 0.0
    for a k-only model.
    """

    P: np.ndarray
    Q: np.ndarray
    user_bias: np.ndarray
    item_bias: np.ndarray
    global_mean: float


@dataclass(frozen=True)
class WarmStart:
    """A previous model to start from: ``user_previous[u]`` is new user u's row in it, or -1; items alike."""

    model_dir: Path
    user_previous: np.ndarray
    item_previous: np.ndarray


@dataclass(frozen=True)
class TrainResult:
    factors: Factors
    history: list[EpochReport]
    best_epoch: int


class BlockPlacement:
    """Which worker owns each row block, and the users / items of every block."""

    def __init__(self, executor: Executor, blocks: Blocks) -> None:
        self.executor = executor
        self.blocks = blocks
        self.user_members = block_layout(blocks.n_users, blocks.d, blocks.seed, SALT_ROWS)[2]
        self.item_members = block_layout(blocks.n_items, blocks.d, blocks.seed, SALT_COLUMNS)[2]

    def owner(self, row: int) -> str | None:
        workers = self.executor.workers
        return workers[row % len(workers)]

    def load_row_blocks(self) -> list[Any]:
        """Futures of the d row blocks, each read from Parquet on its owner."""
        b = self.blocks
        return [
            self.executor.submit(load_row_block, str(b.root), r, b.d, b.n_users, b.n_items, b.seed,
                                 name="load_row_block", worker=self.owner(r))
            for r in range(b.d)
        ]


def submit_row_errors(executor: Executor, placement: BlockPlacement, row_blocks: list[Any], user_states: list[Any],
                      item_states: list[Any], global_mean: float, splits: tuple[int, ...]) -> list[Any]:
    """Futures of each row block's error sums over ``splits`` (see :func:`tasks.training.row_errors`)."""
    return [executor.submit(row_errors, row_blocks[r], user_states[r], item_states, global_mean, splits,
                            name="row_errors", worker=placement.owner(r))
            for r in range(len(row_blocks))]


def summed_row_errors(executor: Executor, futures: list[Any]) -> np.ndarray:
    """The sum of :func:`submit_row_errors`' results, array of shape (3, d, 3): ``[split, col] = (Σe², Σ|e|, n)``.

    Row blocks are added in row order, never in the order results arrive.
    """
    total = np.zeros((3, len(futures), 3))
    for per_row in executor.gather(futures):
        total += per_row
    return total


def sum_row_errors(executor: Executor, placement: BlockPlacement, row_blocks: list[Any], user_states: list[Any],
                   item_states: list[Any], global_mean: float, splits: tuple[int, ...]) -> np.ndarray:
    """Error sums of all blocks over ``splits`` (see :func:`summed_row_errors`)."""
    return summed_row_errors(executor, submit_row_errors(executor, placement, row_blocks, user_states, item_states,
                                                         global_mean, splits))


def _all_finite(values: list[float]) -> bool:
    return all(math.isfinite(v) for v in values)


def rmse(errors: np.ndarray, code: int) -> float | None:
    sse, _, n = errors[code].sum(axis=0)
    return math.sqrt(sse / n) if n else None


def _gather_factors(executor: Executor, placement: BlockPlacement, user_states: list[Any], item_states: list[Any],
                    k: int, global_mean: float) -> Factors:
    b = placement.blocks
    P = np.empty((b.n_users, k), dtype=np.float32)
    Q = np.empty((b.n_items, k), dtype=np.float32)
    user_bias = np.empty(b.n_users, dtype=np.float32)
    item_bias = np.empty(b.n_items, dtype=np.float32)
    for members, (factors, bias) in zip(placement.user_members, executor.gather(user_states)):
        P[members], user_bias[members] = factors, bias
    for members, (factors, bias) in zip(placement.item_members, executor.gather(item_states)):
        Q[members], item_bias[members] = factors, bias
    return Factors(P, Q, user_bias, item_bias, global_mean)


def _next_lr(lr: float, cfg: TrainConfig, train_rmse: float, previous: float | None) -> float:
    if cfg.lr_schedule == "bold_driver":
        return lr * (1.05 if previous is None or train_rmse < previous else 0.5)
    if cfg.lr_schedule == "decay":
        return lr * cfg.lr_decay
    return lr


def train(executor: Executor, placement: BlockPlacement, row_blocks: list[Any], model: ModelConfig,
          cfg: TrainConfig, on_epoch: Callable[[EpochReport], None] = lambda report: None,
          checkpoints: CheckpointStore | None = None, resume: Checkpoint | None = None,
          warm: WarmStart | None = None) -> TrainResult:
    """Run DSGD epochs up to ``cfg.epochs``; return the final (or, with early stopping, the best) factors.

    With ``checkpoints``, every ``cfg.checkpoint_every`` epochs the state is written
    and the next epoch starts from the checkpoint's arrays, so the task graph
    never holds more than the epochs since. ``resume`` continues from a
    checkpoint exactly where the run that wrote it was. ``warm`` starts known
    users and items from a previous model's factors instead of random ones.
    """
    blocks = placement.blocks
    d, k = blocks.d, model.k
    root = np.random.SeedSequence(cfg.seed)
    global_mean = blocks.global_mean if model.use_bias else 0.0
    n_train = blocks.n_split(TRAIN)
    owners = [placement.owner(r) for r in range(d)]

    best: tuple[float, int, list[Any], list[Any]] | None = None
    if resume is None:
        def init(side: int, r: int, members: np.ndarray) -> Any:
            name = "init_user_factors" if side == STREAM_USER_INIT else "init_item_factors"
            seed = init_seed(root, side, r)
            if warm is None:
                return executor.submit(init_factors, len(members), k, model.init_std, seed, name=name,
                                       worker=owners[r])
            previous = (warm.user_previous if side == STREAM_USER_INIT else warm.item_previous)[members]
            return executor.submit(warm_factors, len(members), k, model.init_std, seed, str(warm.model_dir),
                                   "user" if side == STREAM_USER_INIT else "item", previous, name=name,
                                   worker=owners[r])

        user_states = [init(STREAM_USER_INIT, r, m) for r, m in enumerate(placement.user_members)]
        item_states = [init(STREAM_ITEM_INIT, c, m) for c, m in enumerate(placement.item_members)]
        start = sum_row_errors(executor, placement, row_blocks, user_states, item_states, global_mean, (TRAIN,))
        exploded_at = _EXPLODED_FACTOR * (rmse(start, TRAIN) or 1.0)
        lr, epoch, rollbacks = cfg.lr, 0, 0
        history: list[EpochReport] = []
    else:
        state = resume.state
        user_states, item_states = CheckpointStore.load(executor, owners, resume, d)
        exploded_at, lr, epoch, rollbacks = state["exploded_at"], state["lr"], resume.epoch, state["rollbacks"]
        if state["train_lr"] != cfg.lr:  # a forced resume with a new train.lr starts the step size afresh
            log.warning("train.lr changed from %g to %g: step size reset to %g", state["train_lr"], cfg.lr, cfg.lr)
            lr = cfg.lr
        history = [EpochReport(**row) for row in state["history"]]
        if state["best_epoch"] is not None and checkpoints is not None:
            best = (state["best_val"], state["best_epoch"],
                    *CheckpointStore.load(executor, owners, checkpoints.at(state["best_epoch"]), d))
        log.info("resuming after epoch %d from %s", epoch, resume.url)

    while epoch < cfg.epochs:
        began = time.perf_counter()
        hyper = Hyper(lr=lr, reg=model.reg, bias_reg=model.bias_reg, use_bias=model.use_bias,
                      global_mean=global_mean, order=cfg.order, users_per_run=cfg.users_per_run,
                      tile_items=cfg.tile_items)
        new_users, new_items = list(user_states), list(item_states)
        stratum_sse: list[list[Any]] = []
        bad_stratum = None
        for s, stratum in enumerate(strata(d, epoch, root)):
            stratum_sse.append([])
            for r, c in stratum:
                label = f"epoch {epoch} stratum {s} block {r},{c}"
                result = executor.submit(sgd_update, row_blocks[r], c, new_users[r], new_items[c], hyper,
                                         block_order_seed(root, epoch, s, r, c), label,
                                         name="sgd_update", worker=owners[r])
                new_users[r] = executor.submit(operator.getitem, result, 0, name="user_state", worker=owners[r])
                new_items[c] = executor.submit(operator.getitem, result, 1, name="item_state", worker=owners[r])
                stratum_sse[s].append(executor.submit(operator.getitem, result, 2, name="block_sse",
                                                      worker=owners[r]))
            # Check the stratum before this one: its blocks are done or nearly so, and the
            # workers stay busy with this one meanwhile.
            if s > 0 and not _all_finite(executor.gather(stratum_sse[s - 1])):
                bad_stratum = s - 1
                break
        # Queued behind the last stratum now, not after the driver has seen it finish: a
        # round trip less per epoch. Dropped unread if that stratum turns out bad.
        validation = (submit_row_errors(executor, placement, row_blocks, new_users, new_items, global_mean,
                                        (VALIDATION,)) if bad_stratum is None else [])
        if bad_stratum is None and not _all_finite(executor.gather(stratum_sse[-1])):
            bad_stratum = len(stratum_sse) - 1
        if bad_stratum is None:
            # The training RMSE is the one the pass met (as LIBMF and Surprise report it): a
            # second pass over all training ratings would cost a fifth of the epoch.
            train_rmse = math.sqrt(sum(executor.gather([f for fs in stratum_sse for f in fs])) / n_train)
            val_rmse = rmse(summed_row_errors(executor, validation), VALIDATION)
            where = f"epoch {epoch + 1} (train RMSE {train_rmse:.4g})"
        else:
            train_rmse, val_rmse = math.inf, None
            where = f"epoch {epoch + 1} stratum {bad_stratum + 1} (non-finite factors)"
        seconds = time.perf_counter() - began

        if not math.isfinite(train_rmse) or train_rmse > exploded_at or not math.isfinite(val_rmse or 0.0):
            rollbacks += 1
            if rollbacks > cfg.max_rollbacks:
                raise TrainingDiverged(
                    f"training diverged at {where} with train.lr {lr:.4g} after {cfg.max_rollbacks} "
                    f"rollbacks; lower train.lr (e.g. --set train.lr={lr / 4:.3g}) or raise model.reg")
            log.warning("%s diverged at lr %.4g: rolled back to the state after epoch %d, lr halved to %.4g",
                        where, lr, epoch, lr / 2)
            lr /= 2
            continue

        report = EpochReport(epoch=epoch + 1, train_rmse=train_rmse, val_rmse=val_rmse, lr=lr, seconds=seconds,
                             ratings_per_second=n_train / seconds)
        history.append(report)
        on_epoch(report)
        previous = history[-2].train_rmse if len(history) > 1 else None
        lr = _next_lr(lr, cfg, train_rmse, previous)
        user_states, item_states = new_users, new_items
        epoch += 1

        if cfg.early_stopping_patience and val_rmse is not None:
            if best is None or val_rmse < best[0]:
                best = (val_rmse, epoch, user_states, item_states)
            elif epoch - best[1] >= cfg.early_stopping_patience:
                log.info("early stop: validation RMSE has not improved for %d epochs; keeping epoch %d",
                         cfg.early_stopping_patience, best[1])
                break

        if checkpoints is not None and (epoch % cfg.checkpoint_every == 0 or epoch == cfg.epochs):
            state = {"lr": lr, "train_lr": cfg.lr, "rollbacks": rollbacks, "exploded_at": exploded_at,
                     "history": [asdict(r) for r in history],
                     "best_epoch": best[1] if best else None, "best_val": best[0] if best else None}
            began = time.perf_counter()
            written = checkpoints.write(executor, owners, epoch, user_states, item_states, state,
                                        protect=best[1] if best else None)
            log.debug("checkpoint of epoch %d written in %.3fs", epoch, time.perf_counter() - began)
            # Start the next epoch from the files: the lineage ends here, and resuming
            # from this checkpoint later starts from exactly the same arrays.
            user_states, item_states = CheckpointStore.load(executor, owners, written, d)

    best_epoch = epoch
    if best is not None:
        _, best_epoch, user_states, item_states = best
    factors = _gather_factors(executor, placement, user_states, item_states, k, global_mean)
    return TrainResult(factors=factors, history=history, best_epoch=best_epoch)
