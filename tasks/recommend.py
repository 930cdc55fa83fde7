"""Worker side of top-N: score one row block's users against every item, in chunks, and keep the best.

Never a users × items matrix in memory: a chunk of users at a time is scored
by one matrix product, the items each user rated in training are masked out,
and a partial selection keeps the top N. Ties are broken by the lower item
index, so the lists are exact and deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numba
import numpy as np

from funkflow.tasks.artifacts import read_model_array
from funkflow.tasks.blocks import TRAIN, VALIDATION, RowBlock, group_starts
from funkflow.tasks.hashing import SALT_COLUMNS, block_layout

CHUNK_USERS = 1024
# Scores held at once per chunk of users (256 MiB of float32): with a catalogue of 500k items, 1024 users'
# scores and the selection's temporaries took 5.8 GiB in one worker.
CHUNK_SCORES = 1 << 26


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


def mask_seen(scores: np.ndarray, chunk: np.ndarray, row_block: RowBlock, item_members: list[np.ndarray],
              codes: tuple[int, ...] = (TRAIN, VALIDATION)) -> None:
    """Set ``scores[j, item]`` to -inf for every rating of local user ``chunk[j]`` in the splits ``codes``.

    Each block is sorted by user, so every user's ratings are found by binary
    search: the work and memory follow the chunk's ratings, not the row block's.
    """
    for code in codes:
        for col, block in enumerate(row_block.split(code)):
            # Same dtype: searchsorted would copy the block to cast it.
            rows, positions = rated_by(block.users, chunk.astype(block.users.dtype))
            scores[rows, item_members[col][block.items[positions]]] = -np.inf


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


def _item_model(model_dir: str) -> tuple[np.ndarray, np.ndarray, float]:
    import json

    Q = read_model_array(model_dir, "Q.npy")
    item_bias = read_model_array(model_dir, "item_bias.npy")
    global_mean = float(json.loads((Path(model_dir) / "model.json").read_text())["global_mean"])
    return Q, item_bias, global_mean


def recommend_row(row_block: RowBlock, model_dir: str | None, n_items: int, d: int, seed: int, top: int,
                  wanted: np.ndarray | None = None, chunk_users: int = CHUNK_USERS,
                  popularity: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-``top`` unseen items of the row block's users (or of its ``wanted`` global user indices).

    With ``popularity`` (one score per item) instead of a model, every user is
    offered the most popular items they have not rated: the baseline.

    Returns
    -------
    (users, items, scores) : global user and item indices (int64), predicted
    ratings (float32; the popularity for the baseline); per user best first.
    """
    if popularity is None:
        assert model_dir is not None, "a model or a popularity"
        P = read_model_array(model_dir, "P.npy", mmap=True)
        user_bias = read_model_array(model_dir, "user_bias.npy", mmap=True)
        Q, item_bias, global_mean = _item_model(model_dir)
    members = row_block.user_ids.astype(np.int64)
    local = np.arange(members.shape[0]) if wanted is None else np.flatnonzero(np.isin(members, wanted))
    item_members = block_layout(n_items, d, seed, SALT_COLUMNS)[2]
    out_users, out_items, out_scores = [], [], []
    chunk_users = users_per_chunk(n_items, chunk_users)
    for start in range(0, local.shape[0], chunk_users):
        chunk = local[start:start + chunk_users]
        users = members[chunk]
        if popularity is None:
            scores = np.asarray(P[users], dtype=np.float32) @ Q.T
            scores += item_bias[None, :]
        else:
            scores = np.repeat(popularity[None, :].astype(np.float32), chunk.shape[0], axis=0)
        mask_seen(scores, chunk, row_block, item_members)
        r, items = top_n(scores, top)
        out_users.append(users[r])
        out_items.append(items)
        shift = 0.0 if popularity is not None else global_mean + np.asarray(user_bias)[users[r]]
        out_scores.append((scores[r, items] + shift).astype(np.float32))
    if not out_users:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    return np.concatenate(out_users), np.concatenate(out_items), np.concatenate(out_scores)


def item_counts(row_block: RowBlock, n_items: int, d: int, seed: int) -> np.ndarray:
    """Training ratings per item (global index) in one row block: the popularity baseline's scores."""
    item_members = block_layout(n_items, d, seed, SALT_COLUMNS)[2]
    counts = np.zeros(n_items, dtype=np.int64)
    for col, block in enumerate(row_block.split(TRAIN)):
        counts += np.bincount(item_members[col][block.items], minlength=n_items)
    return counts


def ranking_sums(ranked: list[np.ndarray], relevant: list[set[int]], k: int) -> np.ndarray:
    """Sums over users of precision@k, recall@k, NDCG@k and AP@k (binary relevance).

    ``ranked[j]``: user j's recommended items, best first (at most ``k`` used);
    ``relevant[j]``: user j's relevant items (non-empty). AP@k divides by
    ``min(k, |relevant|)``, NDCG's ideal list holds ``min(k, |relevant|)`` hits.

    Returns
    -------
    array [precision, recall, ndcg, ap, users]
    """
    discount = 1.0 / np.log2(np.arange(2, k + 2))
    total = np.zeros(5)
    for items, rel in zip(ranked, relevant):
        hits = np.array([item in rel for item in items[:k]], dtype=bool)
        n_hits = int(hits.sum())
        ideal = min(k, len(rel))
        precision_at = np.cumsum(hits) / np.arange(1, hits.shape[0] + 1)
        total += (n_hits / k, n_hits / len(rel), float(discount[: hits.shape[0]][hits].sum() / discount[:ideal].sum()),
                  float(precision_at[hits].sum() / ideal), 1)
    return total


# Whose top-N lists the ranking metrics judge: the model's, and the popularity baseline's.
RANKERS = ("model", "popularity")


@dataclass(frozen=True)
class RankingPart:
    """One row block's ranking metrics, a row per ranker of :data:`RANKERS`: ``sums`` (2, 5) of precision,
    recall, NDCG and MAP over its users and their count; ``recommended`` (2, n_items) bool, the items in any
    of their lists."""

    sums: np.ndarray
    recommended: np.ndarray


def ranking_row(row_block: RowBlock, model_dir: str, popularity: np.ndarray, n_items: int, d: int, seed: int,
                k: int, threshold: float, wanted: np.ndarray | None) -> RankingPart:
    """Ranking metrics of one row block's users that have a relevant test rating (test rating >=
    ``threshold``), for the model and for the popularity baseline."""
    from funkflow.tasks.blocks import TEST

    item_members = block_layout(n_items, d, seed, SALT_COLUMNS)[2]
    user_parts, item_parts = [], []
    for col, block in enumerate(row_block.split(TEST)):
        good = block.ratings >= threshold
        user_parts.append(row_block.user_ids[block.users[good]].astype(np.int64))
        item_parts.append(item_members[col][block.items[good]])
    users = np.concatenate(user_parts) if user_parts else np.zeros(0, np.int64)
    items = np.concatenate(item_parts) if item_parts else np.zeros(0, np.int64)
    if wanted is not None:
        keep = np.isin(users, wanted)
        users, items = users[keep], items[keep]
    order = np.lexsort((items, users))
    users, items = users[order], items[order]
    starts = group_starts(users)
    evaluated = users[starts]
    relevant = {int(u): set(group.tolist()) for u, group in zip(evaluated, np.split(items, starts[1:]))}
    sums = np.zeros((len(RANKERS), 5))
    recommended = np.zeros((len(RANKERS), n_items), dtype=bool)
    sources: tuple[dict, ...] = ({"model_dir": model_dir}, {"popularity": popularity, "model_dir": None})
    for ranker, source in enumerate(sources):
        rec_users, rec_items, _ = recommend_row(row_block, n_items=n_items, d=d, seed=seed, top=k,
                                                wanted=evaluated, **source)
        starts = group_starts(rec_users)
        lists = dict(zip(rec_users[starts].tolist(), np.split(rec_items, starts[1:])))
        ranked = [lists.get(u, np.zeros(0, np.int64)) for u in relevant]
        recommended[ranker, rec_items] = True
        sums[ranker] = ranking_sums(ranked, list(relevant.values()), k)
    return RankingPart(sums, recommended)
