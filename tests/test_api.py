"""The Python API: fit on a table, predict, recommend, fold in, save and load (no pickle)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from funkflow import FunkSVD
from funkflow.pipeline.app.cli import main
from funkflow.pipeline.core.errors import DataError
from funkflow.pipeline.serving.model import read_model


def _table(seed: int = 0, n_users: int = 200, n_items: int = 60) -> pa.Table:
    rng = np.random.default_rng(seed)
    P, Q = rng.normal(0, 0.5, (n_users, 3)), rng.normal(0, 0.5, (n_items, 3))
    users, items = np.nonzero(rng.random((n_users, n_items)) < 0.3)
    ratings = np.clip(np.rint(3.2 + np.einsum("nk,nk->n", P[users], Q[items]) + rng.normal(0, 0.3, users.shape[0])),
                      1, 5)
    return pa.table({"user": [f"u{u}" for u in users], "item": [f"i{i}" for i in items], "rating": ratings})


@pytest.fixture(scope="module")
def fitted(tmp_path_factory) -> FunkSVD:
    seen = []
    model = FunkSVD(k=4, epochs=6, d=2, run_dir=tmp_path_factory.mktemp("api") / "run", callbacks=[seen.append],
                    options={"cluster.scheduler": "inprocess", "train.early_stopping_patience": 0})
    model.fit(_table())
    model.epochs_seen = [report.epoch for report in seen]
    return model


def test_fit_runs_the_pipeline_and_calls_back_each_epoch(fitted):
    assert fitted.epochs_seen == [1, 2, 3, 4, 5, 6]
    assert fitted.summary_["test_rmse"] < fitted.summary_["baselines"]["global_mean"]["rmse"]


def test_predict_is_the_models_formula_with_fallbacks(fitted):
    factors, info = read_model(fitted.run_dir / "model")
    users = pq.read_table(fitted.run_dir / "model" / "users.parquet")["id"].to_pylist()
    items = pq.read_table(fitted.run_dir / "model" / "items.parquet")["id"].to_pylist()
    u, i = users.index("u7"), items.index("i3")
    got = fitted.predict(["u7", "nobody", "u7"], ["i3", "i3", "nothing"])
    expected = [factors.global_mean + factors.user_bias[u] + factors.item_bias[i] + factors.P[u] @ factors.Q[i],
                factors.global_mean + factors.item_bias[i], factors.global_mean + factors.user_bias[u]]
    np.testing.assert_allclose(got, np.clip(expected, 1, 5), rtol=1e-5)


def test_recommend_leaves_out_what_the_user_rated(fitted):
    top = fitted.recommend(["u1", "u2"], n=5).to_pylist()
    rated = {(r["user"], r["item"]) for r in _table().to_pylist()}
    assert [r["rank"] for r in top] == [1, 2, 3, 4, 5] * 2
    # Only test-split ratings may show up: training and validation ones are excluded.
    blocks_rated = sum((r["user"], r["item"]) in rated for r in top)
    assert blocks_rated <= 2
    scores = [r["score"] for r in top[:5]]
    assert scores == sorted(scores, reverse=True)


def test_save_then_load_predicts_identically_and_a_pickle_is_refused(fitted, tmp_path):
    fitted.save(tmp_path / "saved")
    loaded = FunkSVD.load(tmp_path / "saved")
    users, items = ["u1", "u5", "x"], ["i2", "i9", "i1"]
    np.testing.assert_array_equal(loaded.predict(users, items), fitted.predict(users, items))
    np.save(tmp_path / "saved" / "user-0001.factors.npy", np.array([{"evil": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(DataError, match=r"user-0001\.factors\.npy: (longer than written|truncated|checksum mismatch)"):
        FunkSVD.load(tmp_path / "saved")


def test_fold_in_a_new_user(fitted, tmp_path):
    model = FunkSVD.load(fitted.run_dir / "model")
    ratings = pa.table({"user": ["newbie"] * 6, "item": [f"i{j}" for j in range(6)],
                        "rating": [5.0, 5.0, 4.0, 1.0, 1.0, 2.0]})
    before = model.predict(["newbie"], ["i0"])[0]
    model.fold_in(ratings)
    after = model.predict(["newbie", "newbie"], ["i0", "i3"])
    assert after[0] != before and after[0] > after[1]  # likes what it rated high
    assert model.recommend(["newbie"], n=3, exclude_seen=False).num_rows == 3
    # What the newcomer rated is left out; a trained user's list is the one the trained model gives.
    lists = model.recommend(["newbie", "u1"], n=5)
    newbie = [row["item"] for row in lists.to_pylist() if row["user"] == "newbie"]
    assert len(newbie) == 5 and not set(newbie) & {f"i{j}" for j in range(6)}
    trained = fitted.recommend(["u1"], n=5).to_pylist()
    assert [row for row in lists.to_pylist() if row["user"] == "u1"] == trained
    # Saved and loaded, and through the CLI, the folded model serves the newcomer the same list.
    model.save(tmp_path / "folded" / "model")
    assert FunkSVD.load(tmp_path / "folded" / "model").recommend(["newbie"], n=5) == lists.slice(0, 5)
    (tmp_path / "who.txt").write_text("newbie\n")
    assert main(["recommend", str(tmp_path / "folded"), "--top", "5", "--users", str(tmp_path / "who.txt"),
                 "--out", str(tmp_path / "top.parquet"), "--scheduler", "inprocess"]) == 0
    assert pq.read_table(tmp_path / "top.parquet").to_pylist() == lists.slice(0, 5).to_pylist()


def test_fit_and_fold_in_leave_no_temporary_directory_behind(fitted):
    import gc
    import tempfile

    def scratch() -> set[Path]:
        return set(Path(tempfile.gettempdir()).glob("funkflow-*"))

    before = scratch()
    model = FunkSVD(k=2, epochs=2, options={"cluster.scheduler": "inprocess"}).fit(_table(n_users=40, n_items=20))
    model.fold_in(pa.table({"user": ["late"] * 3, "item": ["i0", "i1", "i2"], "rating": [4.0, 3.0, 5.0]}))
    assert len(scratch() - before) == 2  # the run directory and the folded model
    del model
    gc.collect()
    assert scratch() == before


def test_fit_on_a_callers_client_gives_the_in_process_bits(fitted, local_cluster, tmp_path):
    from distributed import Client

    with Client(local_cluster) as client:
        on_cluster = FunkSVD(k=4, epochs=6, d=2, run_dir=tmp_path / "run",
                             options={"train.early_stopping_patience": 0}).fit(_table(), client=client)
    np.testing.assert_array_equal(on_cluster.factors_.P, fitted.factors_.P)
    np.testing.assert_array_equal(on_cluster.factors_.Q, fitted.factors_.Q)


def _same_model(model: FunkSVD, fitted: FunkSVD) -> None:
    np.testing.assert_array_equal(model.factors_.P, fitted.factors_.P)
    np.testing.assert_array_equal(model.factors_.Q, fitted.factors_.Q)


def _movielens_named(table: pa.Table) -> pa.Table:
    return table.rename_columns(["userId", "movieId", "rating"])


def test_a_pandas_frame_with_movielens_column_names_is_mapped_by_name(fitted, tmp_path):
    """`userId, movieId, rating` failed: "the table lacks the columns item, user"."""
    frame = _movielens_named(_table()).to_pandas()
    model = FunkSVD(k=4, epochs=6, d=2, run_dir=tmp_path / "run",
                    options={"cluster.scheduler": "inprocess", "train.early_stopping_patience": 0}).fit(frame)
    _same_model(model, fitted)


def test_columns_of_other_names_are_named_by_argument_or_refused_saying_which(fitted, tmp_path):
    frame = _table().rename_columns(["a", "b", "c"]).to_pandas()
    options = {"cluster.scheduler": "inprocess", "train.early_stopping_patience": 0}
    with pytest.raises(DataError, match=r"names no user column; say which with user_col=NAME"):
        FunkSVD(k=4, epochs=6, d=2, run_dir=tmp_path / "refused", options=options).fit(frame)
    model = FunkSVD(k=4, epochs=6, d=2, run_dir=tmp_path / "run", options=options).fit(
        frame, user_col="a", item_col="b", rating_col="c")
    _same_model(model, fitted)


def test_a_dask_dataframe_is_written_by_its_partitions_on_the_cluster_and_a_parquet_directory_read_as_parquet(
        fitted, local_cluster, tmp_path):
    """fit(dask_dataframe) failed with a raw ArrowInvalid; fit("parts/") read Parquet parts as CSV."""
    import dask.dataframe as dd
    from distributed import Client, get_task_stream

    frame = dd.from_pandas(_movielens_named(_table()).to_pandas(), npartitions=3)
    options = {"train.early_stopping_patience": 0}
    with Client(local_cluster) as client, get_task_stream(client) as stream:
        from_dask = FunkSVD(k=4, epochs=6, d=2, run_dir=tmp_path / "run", options=options).fit(frame, client=client)
    _same_model(from_dask, fitted)
    assert len(list((tmp_path / "run" / "input").glob("*.parquet"))) == 3
    assert sum("toparquetdata" in str(task["key"]) for task in stream.data) == 3  # written by the workers
    frame.to_parquet(tmp_path / "parts", write_index=False)
    from_parts = FunkSVD(k=4, epochs=6, d=2, run_dir=tmp_path / "parts-run",
                         options={**options, "cluster.scheduler": "inprocess"}).fit(str(tmp_path / "parts"))
    _same_model(from_parts, fitted)


def test_predict_refuses_text_ids_for_a_model_of_integer_ids(tmp_path):
    """README's own example answered the global mean twice, silently, where the CLI refuses (65)."""
    table = _table()
    integers = pa.table({"user": pa.array([int(u[1:]) for u in table["user"].to_pylist()]),
                         "item": pa.array([int(i[1:]) for i in table["item"].to_pylist()]),
                         "rating": table["rating"]})
    model = FunkSVD(k=4, epochs=2, d=2, run_dir=tmp_path / "run", options={"cluster.scheduler": "inprocess"})
    model.fit(integers)
    with pytest.raises(DataError, match="a user id is not an integer, and all of the model's are"):
        model.predict(["u1", "u2"], ["i9", "i3"])
    assert model.predict([1, 2], [9, 3]).shape == (2,)


def test_the_readme_example_runs_from_a_plain_script_without_a_main_guard(tmp_path):
    """Small data train in-process, so a script needs no `if __name__ == "__main__":` (no worker processes
    are spawned, which would re-import it)."""
    import subprocess
    import sys

    from conftest import cli_env

    pq.write_table(_table(), tmp_path / "ratings.parquet")
    (tmp_path / "script.py").write_text(
        "from funkflow import FunkSVD\n"
        "model = FunkSVD(k=4, epochs=3)\n"
        "model.fit('ratings.parquet')\n"
        "print('predicted', model.predict(['u1'], ['i2'])[0])\n")
    done = subprocess.run([sys.executable, "script.py"], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env=cli_env(), check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "predicted" in done.stdout


def test_fit_passes_values_not_yaml_text(tmp_path):
    """A path with " #" in it (YAML would cut a comment there) and an option YAML would read as a date."""
    run_dir = tmp_path / "runs #1" / "it's: here"
    model = FunkSVD(k=2, epochs=2, run_dir=run_dir, options={"cluster.scheduler": "inprocess",
                                                             "evaluate.relevance_threshold": 4})
    model.fit(_table(n_users=40, n_items=20))
    assert (run_dir / "model" / "model.json").is_file()
    assert model.summary_["run_dir"] == str(run_dir)
