"""A trained model measured on the workers: the column blocks of the model pass each worker's rows once.

Evaluation and top-N both need every (user, item) pair of a row block's users,
and neither needs a worker to hold more than its share: the model's column
blocks rotate past the rows (:func:`funkflow.tasks.epoch.rotate`, the ring of
training, with nothing updated) and each worker keeps only its rows' error sums
and running top-N lists (:class:`funkflow.tasks.recommend.RunningTop`). Every
sum is per block, added on the driver in row and column order, and a top-N list
does not depend on the order blocks come in, so the results are the same on any
cluster.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from funkflow.tasks.blocks import TEST, TRAIN, RowBlock
from funkflow.tasks.epoch import Mailbox, Send, rotate, rows_of
from funkflow.tasks.hashing import SALT_COLUMNS, block_layout
from funkflow.tasks.recommend import (
    RANKERS,
    RunningTop,
    popular_unseen,
    ranking_sums,
    relevant_test_items,
)
from funkflow.tasks.training import FactorState, block_error_sums

MEASURED_SPLITS = (TRAIN, TEST)


@dataclass(frozen=True)
class Ranking:
    """Ranking metrics at ``k`` of the users with a test rating of at least ``threshold`` (among the global
    indices ``wanted``, when given), for the model's lists and for the most popular unseen items."""

    k: int
    threshold: float
    popular: np.ndarray  # (n_items,) int64: the items from the most rated down (tasks.recommend.by_popularity)
    wanted: np.ndarray | None = None


@dataclass(frozen=True)
class MeasurePlan:
    """One measuring rotation of a model (plain values, cheap to ship).

    ``errors``: measure the training and test error sums. ``top`` with ``users``: each of those users' (global
    indices; None: every user) top-``top`` unseen items. ``ranking``: ranking metrics. The column blocks take
    the identity ring: position ``j`` holds block ``j``.
    """

    run_id: str
    workers: tuple[str | None, ...]
    d: int
    block_seed: int
    n_items: int
    k: int
    global_mean: float
    errors: bool = True
    top: int = 0
    users: np.ndarray | None = None
    ranking: Ranking | None = None

    @property
    def ring(self) -> tuple[int, ...]:
        return tuple(range(self.d))

    def rows_of(self, index: int) -> range:
        return rows_of(index, self.d, len(self.workers))


@dataclass(frozen=True)
class Measured:
    """What one worker's rotation found, for its rows in order.

    ``errors`` (n_rows, d, 2, 3): ``(Σe², Σ|e|, n)`` by row, column block and split (training, test).
    ``users``, ``items``, ``scores``: the top-N lists as rows of global indices, each user's best first.
    ``ranking`` (n_rows, 2, 5): per row and ranker (:data:`funkflow.tasks.recommend.RANKERS`), the sums of
    :func:`funkflow.tasks.recommend.ranking_sums`; ``recommended`` (2, m): the distinct items in the rankers'
    lists (for coverage).
    """

    errors: np.ndarray
    users: np.ndarray
    items: np.ndarray
    scores: np.ndarray
    ranking: np.ndarray
    recommended: tuple[np.ndarray, ...]


def measure_rotation(plan: MeasurePlan, index: int, row_blocks: Mapping[int, RowBlock],
                     users: Mapping[int, FactorState], items: Mapping[int, FactorState], mailbox: Mailbox,
                     send: Send, threads: int, check: Callable[[], None] = lambda: None) -> Measured:
    """Worker ``index``'s part of a measuring rotation: its rows' user states ``users`` meet every column
    block, starting from ``items`` (the blocks at its rows' ring positions). Nothing is updated: the states
    are used as they are where they are in the kernels' layout (:func:`funkflow.tasks.training.training_copy`
    makes them so), so that every worker computes on the same layout."""
    rows = plan.rows_of(index)
    d = plan.d
    item_members = block_layout(plan.n_items, d, plan.block_seed, SALT_COLUMNS)[2]
    errors = np.zeros((len(rows), d, len(MEASURED_SPLITS), 3))
    relevant: dict[int, dict[int, np.ndarray]] = {}
    tops: dict[int, RunningTop] = {}
    for r in rows:
        block = row_blocks[r]
        if plan.ranking is not None:
            relevant[r] = relevant_test_items(block, item_members, plan.ranking.threshold, plan.ranking.wanted)
            chosen = np.fromiter(relevant[r], dtype=np.int64, count=len(relevant[r]))
            tops[r] = RunningTop(chosen, plan.ranking.k)
        elif plan.top:
            local = np.arange(block.n_users) if plan.users is None else \
                np.flatnonzero(np.isin(block.user_ids, plan.users))
            tops[r] = RunningTop(local, plan.top)

    def visit(r: int, c: int, t: int, item: FactorState) -> None:
        block, user = row_blocks[r], users[r]
        if plan.errors:
            for s, code in enumerate(MEASURED_SPLITS):
                errors[r - rows.start, c, s] = block_error_sums(block.split(code)[c], user, item, plan.global_mean)
        if r in tops:
            tops[r].offer(user[0], item[0], item[1], item_members[c], block, c)  # padding columns are zero

    rotate(plan.ring, len(plan.workers), index, items, mailbox, send, threads, visit, visit, check, private=False)

    list_users, list_items, list_scores, ranking = [], [], [], np.zeros((len(rows), len(RANKERS), 5))
    recommended: list[list[np.ndarray]] = [[] for _ in RANKERS]
    for j, r in enumerate(rows):
        if r not in tops:
            continue
        block, top = row_blocks[r], tops[r]
        picked, chosen_items, scores = top.lists()
        if plan.ranking is None:
            shift = plan.global_mean + users[r][1][top.users[picked]]
            list_users.append(block.user_ids[top.users[picked]].astype(np.int64))
            list_items.append(chosen_items)
            list_scores.append((scores + shift).astype(np.float32))
            continue
        wanted = [relevant[r][u] for u in top.users.tolist()]
        popular_rows, popular_items = popular_unseen(block, top.users, plan.ranking.popular, item_members,
                                                     plan.ranking.k)
        for ranker, (list_rows, ranked) in enumerate(((picked, chosen_items), (popular_rows, popular_items))):
            ranking[j, ranker] = ranking_sums(list_rows, ranked, wanted, plan.ranking.k)
            recommended[ranker].append(ranked)
    def joined(parts: list[np.ndarray], dtype: type) -> np.ndarray:
        return np.concatenate(parts) if parts else np.zeros(0, dtype)

    return Measured(errors, joined(list_users, np.int64), joined(list_items, np.int64),
                    joined(list_scores, np.float32), ranking,
                    tuple(np.unique(joined(parts, np.int64)) for parts in recommended))
