"""Top-N: exact against a brute-force NumPy ranking, seen items excluded, ties to the lower item."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from funkflow.pipeline.app.cli import main
from funkflow.pipeline.app.stages import run_pipeline
from funkflow.pipeline.core.config import load_config
from funkflow.pipeline.serving.model import read_model
from funkflow.tasks.recommend import top_n


def test_top_n_breaks_ties_by_item_index_and_skips_excluded():
    scores = np.array([[1.0, 3.0, 3.0, -np.inf, 2.0],
                       [-np.inf, -np.inf, 0.5, -np.inf, -np.inf],
                       [2.0, 2.0, 2.0, 2.0, 2.0]], dtype=np.float32)
    rows, cols = top_n(scores, 2)
    assert list(zip(rows.tolist(), cols.tolist())) == [(0, 1), (0, 2), (1, 2), (2, 0), (2, 1)]


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 5), st.integers(1, 40), st.integers(1, 12), st.integers(0, 2**32 - 1))
def test_top_n_is_the_best_n_by_score_then_column(m, width, n, seed):
    """Against a brute-force sort by (-score, column), on scores with many ties and exclusions."""
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 4, (m, width)).astype(np.float32)
    scores[rng.random((m, width)) < 0.3] = -np.inf
    rows, cols = top_n(scores, n)
    expected = [(i, j) for i in range(m)
                for j in sorted(np.flatnonzero(np.isfinite(scores[i])), key=lambda j: (-scores[i, j], j))[:n]]
    assert list(zip(rows.tolist(), cols.tolist())) == expected


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 4), st.integers(1, 12), st.integers(1, 6), st.integers(0, 2**32 - 1))
def test_a_running_top_over_column_blocks_in_any_order_is_the_brute_force_list(d, n_users, n, seed):
    """Column blocks offered in a random order, scores with many ties, rated items left out: the same lists
    as one sort of every (user, item) by (-score, item)."""
    from funkflow.tasks.blocks import BlockRatings, RowBlock
    from funkflow.tasks.hashing import SALT_COLUMNS, block_layout
    from funkflow.tasks.recommend import RunningTop

    rng = np.random.default_rng(seed)
    n_items = int(rng.integers(d, 30))
    members = block_layout(n_items, d, seed % 7, SALT_COLUMNS)[2]
    P = rng.integers(-2, 3, (n_users, 4)).astype(np.float32)
    Q = rng.integers(-2, 3, (n_items, 4)).astype(np.float32)
    bias = rng.integers(-1, 2, n_items).astype(np.float32)
    rated = rng.random((n_users, n_items)) < 0.3

    def split(code):
        blocks = []
        for c in range(d):
            users, local = np.nonzero(rated[:, members[c]] & (rng.random((n_users, len(members[c]))) < 0.5)
                                      if code else rated[:, members[c]])
            blocks.append(BlockRatings(users.astype(np.int32), local.astype(np.int32), np.ones(users.size, np.float32)))
        return tuple(blocks)

    train = split(0)
    row = RowBlock(0, np.arange(n_users, dtype=np.int32), (train, split(1), train))
    chosen = np.sort(rng.choice(n_users, int(rng.integers(1, n_users + 1)), replace=False))
    top = RunningTop(chosen, n)
    for c in rng.permutation(d):
        top.offer(P, Q[members[c]], bias[members[c]], members[c], row, int(c))
    seen = np.zeros((n_users, n_items), bool)
    for code in (0, 1):
        for c, block in enumerate(row.split(code)):
            seen[block.users, members[c][block.items]] = True
    scores = P @ Q.T + bias
    expected = [(j, i) for j, u in enumerate(chosen)
                for i in sorted(np.flatnonzero(~seen[u]), key=lambda i: (-scores[u, i], i))[:n]]
    rows, items, _ = top.lists()
    assert list(zip(rows.tolist(), items.tolist())) == expected


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    from conftest import write_canonical

    tmp = tmp_path_factory.mktemp("rec")
    rng = np.random.default_rng(7)
    P, Q = rng.normal(0, 0.6, (120, 3)), rng.normal(0, 0.6, (80, 3))
    mask = rng.random((120, 80)) < 0.3
    users, items = np.nonzero(mask)
    write_canonical(tmp / "data", users, items, 3.0 + np.einsum("nk,nk->n", P[users], Q[items]))
    run_pipeline(load_config(None, [f"data.source={tmp / 'data'}", "data.generate=null", "model.k=3",
                                    "train.epochs=10", "train.d=3", "cluster.scheduler=inprocess",
                                    f"output.run_dir={tmp / 'run'}"]), last="train")
    return tmp / "run"


def _brute_force(run_dir: Path, top: int) -> list[tuple]:
    """Every user × item score, seen (train and validation) items out, sorted by (-score, item).

    The seen ratings come from the data and the hash split rule, not from the blocks."""
    from funkflow.pipeline.core.config import SplitConfig
    from funkflow.tasks.blocks import TEST, split_codes

    factors, _ = read_model(run_dir / "model")
    scores = (factors.P @ factors.Q.T + factors.item_bias[None, :]).astype(np.float32)
    ratings = pq.read_table(run_dir.parent / "data" / "ratings")  # raw ids equal the indices here
    users, items = ratings["user"].to_numpy(), ratings["item"].to_numpy()
    split = SplitConfig()
    seen = split_codes(users, items, split.test_fraction, split.validation_fraction, split.seed) != TEST
    scores[users[seen], items[seen]] = -np.inf
    expected = []
    for u in range(scores.shape[0]):
        ranked = sorted((i for i in range(scores.shape[1]) if np.isfinite(scores[u, i])),
                        key=lambda i: (-scores[u, i], i))[:top]
        expected += [(u, rank + 1, i) for rank, i in enumerate(ranked)]
    return expected


def test_recommend_matches_brute_force_exactly(trained, tmp_path, capsys):
    assert main(["recommend", str(trained), "--top", "7", "--out", str(tmp_path / "top.parquet"),
                 "--scheduler", "inprocess"]) == 0
    rows = pq.read_table(tmp_path / "top.parquet").to_pylist()
    # The canonical test data's raw ids equal the indices.
    assert [(r["user"], r["rank"], r["item"]) for r in rows] == _brute_force(trained, 7)
    factors, _ = read_model(trained / "model")
    first = rows[0]
    expected_score = (factors.global_mean + factors.user_bias[first["user"]] + factors.item_bias[first["item"]]
                      + float(factors.P[first["user"]] @ factors.Q[first["item"]]))
    assert first["score"] == pytest.approx(expected_score, abs=1e-4)


def test_a_small_model_serves_in_this_process_without_a_cluster(trained, tmp_path, caplog):
    """943 users had started a LocalCluster: 3 s for 0.2 s of work."""
    import logging

    from funkflow.pipeline.core.config import ClusterConfig
    from funkflow.pipeline.serving.recommend import recommend

    caplog.set_level(logging.INFO, logger="funkflow")
    recommend(trained, 3, tmp_path / "top.parquet", cluster=ClusterConfig())
    assert "running in this process" in caplog.text and pq.read_table(tmp_path / "top.parquet").num_rows > 0


def test_recommend_for_some_users_on_a_cluster(trained, local_cluster, tmp_path):
    (tmp_path / "users.txt").write_text("user\n5\n17\n99999\n")
    assert main(["recommend", str(trained), "--top", "3", "--users", str(tmp_path / "users.txt"),
                 "--out", str(tmp_path / "some.parquet"), "--scheduler", local_cluster.scheduler_address]) == 0
    rows = pq.read_table(tmp_path / "some.parquet").to_pylist()
    assert [(r["user"], r["rank"], r["item"]) for r in rows] == [
        t for t in _brute_force(trained, 3) if t[0] in (5, 17)]


def test_recommend_for_users_the_model_does_not_know_is_an_error_not_an_empty_file(trained, tmp_path, capsys):
    (tmp_path / "new.txt").write_text("user\n99998\n99999\n")
    out = tmp_path / "none.parquet"
    assert main(["recommend", str(trained), "--top", "3", "--users", str(tmp_path / "new.txt"), "--out", str(out),
                 "--scheduler", "inprocess"]) == 65
    assert "none of its 2 user ids is in the model; fold them in first" in capsys.readouterr().err
    assert not out.exists()


def test_ranking_metrics_match_hand_computed_values():
    from funkflow.tasks.recommend import ranking_sums

    # User A: hit at rank 2 of 3, two relevant items; user B: hit at rank 1, one relevant item.
    sums = ranking_sums(np.array([0, 0, 0, 1, 1, 1]), np.array([1, 2, 3, 7, 8, 9]), [np.array([2, 5]), np.array([7])],
                        k=3)
    log3 = 1 / np.log2(3)
    precision, recall, ndcg, ap, users = sums
    assert users == 2
    assert precision == pytest.approx(1 / 3 + 1 / 3)
    assert recall == pytest.approx(1 / 2 + 1)
    assert ndcg == pytest.approx(log3 / (1 + log3) + 1)
    assert ap == pytest.approx((1 / 2) / 2 + 1)


def test_ranking_sums_match_a_per_user_computation():
    """The compiled pass over (row, item) lists against the metrics computed user by user in Python: users
    without a list, lists shorter and longer than k, relevant sets of every size."""
    from funkflow.tasks.recommend import ranking_sums

    rng = np.random.default_rng(3)
    k, n_users = 5, 40
    relevant = [np.unique(rng.integers(0, 30, rng.integers(1, 9))) for _ in range(n_users)]
    lengths = rng.integers(0, 8, n_users)
    lists = [rng.permutation(30)[:n] for n in lengths]
    rows = np.repeat(np.arange(n_users), lengths)
    found = ranking_sums(rows, np.concatenate(lists), relevant, k)

    discount = 1 / np.log2(np.arange(2, k + 2))
    expected = np.zeros(5)
    for ranked, rel in zip(lists, relevant):
        hits = np.isin(ranked[:k], rel)
        ideal = min(k, rel.shape[0])
        precision_at = np.cumsum(hits) / np.arange(1, hits.shape[0] + 1)
        expected += (hits.sum() / k, hits.sum() / rel.shape[0], discount[:hits.shape[0]][hits].sum()
                     / discount[:ideal].sum(), precision_at[hits].sum() / ideal, 1)
    np.testing.assert_allclose(found, expected, rtol=1e-12)
    assert found[0] > 0 and found[4] == n_users


def test_evaluate_reports_ranking_beside_popularity(tiny_config, tmp_path):
    summary = run_pipeline(tiny_config(tmp_path / "run", "evaluate.ranking_k=5", "evaluate.relevance_threshold=4"))
    ranking = summary["ranking"]
    assert ranking["k"] == 5 and 0 < ranking["users"] <= 300
    for name in ("model", "popularity"):
        assert set(ranking[name]) == {"precision", "recall", "ndcg", "map", "coverage"}
        assert all(0 <= v <= 1 for v in ranking[name].values())
    assert ranking["model"] != ranking["popularity"]
    # Only users with a test rating of 4 or more are ranked.
    from funkflow.tasks.blocks import TEST, load_row_block

    blocks = json.loads((tmp_path / "run" / "blocks" / "blocks.json").read_text())
    relevant_users = set()
    for r in range(blocks["d"]):
        row_block = load_row_block(str(tmp_path / "run" / "blocks"), r, blocks["d"], blocks["n_users"],
                                   blocks["n_items"], blocks["seed"])
        for block in row_block.split(TEST):
            relevant_users |= set(row_block.user_ids[block.users[block.ratings >= 4]].tolist())
    assert ranking["users"] == len(relevant_users)


def test_recommend_after_fold_in_serves_new_and_trained_users(trained, tmp_path, caplog):
    rng = np.random.default_rng(11)
    rated = {500 + u: sorted(rng.choice(80, 12, replace=False).tolist()) for u in range(4)}
    (tmp_path / "new.csv").write_text("user,item,rating\n" + "".join(
        f"{u},{i},{rng.uniform(1, 5):.2f}\n" for u, items in rated.items() for i in items))
    folded = tmp_path / "folded"
    assert main(["fold-in", str(trained), "--ratings", str(tmp_path / "new.csv"), "--out", str(folded),
                 "--rating-scale=-10,10"]) == 0
    assert main(["recommend", str(folded), "--top", "4", "--out", str(tmp_path / "all.parquet"),
                 "--scheduler", "inprocess"]) == 0
    rows = [(r["user"], r["rank"], r["item"]) for r in pq.read_table(tmp_path / "all.parquet").to_pylist()]
    # Trained users: the trained run's lists. Newcomers: their best items but none they rated.
    assert [row for row in rows if row[0] < 500] == _brute_force(trained, 4)
    factors, _ = read_model(folded / "model")
    for user, items in rated.items():
        index = 120 + user - 500  # raw ids sort after the trained users' 0..119
        scores = factors.P[index] @ factors.Q.T + factors.item_bias
        scores[items] = -np.inf
        expected = sorted(range(80), key=lambda i: (-scores[i], i))[:4]
        assert [row[2] for row in rows if row[0] == user] == expected

    # The training run retrained since the fold-in: its users cannot be served from the folded model.
    run_pipeline(load_config(None, [f"data.source={trained.parent / 'data'}", "data.generate=null", "model.k=3",
                                    "train.epochs=2", "train.d=3", "cluster.scheduler=inprocess",
                                    f"output.run_dir={trained}"]), last="train", retrain=True)
    caplog.set_level("WARNING", logger="funkflow")
    assert main(["recommend", str(folded), "--top", "4", "--out", str(tmp_path / "some.parquet"),
                 "--scheduler", "inprocess"]) == 0
    assert "120 users left out: they were trained in" in caplog.text
    served = pq.read_table(tmp_path / "some.parquet").to_pylist()
    assert {r["user"] for r in served} == set(rated)


def test_recommend_and_predict_agree_on_ids_and_scores(trained, tmp_path):
    assert main(["recommend", str(trained), "--top", "3", "--out", str(tmp_path / "top.parquet"),
                 "--scheduler", "inprocess"]) == 0
    lists = pq.read_table(tmp_path / "top.parquet")
    (tmp_path / "pairs.csv").write_text("user,item\n" + "".join(
        f"{r['user']},{r['item']}\n" for r in lists.to_pylist()))
    assert main(["predict", str(trained), "--pairs", str(tmp_path / "pairs.csv"),
                 "--out", str(tmp_path / "p.parquet")]) == 0
    predicted = pq.read_table(tmp_path / "p.parquet")
    assert predicted["user"].type == lists["user"].type and predicted["item"].type == lists["item"].type
    np.testing.assert_allclose(predicted["prediction"].to_numpy(), lists["score"].to_numpy(), atol=1e-5)
    scale = json.loads((trained / "model" / "model.json").read_text())["rating_scale"]
    assert scale[0] <= lists["score"].to_numpy().min() and lists["score"].to_numpy().max() <= scale[1]


def test_a_large_catalogue_is_scored_in_smaller_chunks_with_the_same_lists(trained, tmp_path, monkeypatch):
    """Scores held at once are bounded (CHUNK_SCORES): a large catalogue takes fewer users a chunk."""
    from funkflow.tasks import recommend as worker_side

    assert worker_side.users_per_chunk(500_000) < worker_side.CHUNK_USERS
    assert worker_side.users_per_chunk(80) == worker_side.CHUNK_USERS
    assert main(["recommend", str(trained), "--top", "5", "--out", str(tmp_path / "whole.parquet"),
                 "--scheduler", "inprocess"]) == 0
    monkeypatch.setattr(worker_side, "CHUNK_SCORES", 2 * 80)  # two users of the 80 items at a time
    assert worker_side.users_per_chunk(80) == 2
    assert main(["recommend", str(trained), "--top", "5", "--out", str(tmp_path / "chunked.parquet"),
                 "--scheduler", "inprocess"]) == 0
    assert pq.read_table(tmp_path / "chunked.parquet").equals(pq.read_table(tmp_path / "whole.parquet"))
