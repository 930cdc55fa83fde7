"""Fold-in: exact on noise-free ratings, and a folded-in user predicts about as well as one trained with everyone."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.csv as pacsv
import pytest
from conftest import write_canonical

from funkflow.pipeline.app.cli import main
from funkflow.pipeline.app.stages import run_pipeline
from funkflow.pipeline.core.config import load_config
from funkflow.pipeline.serving.model import read_model
from funkflow.tasks.foldin import fold_in


def test_fold_in_recovers_planted_factors_and_bias():
    rng = np.random.default_rng(1)
    Q, item_bias = rng.normal(0, 0.5, (60, 4)), rng.normal(0, 0.3, 60)
    P, user_bias = rng.normal(0, 0.5, (3, 4)), np.array([0.4, -0.2, 0.0])
    new, known = np.repeat(np.arange(3), 25), np.concatenate([rng.choice(60, 25, replace=False) for _ in range(3)])
    ratings = 3.5 + user_bias[new] + item_bias[known] + np.einsum("nk,nk->n", P[new], Q[known])
    factors, bias = fold_in(new, known, ratings, Q, item_bias, 3.5, reg=0.0, bias_reg=0.0, n_new=4)
    np.testing.assert_allclose(factors[:3], P, atol=1e-4)
    np.testing.assert_allclose(bias[:3], user_bias, atol=1e-4)
    assert not factors[3].any() and bias[3] == 0  # no ratings: the prior, zero


def _rows(users, items, ratings) -> str:
    return "user,item,rating\n" + "".join(f"{u},{i},{r:.6f}\n" for u, i, r in zip(users, items, ratings))


@pytest.mark.slow
def test_a_folded_in_user_predicts_as_well_as_one_trained_with_everyone(tmp_path):
    rng = np.random.default_rng(3)
    P, Q = rng.normal(0, 0.6, (400, 3)), rng.normal(0, 0.6, (150, 3))
    users, items = np.nonzero(rng.random((400, 150)) < 0.25)
    ratings = 3.0 + np.einsum("nk,nk->n", P[users], Q[items]) + rng.normal(0, 0.2, users.shape[0])
    newcomer = users < 20                                  # users 0..19 arrive after training
    held = newcomer & (rng.random(users.shape[0]) < 0.2)   # their ratings to predict
    write_canonical(tmp_path / "everyone", users[~held], items[~held], ratings[~held], 400, 150)
    write_canonical(tmp_path / "without", users[~newcomer] - 20, items[~newcomer], ratings[~newcomer], 380, 150)
    for name in ("everyone", "without"):
        run_pipeline(load_config(None, [f"data.source={tmp_path / name}", "data.generate=null", "model.k=3",
                                        "train.epochs=40", "train.lr=0.02", "train.d=2", "split.test_fraction=0.01",
                                        "split.validation_fraction=0", "cluster.scheduler=inprocess",
                                        f"output.run_dir={tmp_path / ('run-' + name)}"]), last="train")
    # "without" knows users 20..399 as raw ids 0..379: give the newcomers raw ids 1000..1019 there.
    new_rows = newcomer & ~held
    (tmp_path / "new.csv").write_text(_rows(users[new_rows] + 1000, items[new_rows], ratings[new_rows]))
    assert main(["fold-in", str(tmp_path / "run-without"), "--ratings", str(tmp_path / "new.csv"),
                 "--out", str(tmp_path / "folded"), "--rating-scale=-10,10"]) == 0
    folded, info = read_model(tmp_path / "folded" / "model")
    assert info["folded_in"] == {"users": 20} and folded.P.shape[0] == 400

    def rmse(run_dir: Path, offset: int) -> float:
        (tmp_path / "pairs.csv").write_text("user,item\n" + "".join(
            f"{u + offset},{i}\n" for u, i in zip(users[held], items[held])))
        assert main(["predict", str(run_dir), "--pairs", str(tmp_path / "pairs.csv"),
                     "--out", str(tmp_path / "p.csv")]) == 0
        predicted = np.array(pacsv.read_csv(tmp_path / "p.csv")["prediction"].to_pylist())
        return float(np.sqrt(np.mean((predicted - ratings[held]) ** 2)))

    trained_with_everyone, folded_in = rmse(tmp_path / "run-everyone", 0), rmse(tmp_path / "folded", 1000)
    assert folded_in <= 1.1 * trained_with_everyone, (folded_in, trained_with_everyone)
