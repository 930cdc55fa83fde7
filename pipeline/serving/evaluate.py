"""The ``evaluate`` stage: test RMSE and MAE of a saved model beside its baselines.

The model is read block by block by tasks on the workers that own the row
blocks; the baselines (global mean, damped biases) are fitted on the training
split the same way; for synthetic data the floor is the RMSE of the true
expected rating.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from funkflow.pipeline.running.cluster import Executor
from funkflow.pipeline.running.config import EvaluateConfig
from funkflow.pipeline.serving.model import verify_model
from funkflow.pipeline.training.placement import BlockPlacement, rmse, sum_row_errors
from funkflow.tasks.baselines import BASELINES, ITEM_DAMPING, baseline_errors, item_residual_sums
from funkflow.tasks.blocks import TEST, TRAIN
from funkflow.tasks.recommend import RANKERS, item_counts, ranking_row
from funkflow.tasks.training import read_factor_block


def _fit_item_biases(executor: Executor, placement: BlockPlacement, row_blocks: list[Any],
                     global_mean: float) -> list[np.ndarray]:
    n_items = [len(m) for m in placement.item_members]
    futures = placement.on_rows(row_blocks, item_residual_sums, n_items, global_mean, name="item_residual_sums")
    totals = [np.zeros((2, n)) for n in n_items]
    for per_row in executor.gather(futures):  # row order
        for c, sums in enumerate(per_row):
            totals[c] += sums
    return [sums / (ITEM_DAMPING + count) for sums, count in totals]


def ranking(executor: Executor, placement: BlockPlacement, row_blocks: list[Any], model_dir: Path,
            cfg: EvaluateConfig, seed: int) -> dict[str, Any]:
    """precision, recall, NDCG and MAP at ``cfg.ranking_k`` and catalogue coverage, for the model and for
    the popularity baseline, over users with a relevant test rating (a sample of ``cfg.ranking_users``)."""
    b = placement.blocks
    counts = executor.gather(placement.on_rows(row_blocks, item_counts, b.n_items, b.d, b.seed, name="item_counts"))
    popularity = np.sum(counts, axis=0).astype(np.float32)
    wanted = None
    if cfg.ranking_users and cfg.ranking_users < b.n_users:
        wanted = np.sort(np.random.default_rng(seed).choice(b.n_users, cfg.ranking_users, replace=False))
    parts = executor.gather(placement.on_rows(row_blocks, ranking_row, str(model_dir), popularity, b.n_items, b.d,
                                              b.seed, cfg.ranking_k, cfg.relevance_threshold, wanted,
                                              name="ranking_row"))
    result: dict[str, Any] = {"k": cfg.ranking_k, "relevance_threshold": cfg.relevance_threshold}
    sums = np.sum([p.sums for p in parts], axis=0)
    covered = np.any([p.recommended for p in parts], axis=0)
    for ranker, name in enumerate(RANKERS):
        users = int(sums[ranker, 4])
        result["users"] = users
        result[name] = {metric: (float(sums[ranker, j] / users) if users else None)
                        for j, metric in enumerate(("precision", "recall", "ndcg", "map"))}
        result[name]["coverage"] = float(covered[ranker].sum() / b.n_items)
    return result


def evaluate(executor: Executor, placement: BlockPlacement, row_blocks: list[Any], model_dir: Path,
             global_mean: float, has_expected: bool, cfg: EvaluateConfig | None = None,
             seed: int = 0) -> dict[str, Any]:
    """Test metrics of the model in ``model_dir`` and of the baselines; ranking metrics with ``cfg``."""
    verify_model(model_dir)
    b = placement.blocks

    def state(side: str, n: int, block: int) -> Any:
        return executor.submit(read_factor_block, str(model_dir), side, n, b.d, b.seed, block,
                               name="read_factor_block", worker=placement.owner(block))

    user_states = [state("user", b.n_users, r) for r in range(b.d)]
    item_states = [state("item", b.n_items, c) for c in range(b.d)]
    errors = sum_row_errors(executor, placement, row_blocks, user_states, item_states, global_mean, (TRAIN, TEST))
    sse, sae, n = errors[TEST].sum(axis=0)

    item_bias = _fit_item_biases(executor, placement, row_blocks, b.global_mean)
    futures = placement.on_rows(row_blocks, baseline_errors, item_bias, b.global_mean, name="baseline_errors")
    base = np.zeros((len(BASELINES), 3))
    for per_row in executor.gather(futures):
        base += per_row

    def metrics(sums: np.ndarray) -> dict[str, float]:
        return {"rmse": math.sqrt(sums[0] / sums[2]), "mae": sums[1] / sums[2]}

    results: dict[str, Any] = {
        "test_rmse": math.sqrt(sse / n) if n else None,
        "test_mae": sae / n if n else None,
        "train_rmse": rmse(errors, TRAIN),
        "n_test": int(n),
        "baselines": {name: metrics(base[i]) for i, name in enumerate(BASELINES[:2])} if n else {},
    }
    if has_expected and n:
        results["floor_rmse"] = metrics(base[BASELINES.index("floor")])["rmse"]
    if cfg is not None and n:
        results["ranking"] = ranking(executor, placement, row_blocks, model_dir, cfg, seed)
    return results
