"""The Python API: ``FunkSVD`` with the conventions of Surprise, implicit and scikit-learn.

    from funkflow import FunkSVD
    model = FunkSVD(k=50, epochs=20).fit("ratings.parquet")        # or a table, or a dataset directory
    model.predict(["u1", "u2"], ["i9", "i3"])
    model.recommend(["u1"], n=10)
    model.save("models/today"); FunkSVD.load("models/today")

It runs the same stages as the command line (ingest, block, train, evaluate)
in a run directory, so everything the CLI guarantees holds here too; the
fitted factors are then held in memory for predictions.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa

from funkflow.pipeline.core.config import load_config
from funkflow.pipeline.core.errors import DataError, UsageError
from funkflow.pipeline.core.rundir import RunDir, built_in_place, claim
from funkflow.pipeline.data.sources import (
    IngestOptions,
    columns_by_name,
    given_options,
    rating_file_format,
)
from funkflow.pipeline.serving.model import (
    Factors,
    read_folded_ratings,
    read_id_maps,
    read_model,
    score_pairs,
    write_factors,
)
from funkflow.pipeline.training.records import EpochReport
from funkflow.tasks.idmap import in_id_type, index_of, sorted_distinct
from funkflow.tasks.io import write_parquet

log = logging.getLogger(__name__)


def _scratch_dir(owner: object, prefix: str) -> Path:
    """A new temporary directory, removed with everything in it once ``owner`` is garbage (or at exit)."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    weakref.finalize(owner, shutil.rmtree, path, True)
    return path


def _is_dask_dataframe(data: Any) -> bool:
    return type(data).__module__.startswith("dask") and hasattr(data, "to_parquet") and hasattr(data, "npartitions")


def _as_array(values: Any) -> pa.Array:
    array = values if isinstance(values, pa.Array | pa.ChunkedArray) else pa.array(list(values))
    return array.combine_chunks() if isinstance(array, pa.ChunkedArray) else array


class FunkSVD:
    """Biased Funk SVD trained by DSGD.

    Parameters mirror the config's ``model`` and ``train`` keys; ``options``
    takes any other dotted key (``{"split.method": "per_user"}``).
    ``callbacks`` are called with each epoch's :class:`EpochReport`.
    """

    def __init__(self, k: int = 32, epochs: int = 20, lr: float = 0.01, reg: float = 0.05, bias_reg: float = 0.01,
                 use_bias: bool = True, d: int | str = "auto", seed: int = 0, run_dir: str | Path | None = None,
                 callbacks: Sequence[Callable[[EpochReport], None]] = (), options: dict[str, Any] | None = None):
        self.params = {"model.k": k, "train.epochs": epochs, "train.lr": lr, "model.reg": reg,
                       "model.bias_reg": bias_reg, "model.use_bias": use_bias, "train.d": d, "train.seed": seed}
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.callbacks = callbacks
        self.options = dict(options or {})
        self.factors_: Factors | None = None
        self.info_: dict[str, Any] = {}
        self.folded_ratings_: tuple[np.ndarray, np.ndarray] | None = None
        self.summary_: dict[str, Any] | None = None

    # -- fitting ---------------------------------------------------------------------------------------------

    def _data_values(self, data: Any, run_dir: Path, columns: dict[str, str | None], client: Any) -> dict[str, Any]:
        """The ``data`` config values that read ``data``: a path as the CLI's ingest reads it; a table or a
        dask DataFrame is written to the run directory first (a dask DataFrame by its partitions, where they
        are, never collected here). Columns are mapped by name as a CSV header is, unless ``columns`` says."""
        given = {f"data.ingest.{key}": name for key, name in given_options(columns).items()}
        if isinstance(data, str | Path) or hasattr(data, "root"):
            source = str(getattr(data, "root", data))
            fs, path = fsspec.core.url_to_fs(source)
            if fs.isdir(path) and fs.isfile(f"{path}/dataset.json"):
                return {"data.source": source, "data.format": "canonical"}
            return {"data.source": source, "data.format": rating_file_format(source), **given}
        claim(run_dir)  # the run directory must be funkflow's before anything is written into it
        if _is_dask_dataframe(data):
            with built_in_place(run_dir / "input") as parts:
                writes = data.to_parquet(str(parts), write_index=False, compute=False)
                client.compute(writes).result() if client is not None else writes.compute()
            return {"data.source": str(run_dir / "input"), "data.format": "parquet", **given}
        if not isinstance(data, pa.Table) and hasattr(data, "to_arrow"):  # polars
            data = data.to_arrow()
        elif not isinstance(data, pa.Table) and hasattr(data, "columns"):  # pandas
            data = pa.Table.from_pandas(data, preserve_index=False)
        if not isinstance(data, pa.Table):
            raise UsageError(f"fit takes a path or URL, a pandas, pyarrow, polars or dask table, or a dataset; got "
                             f"{type(data)}")
        roles = columns_by_name(data.column_names, IngestOptions(format="parquet", **given_options(columns)),
                                "fit", "the table's columns", flag="{role}_col=NAME")
        path = run_dir / "input.parquet"
        write_parquet(data, path)
        rating = data.column(roles["rating"])
        low, high = (float(x) for x in (np.nanmin(rating), np.nanmax(rating)))
        return {"data.source": str(path), "data.format": "parquet", "data.ingest.rating_scale": [low, high],
                **{f"data.ingest.{role}_col": data.column_names[j] for role, j in roles.items() if j is not None}}

    def fit(self, data: Any, client: Any = None, user_col: str | None = None, item_col: str | None = None,
            rating_col: str | None = None, time_col: str | None = None) -> FunkSVD:
        """Train on ``data``: a canonical dataset directory, a rating file, directory of files or URL (Parquet
        or delimited text, told apart by content), a pandas, pyarrow or polars table, a dask DataFrame, or a
        ``Dataset``. Columns are found by name as in a CSV header (``userId``, ``movie_id``, ``stars``, ...);
        ``user_col``, ``item_col``, ``rating_col`` and ``time_col`` name them otherwise. ``client``: a
        ``distributed.Client`` to run on; None runs where ``cluster.scheduler`` says (unset: in-process for
        small data, else a LocalCluster; ``options={"cluster.scheduler": "local"}`` forces one). A rating file
        is ingested with the ``data.ingest`` options (its rating scale inferred from the data unless
        ``options={"data.ingest.rating_scale": [1, 5]}``); a table's scale is taken from its smallest and
        largest rating."""
        from funkflow.pipeline.app.stages import run_pipeline
        from funkflow.pipeline.core.cluster import DaskExecutor

        if self.run_dir is None:
            self.run_dir = _scratch_dir(self, "funkflow-")
        columns = {"user": user_col, "item": item_col, "rating": rating_col, "time": time_col}
        config = load_config(None).with_values({
            **self._data_values(data, self.run_dir, columns, client), "data.generate": None,
            "output.run_dir": str(self.run_dir), **self.params, **self.options})
        executor = DaskExecutor(client) if client is not None else None
        # fit() trains anew by definition, as in scikit-learn: a model already in run_dir is replaced.
        self.summary_ = run_pipeline(config, callbacks=self.callbacks, executor=executor, retrain=True)
        self._load(RunDir(self.run_dir).model)
        return self

    def _load(self, model_dir: Path) -> None:
        self.factors_, self.info_ = read_model(model_dir)
        self.user_ids_, self.item_ids_ = read_id_maps(model_dir)
        self.folded_ratings_ = read_folded_ratings(model_dir)
        self.model_dir_ = model_dir

    def _fitted(self) -> Factors:
        if self.factors_ is None:
            raise UsageError("call fit() or FunkSVD.load() first")
        return self.factors_

    # -- using the model --------------------------------------------------------------------------------------

    def predict(self, users: Any, items: Any) -> np.ndarray:
        """Predicted ratings of the (user, item) pairs of raw ids; unknown ids fall back to the biases. An id
        that cannot be one of the model's (text where all of them are integers) is refused, as the CLI does."""
        factors = self._fitted()
        raw = {}
        for side, values, ids in (("user", users, self.user_ids_), ("item", items, self.item_ids_)):
            raw[side] = in_id_type(_as_array(values), ids)
            if raw[side] is None:
                raise DataError(f"a {side} id is not an integer, and all of the model's are (users and items "
                                "swapped?)")
        u, i = index_of(raw["user"], self.user_ids_), index_of(raw["item"], self.item_ids_)
        scale = tuple(self.info_["rating_scale"]) if self.info_.get("rating_scale") else None
        return score_pairs(factors, u, i, scale)

    def recommend(self, users: Any, n: int = 10, exclude_seen: bool = True) -> pa.Table:
        """Top-``n`` items for each raw user id: a table of ``user``, ``rank``, ``item``, ``score``.

        ``exclude_seen`` leaves out what each user rated: in training, read from the run's blocks on the
        workers' code path (:mod:`funkflow.tasks.recommend`), or in :meth:`fold_in`, kept with the model.
        """
        from funkflow.pipeline.core.cluster import InProcessExecutor
        from funkflow.pipeline.serving.recommend import recommendation_lists, recommendation_table
        from funkflow.tasks.recommend import recommend_users

        factors = self._fitted()
        wanted = index_of(_as_array(users), self.user_ids_)
        if (wanted < 0).any():
            raise DataError(f"{int((wanted < 0).sum())} of the users are not in the model; fold_in() them first")
        wanted = sorted_distinct(wanted)
        if exclude_seen:
            lists = recommendation_lists(self.model_dir_, wanted, n, InProcessExecutor())
            if lists.unserved:
                raise DataError(f"{lists.unserved} of the users cannot be served: {lists.why_unserved}")
            u, i, s = lists.users, lists.items, lists.scores
        else:
            nothing = np.zeros(0, np.int64)
            u, i, s = recommend_users(wanted, factors.P, factors.user_bias, factors.Q, factors.item_bias,
                                      factors.global_mean, n, nothing, nothing)
        return recommendation_table(u, i, s, self.user_ids_, self.item_ids_, self.info_.get("rating_scale"))

    def fold_in(self, ratings: Any, side: str = "users") -> FunkSVD:
        """Add the users (or items) of ``ratings`` (a table with ``user``, ``item``, ``rating``) that the
        model does not know, from their ratings against the fixed other side; in place."""
        from funkflow.pipeline.serving.foldin import fold_in_model

        self._fitted()
        table = ratings if isinstance(ratings, pa.Table) else pa.Table.from_pandas(ratings, preserve_index=False)
        folded = fold_in_model(self.model_dir_, table, side, base_run=self.model_dir_.parent)
        # The folded model lives as long as this object; save() keeps it for good.
        model_dir = _scratch_dir(self, "funkflow-folded-") / "model"
        folded.write(model_dir)
        self._load(model_dir)
        return self

    # -- persistence ------------------------------------------------------------------------------------------

    def save(self, url: str | Path) -> None:
        """Write the model (npy, Parquet, JSON; no pickle) to a directory or fsspec URL."""
        factors = self._fitted()
        fs, path = fsspec.core.url_to_fs(str(url))
        if "file" in fs.protocol or fs.protocol == "local":
            write_factors(Path(path), factors, self.info_, self.user_ids_, self.item_ids_, self.folded_ratings_)
            return
        with tempfile.TemporaryDirectory() as tmp:
            write_factors(Path(tmp) / "model", factors, self.info_, self.user_ids_, self.item_ids_,
                          self.folded_ratings_)
            fs.put(str(Path(tmp) / "model") + "/", path, recursive=True)

    @classmethod
    def load(cls, url: str | Path) -> FunkSVD:
        """A model written by :meth:`save` (or a run's ``model/``), checked against its manifest: a damaged or
        foreign file (a pickle among them) is refused with a :class:`DataError` naming it."""
        fs, path = fsspec.core.url_to_fs(str(url))
        model = cls()
        if "file" in fs.protocol or fs.protocol == "local":
            local = Path(path)
        else:  # a remote model's local copy lives as long as the model
            local = _scratch_dir(model, "funkflow-model-")
            fs.get(path + "/", str(local), recursive=True)
        model._load(local)  # verified against its manifest: a damaged or foreign file is a DataError
        cfg = model.info_.get("config", {})
        model.params.update({f"model.{k}": v for k, v in cfg.get("model", {}).items() if f"model.{k}" in model.params})
        return model
