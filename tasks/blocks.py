"""Split and block the ratings: one Parquet part in, row-block files out; one row block loaded.

The ``block`` stage runs :func:`split_part` once per canonical Parquet part; it
writes, for every row block r, the part's ratings of the users in r to
``<blocks>/row-RRRR/part-PPPPP.parquet``. Training then loads each row block
with :func:`load_row_block` on the worker that owns it, so the rating blocks
can always be rebuilt from disk (a lost worker costs a re-read, not the run).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from funkflow.tasks.artifacts import BLOCKS_JSON, ArtifactError
from funkflow.tasks.counting import placed, places_by_key
from funkflow.tasks.hashing import SALT_COLUMNS, SALT_ROWS, block_layout, pair_uniform
from funkflow.tasks.io import read_json, write_parquet

TRAIN, VALIDATION, TEST = 0, 1, 2
SPLIT_NAMES = ("train", "validation", "test")


def row_dir(blocks_dir: str | Path, row: int) -> Path:
    return Path(blocks_dir) / f"row-{row:04d}"


def split_codes(users: np.ndarray, items: np.ndarray, test_fraction: float, validation_fraction: float,
                seed: int) -> np.ndarray:
    """Split of each rating by a seeded hash of (user, item): TRAIN, VALIDATION or TEST, int8."""
    u = pair_uniform(users, items, seed)
    codes = np.full(users.shape[0], TRAIN, dtype=np.int8)
    codes[u < test_fraction + validation_fraction] = VALIDATION
    codes[u < test_fraction] = TEST
    return codes


def group_starts(keys: np.ndarray) -> np.ndarray:
    """Where each run of equal consecutive ``keys`` starts (int64; empty for no keys)."""
    return np.flatnonzero(np.diff(keys, prepend=keys[:1] - 1)) if keys.shape[0] else np.zeros(0, np.int64)


# How ratings are split; ``test_set`` marks the parts of a given test set (split.method given).
SplitMethod = Literal["hash", "per_user", "time", "given", "test_set"]


@dataclass(frozen=True)
class SplitRule:
    """How ratings are split (plain values, cheap to ship; see ``split`` in the config).

    ``hash``: by a seeded hash of (user, item) with the given fractions.
    ``per_user``: each user's latest ``test_per_user`` ratings (by time, ties and
    untimed data by the hash) are test, the ``validation_per_user`` before them
    validation; every user keeps at least one training rating.
    ``time``: ratings at or after ``cutoff`` (Unix seconds) are test, the rest
    split into validation and training by the hash. ``given``: the test set is
    another dataset (whose parts use ``test_set``); the hash picks validation.
    """

    method: SplitMethod = "hash"
    test_fraction: float = 0.1
    validation_fraction: float = 0.05
    seed: int = 0
    test_per_user: int = 2
    validation_per_user: int = 1
    cutoff: int | None = None


def assign_splits(users: np.ndarray, items: np.ndarray, times: np.ndarray | None, rule: SplitRule) -> np.ndarray:
    """Split code of each rating under ``rule``, int8. ``per_user`` needs every rating of a user here."""
    if rule.method == "hash":
        return split_codes(users, items, rule.test_fraction, rule.validation_fraction, rule.seed)
    if rule.method == "test_set":  # the given test set's own parts
        return np.full(users.shape[0], TEST, dtype=np.int8)
    u = pair_uniform(users, items, rule.seed)
    if rule.method in ("time", "given"):
        codes = np.full(users.shape[0], TRAIN, dtype=np.int8)
        codes[u < rule.validation_fraction] = VALIDATION
        if rule.method == "time":
            assert times is not None and rule.cutoff is not None, "a time split has times and a cutoff"
            codes[times >= rule.cutoff] = TEST
        return codes
    # per_user: rank each user's ratings from the latest.
    when = np.zeros(users.shape[0], dtype=np.int64) if times is None else times
    order = np.lexsort((u, when, users))
    sorted_users = users[order]
    starts = group_starts(sorted_users)
    sizes = np.diff(np.append(starts, users.shape[0]))
    size = np.repeat(sizes, sizes)
    from_end = np.repeat(starts + sizes, sizes) - np.arange(users.shape[0]) - 1
    n_test = np.minimum(rule.test_per_user, size - 1)
    n_validation = np.minimum(rule.validation_per_user, size - 1 - n_test)
    sorted_codes = np.full(users.shape[0], TRAIN, dtype=np.int8)
    sorted_codes[(from_end >= n_test) & (from_end < n_test + n_validation)] = VALIDATION
    sorted_codes[from_end < n_test] = TEST
    codes = np.empty_like(sorted_codes)
    codes[order] = sorted_codes
    return codes


@dataclass(frozen=True)
class SplitCounts:
    """``counts`` (d, 3) int64 ratings of a part per row block and split, and the float64 ``train_sum`` of its
    training ratings (the driver forms the global mean by adding these in part order)."""

    counts: np.ndarray
    train_sum: float


def split_part(part_path: str, part_index: int, blocks_dir: str, d: int, n_users: int, rule: SplitRule,
               block_seed: int) -> SplitCounts:
    """Assign one part's ratings to splits and row blocks; write one file per row block."""
    columns = ["user", "item", "rating"]
    schema_names = pq.read_schema(part_path).names
    if "expected" in schema_names:
        columns.append("expected")
    table = pq.read_table(part_path, columns=columns + (["time"] if "time" in schema_names else []))
    users = table["user"].to_numpy()
    items = table["item"].to_numpy()
    times = None
    if "time" in schema_names:
        times = table["time"].fill_null(np.iinfo(np.int64).min).to_numpy()
        table = table.drop_columns(["time"])
    codes = assign_splits(users, items, times, rule)
    row_of_user, _, _ = block_layout(n_users, d, block_seed, SALT_ROWS)
    rows = row_of_user[users]
    # One counting scatter lays the part out by row block, in part order within a row (as a stable sort
    # would); each row block's file is then a slice of it.
    destination, bounds = places_by_key(rows, d)
    table = table.append_column("split", pa.array(codes))
    by_row = pa.table({name: placed(table[name].to_numpy(), destination) for name in table.column_names})
    counts = np.bincount(rows.astype(np.int64) * 3 + codes, minlength=3 * d).reshape(d, 3)
    for r in range(d):
        out = row_dir(blocks_dir, r)
        out.mkdir(parents=True, exist_ok=True)
        # Dictionaries only where values repeat: on ids they cost the write half its time and save nothing.
        write_parquet(by_row.slice(bounds[r], bounds[r + 1] - bounds[r]), out / f"part-{part_index:05d}.parquet",
                      use_dictionary=["rating", "split"])
    ratings = table["rating"].to_numpy()
    return SplitCounts(counts, float(ratings[codes == TRAIN].sum(dtype=np.float64)))


class RunLayout(NamedTuple):
    """A block's ratings in visiting order within runs, and where each run starts (``n`` at the end)."""

    users: np.ndarray
    items: np.ndarray
    ratings: np.ndarray
    run_starts: np.ndarray


@dataclass(frozen=True)
class BlockRatings:
    """Ratings of one block over block-local indices.

    ``users`` int32 into the row block's users, ``items`` int32 into the column
    block's items, ``ratings`` float32; ``expected`` float32 (the true expected
    rating, synthetic data only) or None. All of shape (n,).
    """

    users: np.ndarray
    items: np.ndarray
    ratings: np.ndarray
    expected: np.ndarray | None = None

    @property
    def n(self) -> int:
        return int(self.ratings.shape[0])

    @property
    def nbytes(self) -> int:
        extra = 0 if self.expected is None else self.expected.nbytes
        return self.users.nbytes + self.items.nbytes + self.ratings.nbytes + extra

    @cached_property
    def _layouts(self) -> dict[tuple[int, int], RunLayout]:
        return {}

    def in_runs(self, users_per_run: int, tile_items: int) -> RunLayout:
        """The ratings laid out for ``train.order: user_runs``: runs of ``users_per_run`` consecutive users,
        each contiguous, and inside a run tile by tile (``tile_items`` consecutive item indices; 0: one tile),
        in a tile user by user in item order. The same updates in the same order as walking the tiles of each
        run; computed once per block and settings, on the worker that holds the block."""
        key = (users_per_run, tile_items)
        if key not in self._layouts:
            bounds = self.user_bounds
            n_users = bounds.shape[0] - 1
            run_of = np.repeat(np.arange(n_users, dtype=np.int64) // users_per_run, np.diff(bounds))
            n_runs = -(-n_users // users_per_run)
            tile_of = (self.items // tile_items).astype(np.int64) if tile_items > 0 else np.zeros(self.n, np.int64)
            n_tiles = int(tile_of.max()) + 1 if self.n else 1
            order = np.argsort(run_of * n_tiles + tile_of, kind="stable")  # ties keep (user, item) order
            run_starts = np.concatenate(([0], np.cumsum(np.bincount(run_of, minlength=n_runs)))).astype(np.int64)
            self._layouts[key] = RunLayout(self.users[order], self.items[order], self.ratings[order], run_starts)
        return self._layouts[key]

    def single_runs(self) -> RunLayout:
        """The ratings as runs of one each (``train.order: ratings``, plain random-order SGD)."""
        key = (0, -1)
        if key not in self._layouts:
            self._layouts[key] = RunLayout(self.users, self.items, self.ratings, np.arange(self.n + 1, dtype=np.int64))
        return self._layouts[key]

    def one_run(self) -> RunLayout:
        """The ratings as one run, front to back (``train.order: sorted``)."""
        return RunLayout(self.users, self.items, self.ratings, np.array([0, self.n], dtype=np.int64))

    @cached_property
    def user_bounds(self) -> np.ndarray:
        """Where each user's ratings begin, and ``n`` at the end: int64, one more than the block's users.

        Computed once per block on the worker that holds it, not once per epoch.
        """
        starts = np.flatnonzero(np.diff(self.users)) + 1
        return np.concatenate(([0] if self.n else [], starts, [self.n])).astype(np.int64)


@dataclass(frozen=True)
class RowBlock:
    """All ratings of row block ``row``: for each split, one :class:`BlockRatings` per column block.

    ``user_ids`` (n_users_row,) int32 are the global indices of the row's users
    in local order.
    """

    row: int
    user_ids: np.ndarray
    splits: tuple[tuple[BlockRatings, ...], ...]

    @property
    def n_users(self) -> int:
        return int(self.user_ids.shape[0])

    def split(self, code: int) -> tuple[BlockRatings, ...]:
        return self.splits[code]

    def whole(self, code: int, item_members: list[np.ndarray]) -> BlockRatings:
        """Split ``code`` of the whole row block as one :class:`BlockRatings` whose ``items`` are global
        indices (``item_members``: each column block's items), the column blocks one after another: for
        figures of a row over the whole catalogue, computed once and not once per column block. The small
        splits (validation, test) are kept for the next call; the training split is made anew."""
        if code != TRAIN and code in self._wholes:
            return self._wholes[code]
        blocks = self.splits[code]
        parts = [members[block.items] for block, members in zip(blocks, item_members)]
        expected = None if any(b.expected is None for b in blocks) else np.concatenate([b.expected for b in blocks])
        whole = BlockRatings(np.concatenate([b.users for b in blocks]), np.concatenate(parts).astype(np.int32),
                             np.concatenate([b.ratings for b in blocks]), expected)
        if code != TRAIN:
            self._wholes[code] = whole
        return whole

    @cached_property
    def _wholes(self) -> dict[int, BlockRatings]:
        return {}

    def __sizeof__(self) -> int:
        # Dask's memory accounting falls back to sys.getsizeof.
        return self.user_ids.nbytes + sum(b.nbytes for split in self.splits for b in split)


def load_row_block(blocks_dir: str, row: int, d: int, n_users: int, n_items: int, block_seed: int) -> RowBlock:
    """Read row block ``row`` from its Parquet files and cut it into ``d`` column blocks.

    Within each block the ratings are ordered by (user, item), so the result does
    not depend on the order in which parts were written.
    """
    try:
        table = pq.read_table(row_dir(blocks_dir, row))
    except (OSError, pa.ArrowInvalid) as exc:
        raise ArtifactError(f"{row_dir(blocks_dir, row)}: unreadable ({exc}); delete the blocks to rebuild "
                            "them") from None
    users = table["user"].to_numpy()
    items = table["item"].to_numpy()
    ratings = table["rating"].to_numpy()
    codes = table["split"].to_numpy()
    # count_nonzero, not bincount, which would widen the int8 codes to int64 first
    found = [int(np.count_nonzero(codes == code)) for code in range(3)]
    listed = read_json(Path(blocks_dir) / BLOCKS_JSON)["counts"][row]
    if found != listed:
        raise ArtifactError(f"{row_dir(blocks_dir, row)}: {found} ratings by split, {Path(blocks_dir) / BLOCKS_JSON} "
                            f"says {listed}; delete the blocks to rebuild them")
    expected = table["expected"].to_numpy() if "expected" in table.column_names else None

    row_of_user, local_user, members = block_layout(n_users, d, block_seed, SALT_ROWS)
    if users.size and np.any(row_of_user[users] != row):
        raise ValueError(f"{row_dir(blocks_dir, row)} holds users of another row block; rebuild the blocks")
    col_of_item, local_item, _ = block_layout(n_items, d, block_seed, SALT_COLUMNS)
    group = codes.astype(np.int16 if 3 * d < 2**15 else np.int32) * d + col_of_item[items]
    destination, bounds = places_by_key(group, 3 * d)
    users, items, ratings = placed(users, destination), placed(items, destination), placed(ratings, destination)
    expected = None if expected is None else placed(expected, destination)
    # Rows come from parts sorted by (user, item), a split's rows in part order, so that placing them by
    # group keeps every block in (user, item) order; rows in another order are sorted within their groups.
    ascending = (users[1:] > users[:-1]) | ((users[1:] == users[:-1]) & (items[1:] >= items[:-1]))
    starts = bounds[1:-1]
    ascending[starts[(starts > 0) & (starts < users.shape[0])] - 1] = True  # a group may start lower
    if not ascending.all():
        resort = np.lexsort((items, users, np.repeat(np.arange(3 * d), np.diff(bounds))))
        users, items, ratings = users[resort], items[resort], ratings[resort]
        expected = None if expected is None else expected[resort]

    def block(code: int, col: int) -> BlockRatings:
        rows = slice(bounds[code * d + col], bounds[code * d + col + 1])
        return BlockRatings(users=local_user[users[rows]], items=local_item[items[rows]], ratings=ratings[rows],
                            expected=None if expected is None else expected[rows])

    splits = tuple(tuple(block(code, col) for col in range(d)) for code in (TRAIN, VALIDATION, TEST))
    return RowBlock(row=row, user_ids=members[row], splits=splits)
