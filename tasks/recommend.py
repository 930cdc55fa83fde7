"""Worker side of top-N: a row block's users scored against each column block as it passes, the best kept.

Never a users × items matrix in memory, nor the whole catalogue: as each column
block comes by (:func:`funkflow.tasks.epoch.rotate`), a chunk of users at a
time is scored against it by one matrix product, the items each user rated in
training and validation are masked out, and the block's best are merged into
each user's running top N (:class:`RunningTop`). Ties go to the lower item
index, so the lists are exact and deterministic whatever order the blocks come in.
"""

from __future__ import annotations

import numba
import numpy as np

from funkflow.tasks.blocks import TEST, TRAIN, VALIDATION, RowBlock, group_starts
from funkflow.tasks.counting import placed, places_by_key

CHUNK_USERS = 1024
# Scores held at once per chunk of users (16 MiB of float32). Users meet one column block at a time, so a
# chunk is that block's width; against 2M items in 16 blocks, 64M scores a chunk had been a worker's largest
# allocation (268 MB, more than its share of the item factors).
CHUNK_SCORES = 1 << 22


def users_per_chunk(n_items: int, most: int = CHUNK_USERS) -> int:
    """Users scored at once against ``n_items`` items: ``most``, fewer for a large catalogue."""
    return max(1, min(most, CHUNK_SCORES // max(n_items, 1)))


def positions_in_runs(keys: np.ndarray) -> np.ndarray:
    """0-based position of each element within its run of equal consecutive ``keys``."""
    starts = group_starts(keys)
    return np.arange(keys.shape[0]) - np.repeat(starts, np.diff(np.append(starts, keys.shape[0])))


@numba.jit(nopython=True, nogil=True, cache=True)
def _best_columns(scores: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row's best ``n`` columns, best first, and how many it has: one pass over the row keeping a sorted
    list of n, where a column enters only past a strictly lower score (so ties keep the lower column)."""
    m, width = scores.shape
    columns = np.empty((m, n), dtype=np.int64)
    kept = np.zeros(m, dtype=np.int64)
    best = np.empty(n, dtype=scores.dtype)
    for i in range(m):
        count = 0
        for j in range(width):
            score = scores[i, j]
            if not score > -np.inf:  # excluded (NaN too)
                continue
            if count == n and not score > best[n - 1]:
                continue
            at = count if count < n else n - 1
            while at > 0 and score > best[at - 1]:
                if at < n:
                    best[at], columns[i, at] = best[at - 1], columns[i, at - 1]
                at -= 1
            best[at], columns[i, at] = score, j
            count = min(count + 1, n)
        kept[i] = count
    return columns, kept


def top_n(scores: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The best ``n`` columns of each row of ``scores`` (-inf = excluded), ties to the lower column.

    One numba pass over each row (a partition, a comparison and a ``nonzero`` over 1,000 users × 500k items
    took 3-4x as long).

    Returns
    -------
    (rows, columns) : int64 arrays, row by row, best first; a row with fewer
    than ``n`` finite scores gets fewer.
    """
    m, width = scores.shape
    n = min(n, width)
    if n == 0 or m == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    columns, kept = _best_columns(scores, n)
    take = np.arange(n)[None, :] < kept[:, None]
    return np.repeat(np.arange(m), kept), columns[take]


def rated_by(sorted_users: np.ndarray, chunk: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every rating of the users in ``chunk`` among ratings sorted by user: (j, position) pairs, ``j`` the
    user's place in ``chunk``, found by binary search (the work follows the chunk's ratings)."""
    starts = np.searchsorted(sorted_users, chunk)
    counts = np.searchsorted(sorted_users, chunk, side="right") - starts
    rows = np.repeat(np.arange(chunk.shape[0]), counts)
    return rows, np.repeat(starts, counts) + positions_in_runs(rows)


@numba.jit(nopython=True, nogil=True, cache=True)
def _unseen_into_best(scores: np.ndarray, members: np.ndarray, users: np.ndarray, first: int,
                      train_users: np.ndarray, train_items: np.ndarray, val_users: np.ndarray,
                      val_items: np.ndarray, best_scores: np.ndarray, best_items: np.ndarray) -> None:
    """Merge one column block's scores into the running lists, in one pass: row j of ``scores`` is local user
    ``users[j]`` of the row block (list ``first + j``) against the block's items (global indices
    ``members``, increasing); the items the user rated there in training or validation (``*_users`` sorted)
    are left out. The lists stay best first: by score, then by the lower item index (-1: an empty place)."""
    n = best_scores.shape[1]
    for j in range(users.shape[0]):
        row, user = first + j, users[j]
        for rated_users, rated_items in ((train_users, train_items), (val_users, val_items)):
            lo = np.searchsorted(rated_users, user)
            hi = np.searchsorted(rated_users, user, side="right")
            for p in range(lo, hi):
                scores[j, rated_items[p]] = -np.inf
        for i in range(scores.shape[1]):
            score = scores[j, i]
            if not score > -np.inf:  # rated (NaN too)
                continue
            item = members[i]
            worst_score, worst_item = best_scores[row, n - 1], best_items[row, n - 1]
            if worst_item >= 0 and (score < worst_score or (score == worst_score and item > worst_item)):
                continue
            at = n - 1
            while at > 0 and (best_items[row, at - 1] < 0 or score > best_scores[row, at - 1]
                              or (score == best_scores[row, at - 1] and item < best_items[row, at - 1])):
                best_scores[row, at], best_items[row, at] = best_scores[row, at - 1], best_items[row, at - 1]
                at -= 1
            best_scores[row, at], best_items[row, at] = score, item


class RunningTop:
    """The best ``n`` items so far of each of a row block's chosen users, over the column blocks offered,
    best first, ties to the lower item index: the lists are exact whatever order the blocks come in.

    ``users``: the chosen users' local indices in the row block, sorted. Memory: users × n, whatever the
    catalogue.
    """

    def __init__(self, users: np.ndarray, n: int) -> None:
        self.users = users
        self.n = n
        self.scores = np.full((users.shape[0], n), -np.inf, dtype=np.float32)
        self.items = np.full((users.shape[0], n), -1, dtype=np.int64)
        self._P: np.ndarray | None = None

    def offer(self, P: np.ndarray, Q: np.ndarray, item_bias: np.ndarray, members: np.ndarray,
              row_block: RowBlock, col: int) -> None:
        """Score the users (their rows of ``P``) against column block ``col`` (factors ``Q``, biases
        ``item_bias``, global item indices ``members``): one matrix product, then one pass that leaves out what
        each rated and keeps the best."""
        if self._P is None:  # the chosen users' factors, gathered once for every block that comes by
            self._P = np.ascontiguousarray(P[self.users], dtype=np.float32)
        train, val = row_block.split(TRAIN)[col], row_block.split(VALIDATION)[col]
        members = members.astype(np.int64)
        Q = np.asarray(Q, dtype=np.float32)
        chunk_users = users_per_chunk(Q.shape[0])
        for start in range(0, self.users.shape[0], chunk_users):
            scores = self._P[start:start + chunk_users] @ Q.T
            scores += item_bias[None, :]
            _unseen_into_best(scores, members, self.users[start:start + chunk_users], start, train.users,
                              train.items, val.users, val.items, self.scores, self.items)

    def lists(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(user rows into ``users``, global items, scores), row by row, best first; rows with fewer than
        ``n`` candidates have fewer."""
        rows, places = np.nonzero(self.items >= 0)
        return rows, self.items[rows, places], self.scores[rows, places]


def recommend_users(users: np.ndarray, P: np.ndarray, user_bias: np.ndarray, Q: np.ndarray, item_bias: np.ndarray,
                    global_mean: float, top: int, seen_users: np.ndarray, seen_items: np.ndarray,
                    chunk_users: int = CHUNK_USERS) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-``top`` items of each of ``users`` (global indices) from factors in memory, leaving out the pairs
    (``seen_users``, ``seen_items``), which are sorted by user: a model without training blocks, such as one
    with folded-in users, whose ratings are the pairs.

    Returns
    -------
    (users, items, scores) as :func:`recommend_row` does.
    """
    out_users, out_items, out_scores = [], [], []
    chunk_users = users_per_chunk(Q.shape[0], chunk_users)
    for start in range(0, users.shape[0], chunk_users):
        chunk = users[start:start + chunk_users]
        scores = np.asarray(P[chunk], dtype=np.float32) @ np.asarray(Q, dtype=np.float32).T
        scores += item_bias[None, :]
        rows, positions = rated_by(seen_users, chunk)
        scores[rows, seen_items[positions]] = -np.inf
        r, items = top_n(scores, top)
        out_users.append(chunk[r])
        out_items.append(items)
        out_scores.append((scores[r, items] + global_mean + user_bias[chunk[r]]).astype(np.float32))
    if not out_users:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    return np.concatenate(out_users), np.concatenate(out_items), np.concatenate(out_scores)


@numba.jit(nopython=True, nogil=True, cache=True)
def _first_unseen(ranked: np.ndarray, users: np.ndarray, bounds: np.ndarray, rated: np.ndarray, top: int,
                  n_items: int) -> tuple[np.ndarray, np.ndarray]:
    """For each of the local ``users``, the first ``top`` items of ``ranked`` it did not rate (its rated items
    are ``rated[bounds[u]:bounds[u + 1]]``), as (user rows, items): each user costs its ratings and its list,
    not the catalogue."""
    seen = np.zeros(n_items, dtype=np.bool_)
    rows = np.empty(users.shape[0] * top, dtype=np.int64)
    items = np.empty(users.shape[0] * top, dtype=np.int64)
    out = 0
    for j in range(users.shape[0]):
        u = users[j]
        for p in range(bounds[u], bounds[u + 1]):
            seen[rated[p]] = True
        found = 0
        for item in ranked:
            if found == top:
                break
            if not seen[item]:
                rows[out], items[out] = j, item
                out += 1
                found += 1
        for p in range(bounds[u], bounds[u + 1]):
            seen[rated[p]] = False
    return rows[:out], items[:out]


def by_popularity(counts: np.ndarray) -> np.ndarray:
    """Global item indices from the most rated down, ties to the lower index: the popularity baseline's order."""
    return np.lexsort((np.arange(counts.shape[0]), -counts.astype(np.float64)))


def popular_unseen(row_block: RowBlock, users: np.ndarray, ranked: np.ndarray, item_members: list[np.ndarray],
                   top: int) -> tuple[np.ndarray, np.ndarray]:
    """The popularity baseline: the first ``top`` items of ``ranked`` (:func:`by_popularity`) that each of the
    local ``users`` has not rated in training or validation, as (user rows into ``users``, global items), best
    first."""
    chosen = np.zeros(row_block.n_users, dtype=np.bool_)
    chosen[users] = True
    rated_users, rated_items = [], []
    for code in (TRAIN, VALIDATION):
        for block, members in zip(row_block.split(code), item_members):
            mine = chosen[block.users]
            rated_users.append(block.users[mine])
            rated_items.append(members[block.items[mine]])
    by_user, bounds = places_by_key(np.concatenate(rated_users), row_block.n_users)
    return _first_unseen(ranked, users, bounds, placed(np.concatenate(rated_items), by_user), top, ranked.shape[0])


@numba.jit(nopython=True, nogil=True, cache=True)
def _ranking_sums(rows: np.ndarray, items: np.ndarray, relevant: np.ndarray, bounds: np.ndarray, k: int,
                  discount: np.ndarray, ideal_gain: np.ndarray) -> np.ndarray:
    """:func:`ranking_sums` over flat arrays: user j's relevant items are
    ``relevant[bounds[j]:bounds[j + 1]]``, sorted; the users are added up in order."""
    total = np.zeros(5)
    p = 0
    for j in range(bounds.shape[0] - 1):
        lo, hi = bounds[j], bounds[j + 1]
        hits, gain, precisions, place = 0, 0.0, 0.0, 0
        while p < rows.shape[0] and rows[p] == j:
            if place < k:
                at = lo + np.searchsorted(relevant[lo:hi], items[p])
                if at < hi and relevant[at] == items[p]:
                    hits += 1
                    gain += discount[place]
                    precisions += hits / (place + 1)
            place += 1
            p += 1
        ideal = min(k, hi - lo)
        total[0] += hits / k
        total[1] += hits / (hi - lo)
        total[2] += gain / ideal_gain[ideal]
        total[3] += precisions / ideal
        total[4] += 1
    return total


# Whose top-N lists the ranking metrics judge: the model's, and the popularity baseline's.
RANKERS = ("model", "popularity")


def relevant_test_items(row_block: RowBlock, item_members: list[np.ndarray], threshold: float,
                        wanted: np.ndarray | None) -> dict[int, np.ndarray]:
    """Local user → the global items it rated at least ``threshold`` in the test split (only users among the
    global indices ``wanted``, if given), sorted by user."""
    test = row_block.whole(TEST, item_members)
    good = test.ratings >= threshold
    users, items = test.users[good].astype(np.int64), test.items[good].astype(np.int64)
    if wanted is not None:
        keep = np.isin(row_block.user_ids[users], wanted)
        users, items = users[keep], items[keep]
    order = np.lexsort((items, users))
    users, items = users[order], items[order]
    starts = group_starts(users)
    return dict(zip(users[starts].tolist(), np.split(items, starts[1:])))


def ranking_sums(rows: np.ndarray, items: np.ndarray, relevant: list[np.ndarray], k: int) -> np.ndarray:
    """Sums over users of precision@k, recall@k, NDCG@k and AP@k (binary relevance), in one compiled pass.

    The recommended lists are (row, item) pairs, row by row, each best first (at most ``k`` used);
    ``relevant[j]``: user j's relevant items, sorted and non-empty (a user without a list counts with no
    hits). AP@k divides by ``min(k, |relevant|)``, NDCG's ideal list holds ``min(k, |relevant|)`` hits.

    Returns
    -------
    array [precision, recall, ndcg, ap, users]
    """
    discount = 1.0 / np.log2(np.arange(2, k + 2))
    ideal_gain = np.concatenate(([1.0], np.cumsum(discount)))  # an ideal list of m hits gains ideal_gain[m]
    bounds = np.concatenate(([0], np.cumsum([r.shape[0] for r in relevant]))).astype(np.int64)
    flat = np.concatenate(relevant).astype(np.int64) if relevant else np.zeros(0, np.int64)
    return _ranking_sums(rows.astype(np.int64), items.astype(np.int64), flat, bounds, k, discount, ideal_gain)
