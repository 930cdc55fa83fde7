"""The ``evaluate`` stage: test RMSE and MAE of a saved model beside its baselines, and ranking metrics.

Each worker reads its rows' user blocks of the model and the column blocks pass
it once, as in training (:mod:`funkflow.tasks.measure`); the baselines (global
mean, damped biases) are fitted on the training split by tasks on the row
blocks; for synthetic data the floor is the RMSE of the true expected rating.
"""

from __future__ import annotations

import math
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from funkflow.pipeline.core.cluster import Executor
from funkflow.pipeline.core.config import EvaluateConfig
from funkflow.pipeline.serving.model import verify_model
from funkflow.pipeline.training.exchange import DSGDExchange, measure_share
from funkflow.pipeline.training.placement import BlockPlacement, row_sum
from funkflow.tasks.artifacts import MODEL_JSON
from funkflow.tasks.baselines import BASELINES, ITEM_DAMPING, baseline_errors, item_residual_sums
from funkflow.tasks.blocks import TEST
from funkflow.tasks.io import read_json
from funkflow.tasks.measure import MEASURED_SPLITS, Measured, MeasurePlan, Ranking
from funkflow.tasks.recommend import RANKERS, by_popularity


@dataclass(frozen=True)
class Errors:
    rmse: float
    mae: float


@dataclass(frozen=True)
class Evaluation:
    """What evaluate measured: the model's test RMSE and MAE (None without test ratings) and its training
    RMSE, each baseline's test errors by name, the floor for data with a known true model, and the ranking
    metrics when asked for (``k``, ``relevance_threshold``, ``users``, then by ranker its precision, recall,
    NDCG, MAP and coverage)."""

    test_rmse: float | None
    test_mae: float | None
    train_rmse: float | None
    n_test: int
    baselines: dict[str, Errors]
    floor_rmse: float | None = None
    ranking: dict[str, Any] | None = None

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def _item_sums(executor: Executor, placement: BlockPlacement, row_blocks: list[Any],
               global_mean: float) -> tuple[np.ndarray, np.ndarray]:
    """Each item's ``(Σ (r - μ), n)`` over the training ratings, by global index: the biases-only baseline's
    item biases and the popularity baseline's scores come from them."""
    futures = placement.on_rows(row_blocks, item_residual_sums, placement.item_members, global_mean,
                                name="item_residual_sums")
    totals = np.zeros((2, placement.blocks.n_items))
    for items, sums in executor.gather(futures):  # row order
        totals[:, items] += sums
    return totals[0], totals[1]


def measure(executor: Executor, placement: BlockPlacement, row_blocks: list[Any], model_dir: Path,
            plan: MeasurePlan) -> list[Measured]:
    """Run the measuring rotation ``plan`` of the model in ``model_dir``: one task per worker, on the workers
    that hold the row blocks; their results in worker order, so their rows come in row order."""
    executor.register_worker_plugin(DSGDExchange())
    futures = [executor.submit(measure_share, *[row_blocks[r] for r in plan.rows_of(index)], name="measure_share",
                               worker=address, plan=plan, model_dir=str(model_dir), index=index,
                               threads=executor.threads[address])
               for index, address in enumerate(plan.workers)]
    return executor.gather_watching(futures)


def _ranking(popularity: np.ndarray, cfg: EvaluateConfig, n_users: int, seed: int) -> Ranking:
    wanted = None
    if cfg.ranking_users and cfg.ranking_users < n_users:
        wanted = np.sort(np.random.default_rng(seed).choice(n_users, cfg.ranking_users, replace=False))
    return Ranking(cfg.ranking_k, cfg.relevance_threshold, by_popularity(popularity), wanted)


def _ranking_result(measured: list[Measured], cfg: EvaluateConfig, n_items: int) -> dict[str, Any]:
    sums = row_sum(np.concatenate([m.ranking for m in measured]))
    result: dict[str, Any] = {"k": cfg.ranking_k, "relevance_threshold": cfg.relevance_threshold}
    for ranker, name in enumerate(RANKERS):
        users = int(sums[ranker, 4])
        result["users"] = users
        result[name] = {metric: (float(sums[ranker, j] / users) if users else None)
                        for j, metric in enumerate(("precision", "recall", "ndcg", "map"))}
        covered = np.unique(np.concatenate([m.recommended[ranker] for m in measured]))
        result[name]["coverage"] = float(covered.shape[0] / n_items)
    return result


def evaluate(executor: Executor, placement: BlockPlacement, row_blocks: list[Any], model_dir: Path,
             global_mean: float, has_expected: bool, cfg: EvaluateConfig | None = None,
             seed: int = 0) -> Evaluation:
    """Test metrics of the model in ``model_dir`` and of the baselines; ranking metrics with ``cfg``.

    The model's column blocks pass each worker's rows once (:mod:`funkflow.tasks.measure`): error sums and,
    for ranking, each evaluated user's running top-N; no worker holds more of the model than its share."""
    verify_model(model_dir)
    b = placement.blocks
    info = read_json(model_dir / MODEL_JSON)

    residual_sums, counts = _item_sums(executor, placement, row_blocks, b.global_mean)
    ranking = _ranking(counts, cfg, b.n_users, seed) if cfg is not None and b.n_split(TEST) else None
    plan = MeasurePlan(run_id=uuid.uuid4().hex, workers=tuple(executor.workers), d=b.d, block_seed=b.seed,
                       n_items=b.n_items, k=info["k"], global_mean=global_mean, ranking=ranking)
    measured = measure(executor, placement, row_blocks, model_dir, plan)
    errors = row_sum(np.concatenate([m.errors for m in measured]).reshape(-1, len(MEASURED_SPLITS), 3))
    (train_sse, _, n_train), (sse, sae, n) = errors

    # One task holds the biases, and each worker fetches them once, not once a row block.
    item_bias = executor.submit(np.divide, residual_sums, ITEM_DAMPING + counts, name="item_bias")
    futures = placement.on_rows(row_blocks, baseline_errors, item_bias, placement.item_members, b.global_mean,
                                name="baseline_errors")
    base = row_sum(np.stack(executor.gather(futures)))

    def errors_of(sums: np.ndarray) -> Errors:
        return Errors(rmse=math.sqrt(sums[0] / sums[2]), mae=float(sums[1] / sums[2]))

    return Evaluation(
        test_rmse=math.sqrt(sse / n) if n else None,
        test_mae=float(sae / n) if n else None,
        train_rmse=math.sqrt(train_sse / n_train) if n_train else None,
        n_test=int(n),
        baselines={name: errors_of(base[i]) for i, name in enumerate(BASELINES[:2])} if n else {},
        floor_rmse=errors_of(base[BASELINES.index("floor")]).rmse if has_expected and n else None,
        ranking=_ranking_result(measured, cfg, b.n_items) if ranking is not None and cfg is not None else None)
