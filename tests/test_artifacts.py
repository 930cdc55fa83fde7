"""Every artifact verified when read: a damaged or foreign model, dataset or block file is refused with one
line naming it (exit 65), never used, never an internal error."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from funkflow.pipeline.app.api import FunkSVD
from funkflow.pipeline.app.cli import main
from funkflow.pipeline.app.stages import run_pipeline
from funkflow.pipeline.core.errors import DataError
from funkflow.tasks.artifacts import MANIFEST, ArtifactError, load_array, verify, write_manifest
from funkflow.tasks.io import read_json


def _object_array(path: Path) -> None:
    np.save(path, np.array([{"evil": 1}], dtype=object), allow_pickle=True)


def _truncated(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:1000])


def _first_rows(path: Path) -> None:
    np.save(path, np.load(path)[:10])


def _flipped_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def _no_manifest(path: Path) -> None:
    (path.parent / MANIFEST).unlink()


def _nan_with_a_manifest_to_match(path: Path) -> None:
    for block in path.parent.glob("user-*.factors.npy"):  # every user's, so that each reader meets one
        values = np.load(block)
        values[:, 0] = np.nan
        np.save(block, values)
    write_manifest(path.parent, "model", sorted(read_json(path.parent / MANIFEST)["files"]))


BLOCK = "user-0000.factors.npy"  # one of the model's factor blocks
DAMAGES = {
    "pickle inside": (_object_array, rf"{BLOCK}: (longer than written|truncated)"),
    "truncated": (_truncated, rf"{BLOCK}: truncated"),
    "first 10 rows only": (_first_rows, rf"{BLOCK}: truncated"),
    "a changed byte": (_flipped_byte, rf"{BLOCK}: checksum mismatch"),
    "no manifest": (_no_manifest, "no manifest.json, so not a complete funkflow model"),
    "NaN, manifest rewritten": (_nan_with_a_manifest_to_match, r"user-(\d{4}|\*)\.factors\.npy: holds non-finite"),
}


@pytest.fixture(scope="module")
def finished_run(tiny_config, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("artifacts") / "run"
    run_pipeline(tiny_config(run_dir, "model.k=4", "train.epochs=2"))
    return run_dir


def _damaged(finished_run: Path, tmp_path: Path, damage: str) -> Path:
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    DAMAGES[damage][0](run_dir / "model" / BLOCK)
    return run_dir


def _refused(code: int, err: str, damage: str) -> None:
    assert code == 65, err
    assert "Traceback" not in err and "internal error" not in err
    lines = [line for line in err.splitlines() if line.startswith("funkflow: error:")]
    assert len(lines) == 1 and re.search(DAMAGES[damage][1], lines[0]), err


TINY = ["data.generate.n_users=300", "data.generate.n_items=120", "data.generate.n_ratings=12000",
        "data.generate.max_user_fraction=0.5", "data.generate.ratings_per_part=5000", "model.k=4", "train.d=3",
        "cluster.scheduler=inprocess"]


def _sets(*overrides: str) -> list[str]:
    return [arg for o in (*TINY, *overrides) for arg in ("--set", o)]


@pytest.mark.parametrize("damage", DAMAGES)
@pytest.mark.parametrize("verb", ["predict", "recommend", "fold-in", "export", "evaluate", "warm start"])
def test_every_reader_refuses_a_damaged_model(finished_run, tmp_path, capsys, damage, verb):
    run_dir = _damaged(finished_run, tmp_path, damage)
    (tmp_path / "pairs.csv").write_text("user,item\n1,2\n2,3\n")
    (tmp_path / "new.csv").write_text("user,item,rating\n90001,2,4\n90001,3,5\n")
    out = {"predict": tmp_path / "out.csv", "recommend": tmp_path / "out.parquet"}.get(verb, tmp_path / "out")
    args = {
        "predict": ["predict", str(run_dir), "--pairs", str(tmp_path / "pairs.csv"), "--out", str(out)],
        "recommend": ["recommend", str(run_dir), "--top", "3", "--out", str(out), "--scheduler", "inprocess"],
        "fold-in": ["fold-in", str(run_dir), "--ratings", str(tmp_path / "new.csv"), "--out", str(out)],
        "export": ["export", "--run-dir", str(run_dir), *_sets("train.epochs=2")],
        "evaluate": ["evaluate", "--run-dir", str(run_dir), *_sets("train.epochs=2")],
        "warm start": ["train", "--run-dir", str(out), *_sets("train.epochs=1", f"train.init_from={run_dir}")],
    }[verb]
    if verb == "evaluate":
        (run_dir / "stages" / "evaluate.json").unlink()  # so that it runs again and reads the model
    capsys.readouterr()
    code = main(args)
    _refused(code, capsys.readouterr().err, damage)
    assert not (out / "model").exists() and not (run_dir / "export").exists() and not out.is_file(), \
        "nothing is written from a damaged model"


@pytest.mark.parametrize("damage", DAMAGES)
def test_the_api_refuses_a_damaged_model(finished_run, tmp_path, damage):
    run_dir = _damaged(finished_run, tmp_path, damage)
    with pytest.raises(DataError, match=DAMAGES[damage][1]):
        FunkSVD.load(run_dir / "model")


def test_an_intact_model_loads_and_its_manifest_lists_every_file(finished_run):
    files = verify(finished_run / "model", "model")
    blocks = {f"{side}-{b:04d}.{part}.npy" for side in ("user", "item") for b in range(3)
              for part in ("factors", "bias")}
    assert set(files) == blocks | {"users.parquet", "items.parquet", "model.json"}
    assert files[BLOCK]["dtype"] == "float32" and files[BLOCK]["shape"][1] == 4
    assert FunkSVD.load(finished_run / "model").predict([1], [2]).shape == (1,)


def test_the_one_array_reader_checks_pickle_shape_dtype_and_kind_against_the_manifest(tmp_path):
    np.save(tmp_path / "a.npy", np.zeros((3, 2), np.float32))
    write_manifest(tmp_path, "model", ["a.npy"])
    files = verify(tmp_path, "model")
    assert load_array(tmp_path, "a.npy", files).shape == (3, 2)
    with pytest.raises(ArtifactError, match=r"a\.npy: float32\[3, 2\], the manifest says float64\[3, 2\]"):
        load_array(tmp_path, "a.npy", {"a.npy": {**files["a.npy"], "dtype": "float64"}})
    with pytest.raises(ArtifactError, match=r"a\.npy: float32\[3, 2\], the manifest says float32\[2, 3\]"):
        load_array(tmp_path, "a.npy", {"a.npy": {**files["a.npy"], "shape": [2, 3]}})
    _object_array(tmp_path / "b.npy")  # even where a forged manifest lets it through, a pickle is never read
    with pytest.raises(ArtifactError, match=r"b\.npy: holds a pickle"):
        load_array(tmp_path, "b.npy", {"b.npy": {"shape": [1], "dtype": "object"}})
    with pytest.raises(ArtifactError, match="not the manifest of a funkflow dataset"):
        verify(tmp_path, "dataset")
    (tmp_path / MANIFEST).write_text("{not json")
    with pytest.raises(ArtifactError, match="manifest.json: unreadable"):
        verify(tmp_path, "model")


def test_a_dataset_part_cut_short_is_refused_before_any_task(finished_run, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    part = sorted((run_dir / "data" / "ratings").glob("*.parquet"))[0]
    pq.write_table(pq.read_table(part).slice(0, 10), part)
    code = main(["evaluate", "--run-dir", str(run_dir), "--set", "cluster.scheduler=inprocess", "--set",
                 f"data.source={run_dir / 'data'}", "--set", "data.generate=null"])
    err = capsys.readouterr().err
    assert code == 65 and f"{part}: 10 rows" in err and "Traceback" not in err


def test_a_row_block_file_that_lost_ratings_is_refused(finished_run, tmp_path):
    from funkflow.pipeline.data.blocking import open_blocks
    from funkflow.tasks.blocks import load_row_block, row_dir

    blocks = open_blocks(finished_run / "blocks")
    shutil.copytree(finished_run / "blocks", tmp_path / "blocks")
    part = sorted(row_dir(tmp_path / "blocks", 1).glob("*.parquet"))[0]
    table = pq.read_table(part)
    pq.write_table(table.slice(0, table.num_rows - 1), part)
    with pytest.raises(ArtifactError, match=r"row-0001: \[.*\] ratings by split, .*blocks.json says"):
        load_row_block(str(tmp_path / "blocks"), 1, blocks.d, blocks.n_users, blocks.n_items, blocks.seed)
