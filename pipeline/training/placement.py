"""Where the row blocks live on a cluster, and the error sums every stage reads from them.

Worker ``i`` of ``W`` owns a contiguous range of row blocks and their users' factors
(:func:`funkflow.tasks.epoch.rows_of`); the tasks that read a row block (training, evaluation, top-N) run
there. Sums come back per row block and are added in row order, never in the order results arrive, so every
decision made on them is the same on any cluster.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from funkflow.pipeline.core.cluster import Executor
from funkflow.pipeline.data.blocking import Blocks
from funkflow.tasks.blocks import load_row_block
from funkflow.tasks.epoch import owner_of
from funkflow.tasks.hashing import SALT_COLUMNS, SALT_ROWS, block_layout


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
        return workers[owner_of(row, self.blocks.d, len(workers))]

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


def row_sum(by_row: np.ndarray) -> np.ndarray:
    """Sum over the first axis of per-block figures laid out in block order (row blocks, then column blocks):
    numpy's reduction of an array depends only on its values and shape, never on which worker computed which
    part or when, so every decision made on the sum is the same on any cluster."""
    return np.asarray(by_row, dtype=np.float64).sum(axis=0)
