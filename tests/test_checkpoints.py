"""Checkpoints: written whole, verified, pruned; resume ends with the same bits as a run never stopped."""

from __future__ import annotations

import hashlib
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import cli_env, kill_when, model_bytes

from funkflow.pipeline.app.cli import main
from funkflow.pipeline.app.stages import run_pipeline

_model = model_bytes


def _metrics(run_dir: Path) -> list[tuple]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["epoch"], r["train_rmse"], r["val_rmse"], r["lr"]) for r in rows]


@pytest.fixture(scope="module")
def uninterrupted(tiny_config, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("whole") / "run"
    run_pipeline(tiny_config(run_dir, "train.epochs=6"))
    return run_dir


def test_checkpoints_are_complete_and_pruned(uninterrupted):
    checkpoints = sorted(p.name for p in (uninterrupted / "checkpoints").iterdir())
    assert checkpoints == ["epoch-000005", "epoch-000006"]  # keep_checkpoints=2
    newest = uninterrupted / "checkpoints" / "epoch-000006"
    manifest = json.loads((newest / "manifest.json").read_text())
    assert manifest["epoch"] == 6
    assert set(manifest["files"]) == {f"{side}-{b:04d}.{part}.npy" for side in ("user", "item") for b in range(3)
                                      for part in ("factors", "bias")} | {"state.json"}
    # The model is the epoch early stopping kept (the best validation RMSE), and that epoch's checkpoint,
    # kept among the newest, holds its factors.
    rows = [json.loads(line) for line in (uninterrupted / "metrics.jsonl").read_text().splitlines()]
    kept = json.loads((uninterrupted / "stages" / "train.json").read_text())["best_epoch"]
    assert kept == min(rows, key=lambda r: r["val_rmse"])["epoch"] and kept in (5, 6)
    for name in manifest["files"]:
        if name.endswith(".npy"):  # the model's blocks are that checkpoint's files
            assert (uninterrupted / "model" / name).read_bytes() == \
                (uninterrupted / "checkpoints" / f"epoch-{kept:06d}" / name).read_bytes()


def test_every_file_of_a_committed_checkpoint_was_flushed_to_disk_before_its_manifest(tiny_config, tmp_path,
                                                                                     monkeypatch):
    """The writer lanes wait on writes block files unflushed and fsyncs them after the last; the manifest that
    makes a checkpoint count must still come after every one of them reached the disk."""
    import os

    flushed: list[str] = []
    manifests_after: dict[str, set[str]] = {}
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        flushed.append(os.path.basename(os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst) -> None:
        real_replace(src, dst)
        if os.path.basename(dst) == "manifest.json" and "checkpoints" in str(dst):
            manifests_after[str(dst)] = set(flushed)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    run_dir = tmp_path / "run"
    run_pipeline(tiny_config(run_dir, "train.epochs=3"))
    assert manifests_after, "no checkpoint was committed"
    for path, before in manifests_after.items():
        if not os.path.exists(path):
            continue  # pruned since
        files = set(json.loads(Path(path).read_text())["files"])
        assert {f for f in files if f.endswith(".npy")} <= before, path


def test_resume_ends_with_the_same_bits(tiny_config, uninterrupted, tmp_path):
    run_pipeline(tiny_config(tmp_path / "run", "train.epochs=3"))
    run_pipeline(tiny_config(tmp_path / "run", "train.epochs=6"), resume=True)
    assert _model(tmp_path / "run") == _model(uninterrupted)
    assert _metrics(tmp_path / "run") == _metrics(uninterrupted)


@pytest.mark.parametrize("damage", ["no manifest", "truncated npy", "wrong checksum", "state lacks a field"])
def test_damaged_checkpoint_is_skipped_for_the_one_before(tiny_config, uninterrupted, tmp_path, caplog, damage):
    caplog.set_level(logging.INFO, logger="funkflow")
    run_pipeline(tiny_config(tmp_path / "run", "train.epochs=3"))
    newest = tmp_path / "run" / "checkpoints" / "epoch-000003"
    target = newest / "user-0001.factors.npy"
    if damage == "no manifest":
        (newest / "manifest.json").unlink()
    elif damage == "truncated npy":
        target.write_bytes(target.read_bytes()[:-7])
    elif damage == "state lacks a field":  # and a manifest rewritten to match: only the state is wrong
        state = json.loads((newest / "state.json").read_text())
        del state["rollbacks"]
        (newest / "state.json").write_text(json.dumps(state))
        manifest = json.loads((newest / "manifest.json").read_text())
        manifest["files"]["state.json"] = hashlib.sha256((newest / "state.json").read_bytes()).hexdigest()
        (newest / "manifest.json").write_text(json.dumps(manifest))
    else:
        data = bytearray(target.read_bytes())
        data[-1] ^= 0xFF
        target.write_bytes(bytes(data))
    run_pipeline(tiny_config(tmp_path / "run", "train.epochs=6"), resume=True)
    assert "skipping checkpoint" in caplog.text and "epoch-000003" in caplog.text
    assert "resuming after epoch 2" in caplog.text
    assert _model(tmp_path / "run") == _model(uninterrupted)


def test_a_checkpoint_holding_nan_is_refused_naming_the_file_even_with_a_manifest_to_match(tiny_config, tmp_path,
                                                                                            capsys):
    import hashlib

    import numpy as np

    run_pipeline(tiny_config(tmp_path / "run", "train.epochs=3"))
    newest = tmp_path / "run" / "checkpoints" / "epoch-000003"
    target = newest / "user-0001.factors.npy"
    values = np.load(target)
    values[0, 0] = np.inf
    np.save(target, values)
    manifest = json.loads((newest / "manifest.json").read_text())
    manifest["files"][target.name] = hashlib.sha256(target.read_bytes()).hexdigest()
    (newest / "manifest.json").write_text(json.dumps(manifest))
    capsys.readouterr()
    code = main(["train", "--run-dir", str(tmp_path / "run"), "--resume", "--set", "train.epochs=6"])
    err = capsys.readouterr().err
    assert code == 65 and "Traceback" not in err
    assert f"{target}: holds non-finite values" in err


def test_resume_with_a_changed_model_exits_78_naming_the_key(tiny_config, tmp_path, capsys):
    run_pipeline(tiny_config(tmp_path / "run", "train.epochs=2"))
    args = ["run", "--resume", "--run-dir", str(tmp_path / "run")]
    for override in ("data.generate.n_users=300", "data.generate.n_items=120", "data.generate.n_ratings=12000",
                     "data.generate.max_user_fraction=0.5", "data.generate.ratings_per_part=5000", "model.k=4",
                     "train.epochs=4", "train.d=3", "cluster.scheduler=inprocess"):
        args += ["--set", override]
    assert main(args) == 78
    assert "model.k: checkpoint has 8, config has 4" in capsys.readouterr().err


def test_a_fresh_start_never_resumes_into_an_older_attempt(tiny_config, tmp_path):
    run_pipeline(tiny_config(tmp_path / "run", "train.epochs=5"))
    run_pipeline(tiny_config(tmp_path / "run", "train.epochs=2", "model.reg=0.1"), retrain=True)
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["epoch-000001", "epoch-000002"]


@pytest.mark.slow
def test_driver_killed_after_third_checkpoint_resumes_to_the_same_bits(tmp_path):
    """SIGKILL `funkflow run` once its third checkpoint exists; `--resume` finishes the run."""
    sets = ["data.generate.n_users=2000", "data.generate.n_items=500", "data.generate.n_ratings=200000",
            "model.k=16", "train.epochs=12", "train.d=3", "cluster.scheduler=inprocess"]
    args = [a for s in sets for a in ("--set", s)]
    command = [sys.executable, "-m", "funkflow", "run", *args]
    env = cli_env()

    subprocess.run([*command, "--run-dir", str(tmp_path / "whole")], cwd=tmp_path, env=env, check=True,
                   capture_output=True, timeout=300)

    run_dir = tmp_path / "killed"
    third = run_dir / "checkpoints" / "epoch-000003" / "manifest.json"
    kill_when([*command, "--run-dir", str(run_dir)], tmp_path, third.exists)
    assert third.exists() and not (run_dir / "model").exists(), "the run must die mid-training"

    done = subprocess.run([*command, "--run-dir", str(run_dir), "--resume"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "resuming after epoch" in done.stderr
    assert _model(run_dir) == _model(tmp_path / "whole")
    assert _metrics(run_dir) == _metrics(tmp_path / "whole")


def test_checkpoints_at_an_fsspec_url_resume_to_the_same_bits(tiny_config, uninterrupted, tmp_path):
    import fsspec

    url = f"memory://funkflow-test-{tmp_path.name}/ckpt"
    run_pipeline(tiny_config(tmp_path / "run", "train.epochs=3", f"output.checkpoints={url}"))
    fs = fsspec.filesystem("memory")
    root = url.removeprefix("memory:/")
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)) == ["epoch-000002", "epoch-000003"]
    assert not (tmp_path / "run" / "checkpoints").exists()
    fs.rm(f"{root}/epoch-000003/manifest.json")  # as if the driver died before the manifest
    run_pipeline(tiny_config(tmp_path / "run", "train.epochs=6", f"output.checkpoints={url}"), resume=True)
    assert _model(tmp_path / "run") == _model(uninterrupted)
    assert _metrics(tmp_path / "run") == _metrics(uninterrupted)
    fs.rm(root, recursive=True)


def test_memory_checkpoints_on_a_cluster_are_refused_before_it_starts(tiny_config, tmp_path):
    from funkflow.pipeline.core.errors import ConfigError

    config = tiny_config(tmp_path / "run", "output.checkpoints=memory://ckpt", "cluster.scheduler=local")
    with pytest.raises(ConfigError, match="output.checkpoints: memory://ckpt lives in one process"):
        run_pipeline(config)
    with pytest.raises(ConfigError, match="output.checkpoints: cannot open 'nosuch://x'"):
        run_pipeline(tiny_config(tmp_path / "run", "output.checkpoints=nosuch://x"))


def test_force_resumes_despite_a_changed_config_but_never_a_changed_shape(tiny_config, tmp_path, caplog):
    from funkflow.pipeline.core.errors import ConfigError

    caplog.set_level(logging.INFO, logger="funkflow")
    run_pipeline(tiny_config(tmp_path / "run", "train.epochs=2"))
    with pytest.raises(ConfigError, match="train.lr: checkpoint has 0.01, config has 0.005"):
        run_pipeline(tiny_config(tmp_path / "run", "train.epochs=4", "train.lr=0.005"), resume=True)
    with pytest.raises(ConfigError, match="model.k: checkpoint has 8, config has 4"):
        run_pipeline(tiny_config(tmp_path / "run", "train.epochs=4", "model.k=4"), resume=True, force=True)
    summary = run_pipeline(tiny_config(tmp_path / "run", "train.epochs=4", "train.lr=0.005"), resume=True, force=True)
    assert "--force: resuming" in caplog.text and "resuming after epoch 2" in caplog.text
    assert summary["epochs"] == 4
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]
    assert rows[2]["lr"] == 0.005  # the new train.lr, not the checkpoint's step size
