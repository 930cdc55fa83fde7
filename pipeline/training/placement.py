"""Where the row blocks live on a cluster, and the error sums every stage reads from them.

Row block ``r`` and its users' factors stay on worker ``r mod W``; the tasks that read a row block
(training, validation, evaluation, top-N) run there. Error sums come back per row block and are added in
row order, never in the order results arrive, so every decision made on them is the same on any cluster.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from funkflow.pipeline.data.blocking import Blocks
from funkflow.pipeline.running.cluster import Executor
from funkflow.tasks.blocks import load_row_block
from funkflow.tasks.hashing import SALT_COLUMNS, SALT_ROWS, block_layout
from funkflow.tasks.training import row_errors


class BlockPlacement:
    """Which worker owns each row block, and the users / items of every block."""

    def __init__(self, executor: Executor, blocks: Blocks) -> None:
        self.executor = executor
        self.blocks = blocks
        self.user_members = block_layout(blocks.n_users, blocks.d, blocks.seed, SALT_ROWS)[2]
        self.item_members = block_layout(blocks.n_items, blocks.d, blocks.seed, SALT_COLUMNS)[2]

    def owner(self, row: int) -> str | None:
        """The worker that holds row block ``row``."""
        workers = self.executor.workers
        return workers[row % len(workers)]

    def on_rows(self, row_blocks: list[Any], fn: Callable, *args: Any, name: str) -> list[Any]:
        """Futures of ``fn(row_blocks[r], *args)`` for every row block, each on the block's owner, in row order."""
        return [self.executor.submit(fn, row_blocks[r], *args, name=name, worker=self.owner(r))
                for r in range(len(row_blocks))]

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
    """Futures of each row block's error sums over ``splits`` (see :func:`funkflow.tasks.training.row_errors`)."""
    return [executor.submit(row_errors, row_blocks[r], user_states[r], item_states, global_mean, splits,
                            name="row_errors", worker=placement.owner(r))
            for r in range(len(row_blocks))]


def summed_row_errors(executor: Executor, futures: list[Any]) -> np.ndarray:
    """The sum of :func:`submit_row_errors`' results, array of shape (3, d, 3): ``[split, col] = (Σe², Σ|e|, n)``.

    Row blocks are added in row order, never in the order results arrive.
    """
    return row_sum(np.asarray(executor.gather(futures)))


def sum_row_errors(executor: Executor, placement: BlockPlacement, row_blocks: list[Any], user_states: list[Any],
                   item_states: list[Any], global_mean: float, splits: tuple[int, ...]) -> np.ndarray:
    """Error sums of all blocks over ``splits`` (see :func:`summed_row_errors`)."""
    return summed_row_errors(executor, submit_row_errors(executor, placement, row_blocks, user_states, item_states,
                                                         global_mean, splits))


def rmse(errors: np.ndarray, code: int) -> float | None:
    sse, _, n = errors[code].sum(axis=0)
    return math.sqrt(sse / n) if n else None


def row_sum(by_row: np.ndarray) -> np.ndarray:
    """Sum over the first axis, row after row."""
    total = np.zeros(by_row.shape[1:])
    for part in by_row:
        total += part
    return total
