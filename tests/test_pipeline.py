"""The whole chain in-process: outputs, learning, up-to-date skips, early stopping, divergence."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from conftest import model_bytes

from funkflow.pipeline.app.cli import main
from funkflow.pipeline.app.stages import run_pipeline
from funkflow.pipeline.core.config import load_config
from funkflow.pipeline.core.errors import EXIT_DATAERR, EXIT_DIVERGED, EXIT_OK, ConfigError, TrainingDiverged
from funkflow.pipeline.serving.model import read_model
from funkflow.pipeline.training.records import EpochReport
from funkflow.pipeline.training.train import _bold_driver_factor


def test_run_writes_the_documented_run_directory(tiny_config, tmp_path):
    summary = run_pipeline(tiny_config(tmp_path / "run"))
    run = tmp_path / "run"
    blocks = [f"model/{side}-{b:04d}.{part}.npy" for side in ("user", "item") for b in range(3)
              for part in ("factors", "bias")]
    for name in ("summary.json", "metrics.jsonl", "config.yaml", *blocks, "model/model.json", "model/users.parquet",
                 "model/items.parquet", "model/manifest.json"):
        assert (run / name).is_file(), name
    on_disk = json.loads((run / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    for key in ("test_rmse", "test_mae", "train_rmse", "epochs", "k", "d", "seed", "n_ratings", "seconds",
                "floor_rmse"):
        assert key in on_disk
    assert set(on_disk["seconds"]) == {"generate", "block", "train", "evaluate"}
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]
    assert set(rows[0]) == {"epoch", "train_rmse", "val_rmse", "lr", "seconds", "ratings_per_second"}
    factors, info = read_model(run / "model")
    assert factors.P.shape == (300, 8) and factors.Q.shape == (120, 8)
    assert factors.P.dtype == np.float32 and info["k"] == 8
    # The model beats both baselines and the floor is below everything.
    assert summary["floor_rmse"] < summary["test_rmse"] < summary["baselines"]["global_mean"]["rmse"]


def test_planted_low_rank_is_rebuilt(planted_low_rank, tmp_path):
    config = load_config(None, [
        f"data.source={planted_low_rank}", "data.generate=null", "model.k=3", "model.reg=0", "model.bias_reg=0",
        "model.init_std=0.3", "train.epochs=300", "train.lr=0.05", "train.d=2", "train.checkpoint_every=0",
        "split.validation_fraction=0", "split.test_fraction=0.01", "cluster.scheduler=inprocess",
        f"output.run_dir={tmp_path / 'run'}",
    ])
    summary = run_pipeline(config)
    assert summary["train_rmse"] < 0.01


def test_changed_model_retrains_but_keeps_data_and_blocks(tiny_config, tmp_path):
    run_pipeline(tiny_config(tmp_path / "run"))
    blocks_stamp = (tmp_path / "run" / "blocks" / "blocks.json").stat().st_mtime_ns
    p_before = read_model(tmp_path / "run" / "model")[0].P
    with pytest.raises(ConfigError, match=r"holds a model trained with another configuration .*\n  "
                                          r"model.k: the run has 8, config has 4\n.*--retrain"):
        run_pipeline(tiny_config(tmp_path / "run", "model.k=4"))
    assert read_model(tmp_path / "run" / "model")[0].P.tobytes() == p_before.tobytes(), "the model is kept"
    run_pipeline(tiny_config(tmp_path / "run", "model.k=4"), retrain=True)
    assert (tmp_path / "run" / "blocks" / "blocks.json").stat().st_mtime_ns == blocks_stamp
    assert read_model(tmp_path / "run" / "model")[0].P.shape == (300, 4) != p_before.shape


def test_a_verb_without_config_uses_the_runs_own_and_another_config_never_replaces_its_model(tiny_config,
                                                                                              tmp_path, capsys):
    """A stage verb on a copied run directory, with no CONFIG, used to train the embedded demo over its model."""
    import shutil

    from funkflow.pipeline.core.config import default_config_path

    run_pipeline(tiny_config(tmp_path / "original", "model.k=4", "train.epochs=2"))
    copy = tmp_path / "copy"
    shutil.copytree(tmp_path / "original", copy)
    model_before = model_bytes(copy)
    summary_before = (copy / "summary.json").read_text()

    assert main(["export", "--run-dir", str(copy)]) == EXIT_OK
    err = capsys.readouterr().err
    assert f"using the configuration {copy} was made with" in err and "train: up to date" in err
    assert (copy / "export" / "users.parquet").is_dir()

    assert main(["export", str(default_config_path()), "--run-dir", str(copy)]) == 78
    err = capsys.readouterr().err
    assert "holds a model trained with another configuration" in err and "model.k: the run has 4, config has 32" in err
    assert main(["run", "--run-dir", str(copy), "--set", "model.reg=0.2"]) == 78
    assert "model.reg: the run has 0.05, config has 0.2" in capsys.readouterr().err
    assert model_bytes(copy) == model_before
    assert (copy / "summary.json").read_text() == summary_before
    # Running longer is the same model trained further, not another one.
    assert main(["train", "--run-dir", str(copy), "--set", "train.epochs=3"]) == EXIT_OK
    assert main(["run", "--run-dir", str(copy), "--set", "model.reg=0.2", "--retrain"]) == EXIT_OK
    assert model_bytes(copy) != model_before


def test_early_stopping_keeps_the_best_epoch(tiny_config, tmp_path):
    # A large k without regularisation overfits; validation RMSE turns up and training stops.
    config = tiny_config(tmp_path / "run", "model.k=32", "model.reg=0", "train.epochs=60",
                         "train.lr_schedule=constant", "train.lr=0.03", "train.early_stopping_patience=2")
    run_pipeline(config)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    best = min(rows, key=lambda r: r["val_rmse"])
    assert len(rows) < 60 and len(rows) == best["epoch"] + 2
    record = json.loads((tmp_path / "run" / "stages" / "train.json").read_text())
    assert record["best_epoch"] == best["epoch"]


def test_no_bias_model_trains(tiny_config, tmp_path):
    summary = run_pipeline(tiny_config(tmp_path / "run", "model.use_bias=false", "train.epochs=15"))
    factors, _ = read_model(tmp_path / "run" / "model")
    assert factors.global_mean == 0.0 and not factors.user_bias.any() and not factors.item_bias.any()
    assert summary["test_rmse"] < summary["baselines"]["global_mean"]["rmse"]


def test_divergence_exits_with_its_own_code_and_writes_no_model(tmp_path, capsys):
    code = main(["run", "--run-dir", str(tmp_path / "run"), *sum((["--set", s] for s in [
        "data.generate.n_users=300", "data.generate.n_items=120", "data.generate.n_ratings=12000",
        "data.generate.max_user_fraction=0.5", "model.k=8", "train.epochs=3", "train.d=2", "train.lr=50",
        "train.max_rollbacks=1", "cluster.scheduler=inprocess"]), [])])
    assert code == EXIT_DIVERGED
    err = capsys.readouterr().err
    assert "training diverged at epoch 1" in err and "lower train.lr" in err
    assert not (tmp_path / "run" / "model").exists()


def test_divergence_recovers_by_rollback(tiny_config, tmp_path, caplog):
    summary = run_pipeline(tiny_config(tmp_path / "run", "train.lr=0.9", "train.max_rollbacks=8"))
    assert "rolled back" in caplog.text
    assert np.isfinite(summary["test_rmse"])


def test_missing_source_is_a_data_error(tmp_path, capsys):
    code = main(["run", "--set", f"data.source={tmp_path / 'nowhere'}", "--set", "data.generate=null",
                 "--run-dir", str(tmp_path / "run")])
    assert code == EXIT_DATAERR
    assert "nowhere: not a canonical dataset" in capsys.readouterr().err


def test_training_diverged_is_raised_in_process(tiny_config, tmp_path):
    with pytest.raises(TrainingDiverged):
        run_pipeline(tiny_config(tmp_path / "run", "train.lr=50", "train.max_rollbacks=0"))


def test_generate_cli_writes_a_netflix_shaped_dataset(tmp_path, capsys):
    from funkflow.pipeline.data.dataset import open_dataset
    from funkflow.tasks.synthetic import SyntheticSpec

    out = tmp_path / "netflix"
    code = main(["generate", "--scale", "0.0002", "--out", str(out), "--seed", "3", "--scheduler", "inprocess"])
    assert code == 0
    spec = SyntheticSpec.netflix_shaped(0.0002)
    dataset = open_dataset(out)
    assert (dataset.n_users, dataset.n_items, dataset.n_ratings) == (spec.n_users, spec.n_items, spec.n_ratings)
    assert dataset.meta["generator"]["seed"] == 3
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind
    assert main(["generate", "--scale", "0.0002", "--out", str(out), "--scheduler", "inprocess"]) == 73
    assert "exists and is not empty" in capsys.readouterr().err
    assert main(["generate", "--scale", "-1", "--out", str(tmp_path / "x"), "--scheduler", "inprocess"]) == 2


def test_unreachable_scheduler_exits_75(tmp_path, capsys):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = main(["run", "--scheduler", f"tcp://127.0.0.1:{port}", "--set", "cluster.timeout=2",
                 "--run-dir", str(tmp_path / "run")])
    assert code == 75
    assert f"cannot reach the Dask scheduler at tcp://127.0.0.1:{port}" in capsys.readouterr().err


def test_train_then_evaluate_as_separate_commands(tmp_path, capsys, caplog):
    args = ["--run-dir", str(tmp_path / "run"), "--set", "cluster.scheduler=inprocess",
            "--set", "data.generate.n_users=300", "--set", "data.generate.n_items=120",
            "--set", "data.generate.n_ratings=12000", "--set", "model.k=8", "--set", "train.epochs=3"]
    assert main(["train", *args]) == 0
    assert (tmp_path / "run" / "model" / "manifest.json").is_file()
    assert not (tmp_path / "run" / "summary.json").exists()
    assert main(["evaluate", *args]) == 0
    out = capsys.readouterr()
    assert "test RMSE" in out.out and "train: up to date" in caplog.text
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["epochs"] == 3


def test_a_stage_whose_output_is_gone_runs_again(tiny_config, tmp_path):
    import shutil

    config = tiny_config(tmp_path / "run")
    first = run_pipeline(config)
    shutil.rmtree(tmp_path / "run" / "model")
    again = run_pipeline(config)
    assert (tmp_path / "run" / "model" / "manifest.json").is_file()
    assert again["test_rmse"] == first["test_rmse"]


def test_a_hundred_times_the_default_lr_recovers_or_exits_70_and_never_writes_nan(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="funkflow")
    default_lr = load_config(None).train.lr
    code = main(["run", "--run-dir", str(tmp_path / "run"), *sum((["--set", s] for s in [
        "data.generate.n_users=300", "data.generate.n_items=120", "data.generate.n_ratings=12000",
        "data.generate.max_user_fraction=0.5", "model.k=8", "train.epochs=4", "train.d=3",
        f"train.lr={100 * default_lr}", "cluster.scheduler=inprocess"]), [])])
    assert code in (EXIT_OK, EXIT_DIVERGED)
    assert "rolled back" in caplog.text
    if code == EXIT_OK:
        factors, _ = read_model(tmp_path / "run" / "model")
        assert all(np.isfinite(a).all() for a in (factors.P, factors.Q, factors.user_bias, factors.item_bias))
    else:
        assert not (tmp_path / "run" / "model").exists()


def test_a_block_whose_factors_overflow_reports_an_infinite_error():
    """The per-stratum divergence check rests on this: overflowed factors give sse = inf."""
    from funkflow.tasks.blocks import BlockRatings, RowBlock
    from funkflow.tasks.training import Hyper, init_factors, sgd_update

    users, items = (a.ravel().astype(np.int32) for a in np.meshgrid(np.arange(20), np.arange(10), indexing="ij"))
    ratings = np.random.default_rng(0).integers(1, 6, users.shape[0]).astype(np.float32)
    empty = BlockRatings(*(np.empty(0, dtype=t) for t in (np.int32, np.int32, np.float32)))
    row_block = RowBlock(0, np.arange(20, dtype=np.int32), ((BlockRatings(users, items, ratings),), (empty,), (empty,)))
    hyper = Hyper(lr=1e6, reg=0.0, bias_reg=0.0, use_bias=True, global_mean=3.0, order="user_runs",
                  users_per_run=4, tile_items=0)
    users, items, sse = sgd_update(row_block.split(0)[0], init_factors(20, 4, 0.1, 1), init_factors(10, 4, 0.1, 2),
                                   hyper, 7)
    assert sse == float("inf")
    sane = Hyper(lr=0.01, reg=0.05, bias_reg=0.01, use_bias=True, global_mean=3.0, order="user_runs",
                 users_per_run=4, tile_items=0)
    assert np.isfinite(sgd_update(row_block.split(0)[0], init_factors(20, 4, 0.1, 1), init_factors(10, 4, 0.1, 2),
                                  sane, 7)[2])


def test_export_writes_factors_with_raw_ids_as_parquet(tiny_config, tmp_path, capsys):
    import pyarrow.parquet as pq

    run_dir = tmp_path / "run"
    assert main(["export", "--run-dir", str(run_dir), *sum((["--set", s] for s in [
        "data.generate.n_users=300", "data.generate.n_items=120", "data.generate.n_ratings=12000",
        "data.generate.max_user_fraction=0.5", "model.k=8", "train.epochs=2", "train.d=3",
        "cluster.scheduler=inprocess"]), [])]) == 0
    factors, _ = read_model(run_dir / "model")
    users = pq.read_table(run_dir / "export" / "users.parquet").sort_by("id")  # one part per block
    assert users["id"].to_pylist() == list(range(1, 301))  # synthetic raw ids are 1-based
    np.testing.assert_array_equal(np.array(users["factors"].to_pylist(), dtype=np.float32), factors.P)
    np.testing.assert_array_equal(users["bias"].to_numpy(), factors.user_bias)
    items = pq.read_table(run_dir / "export" / "items.parquet").sort_by("id")
    np.testing.assert_array_equal(np.array(items["factors"].to_pylist(), dtype=np.float32), factors.Q)
    assert len(list((run_dir / "export" / "items.parquet").glob("part-*.parquet"))) == 3
    assert not (run_dir / "summary.json").exists()  # export needs a model, not an evaluation


def test_auto_d_follows_the_data_alone_so_the_default_gives_the_same_bits_on_any_thread_count(tiny_config,
                                                                                              tmp_path):
    from funkflow.pipeline.core.cluster import InProcessExecutor

    sets = ("train.d=auto", "data.generate.n_users=2000", "data.generate.n_items=500", "data.generate.n_ratings=200000")
    one = run_pipeline(tiny_config(tmp_path / "one", *sets), executor=InProcessExecutor(threads=1))
    three = run_pipeline(tiny_config(tmp_path / "three", *sets), executor=InProcessExecutor(threads=3))
    assert one["d"] == three["d"] == 2  # 200k ratings: blocks of 50k
    assert model_bytes(tmp_path / "one") == model_bytes(tmp_path / "three")


def _reports(*val_rmse: float | None, train_rmse: list[float] | None = None) -> list[EpochReport]:
    train_rmse = train_rmse or [1.0 - 0.01 * e for e in range(len(val_rmse))]
    return [EpochReport(epoch=e + 1, train_rmse=t, val_rmse=v, lr=0.01, seconds=1.0, ratings_per_second=1.0)
            for e, (t, v) in enumerate(zip(train_rmse, val_rmse))]


@pytest.mark.parametrize(("val_rmse", "train_rmse", "factor"), [
    ((0.95,), [0.9], 1.05),                                   # the first epoch
    ((0.95, 0.94), [0.9, 0.8], 1.05),                         # progress on both
    ((0.95, 0.94, 0.9401), [0.9, 0.8, 0.7], 1.05),            # validation within noise of its best
    ((0.95, 0.94, 0.945), [0.9, 0.8, 0.7], 0.5),              # validation rose, training fell: halved
    ((0.95, 0.96, 0.97), [0.9, 0.8, 0.7], 1.0),               # never better than epoch 1 yet: held
    ((0.95, 0.94, 0.93), [0.9, 0.8, 0.85], 0.5),              # the training loss rose: halved
    ((None, None), [0.9, 0.8], 1.05),                         # no validation: the training loss alone
    ((None, None), [0.8, 0.9], 0.5),
])
def test_the_bold_driver_watches_validation(val_rmse, train_rmse, factor):
    assert _bold_driver_factor(_reports(*val_rmse, train_rmse=train_rmse)) == factor


def test_early_stopping_without_validation_says_so(tiny_config, tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="funkflow")
    run_pipeline(tiny_config(tmp_path / "run", "split.validation_fraction=0", "train.early_stopping_patience=3"))
    assert "no validation split: all 4 epochs run and the last is kept" in caplog.text
    rows = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 4


def test_refit_trains_the_kept_epochs_again_on_train_and_validation(tiny_config, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="funkflow")
    run_dir = tmp_path / "run"
    config = tiny_config(run_dir, "train.refit=true", "train.epochs=12", "train.lr_schedule=constant",
                         "train.lr=0.03", "model.reg=0", "model.k=16")
    summary = run_pipeline(config)
    kept = json.loads((run_dir / "selection" / "stages" / "train.json").read_text())["best_epoch"]
    final = load_config(run_dir / "config.yaml")
    assert final.split.validation_fraction == 0 and final.train.epochs == kept and not final.train.refit
    blocks = json.loads((run_dir / "blocks" / "blocks.json").read_text())
    selection_blocks = json.loads((run_dir / "selection" / "blocks" / "blocks.json").read_text())
    counts, before = np.array(blocks["counts"]).sum(axis=0), np.array(selection_blocks["counts"]).sum(axis=0)
    assert counts[1] == 0 and counts[0] == before[0] + before[1] and counts[2] == before[2]  # same test ratings
    assert summary["epochs"] == kept and f"early stopping kept epoch {kept}" in caplog.text
    caplog.clear()
    run_pipeline(config)
    assert caplog.text.count("train: up to date") == 2


def test_refit_follows_the_step_sizes_of_the_training_that_chose_its_epochs(tiny_config, tmp_path):
    """Without validation the bold driver grew the step ×1.05 every epoch: the refit followed another path."""
    run_dir = tmp_path / "run"
    run_pipeline(tiny_config(run_dir, "train.refit=true", "train.epochs=12", "train.lr=0.03", "model.k=16"))

    def steps(where) -> list[float]:
        return [json.loads(line)["lr"] for line in (where / "metrics.jsonl").read_text().splitlines()]

    kept = json.loads((run_dir / "selection" / "stages" / "train.json").read_text())["best_epoch"]
    selected = steps(run_dir / "selection")
    assert len(set(selected[:kept])) > 1  # the bold driver moved the step while validation watched
    assert steps(run_dir) == selected[:kept]


def test_each_in_process_executor_holds_its_own_extensions():
    """In-process, a worker plugin lives on its executor, found by that executor's tasks as a Dask task finds
    its worker's: no state shared through the module between runs."""
    from funkflow.pipeline.core.cluster import InProcessExecutor, in_process_extension

    class Probe:
        name = "probe"

    ours, other = InProcessExecutor(), InProcessExecutor(2)
    plugin = Probe()
    ours.register_worker_plugin(plugin)
    ours.register_worker_plugin(Probe())  # a second registration keeps the first, as on Dask
    assert ours.gather([ours.submit(in_process_extension, "probe", name="probe")]) == [plugin]
    with pytest.raises(RuntimeError, match="no probe here"):
        other.gather([other.submit(in_process_extension, "probe", name="probe")])
    with pytest.raises(RuntimeError, match="no probe here"):
        in_process_extension("probe")  # outside any task
    other.close()
