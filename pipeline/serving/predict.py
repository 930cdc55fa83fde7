"""``funkflow predict``: ratings for (user, item) pairs of raw ids, from a trained run.

Pairs come as CSV/TSV (a header is recognised by its column names), Parquet,
or the Netflix probe / qualifying layout (``MovieID:`` then
``CustomerID[,Date]``). They are read in bounded pieces and answered in input
order. An unknown user or item falls back to what the model knows (the item's
or user's bias over the global mean, or the global mean alone) and is counted;
every prediction is clipped to the rating scale.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from funkflow.pipeline.core.errors import DataError, UsageError
from funkflow.pipeline.core.rundir import RunDir
from funkflow.pipeline.data.sources import expand_sources, pair_source
from funkflow.pipeline.serving.model import read_id_maps, read_model, score_pairs
from funkflow.tasks.idmap import in_id_type, index_of
from funkflow.tasks.ingest import Chunk, SourceError, chunk_pieces
from funkflow.tasks.io import naming

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class PredictReport:
    n_pairs: int
    unknown_users: int
    unknown_items: int
    out: Path


def predict(run_dir: Path, pairs: str, out: Path, user_col: str | None = None,
            item_col: str | None = None) -> PredictReport:
    """Predict the ratings of the pairs in ``pairs`` with the model of ``run_dir``; write ``out``."""
    if out.suffix not in (".parquet", ".csv", ".tsv"):
        raise UsageError(f"--out must end in .parquet, .csv or .tsv, got {out}")
    model_dir = RunDir(run_dir).trained_model()
    factors, info = read_model(model_dir)
    user_ids, item_ids = read_id_maps(model_dir)
    scale = tuple(info["rating_scale"]) if info.get("rating_scale") else None
    (url,) = expand_sources([pairs])

    tmp = out.with_name(f".{out.name}.tmp")
    writer: pq.ParquetWriter | pacsv.CSVWriter | None = None
    n = unknown_users = unknown_items = 0
    with naming(out):
        try:  # written to a temporary name, moved into place only when every pair is answered
            for parsed in chunk_pieces(Chunk(pair_source(url, user_col, item_col)), (0.0, 0.0)):
                if parsed.reject_lines.shape[0]:
                    raise DataError(f"{url}:{parsed.reject_lines[0]}: {parsed.reject_details[0]} "
                                    f"({parsed.reject_reasons[0]})")
                rows = parsed.rows
                raw = {}
                for side, ids in (("user", user_ids), ("item", item_ids)):
                    raw[side] = in_id_type(rows[side].combine_chunks(), ids)
                    if raw[side] is None:
                        raise DataError(f"{url}: a {side} id is not an integer, and all of the model's are "
                                        f"(columns swapped? --{side}-col names the column)")
                u, i = index_of(raw["user"], user_ids), index_of(raw["item"], item_ids)
                known_u, known_i = u >= 0, i >= 0
                # Ids go out as the model holds them, as recommend writes them.
                table = pa.table({"user": raw["user"], "item": raw["item"],
                                  "prediction": pa.array(score_pairs(factors, u, i, scale))})
                if writer is None:
                    writer = (pq.ParquetWriter(tmp, table.schema) if out.suffix == ".parquet" else
                              pacsv.CSVWriter(tmp, table.schema, write_options=pacsv.WriteOptions(
                                  delimiter="\t" if out.suffix == ".tsv" else ",")))
                writer.write_table(table)
                n += table.num_rows
                unknown_users += int((~known_u).sum())
                unknown_items += int((~known_i).sum())
            if writer is None:
                raise DataError(f"{url}: no pairs found")
            writer.close()
            writer = None
            tmp.replace(out)
        except SourceError as exc:
            raise DataError(str(exc)) from None
        finally:
            if writer is not None:
                writer.close()
            tmp.unlink(missing_ok=True)
    if unknown_users or unknown_items:
        log.warning("%s pairs: %s with an unknown user, %s with an unknown item (predicted from biases and the "
                    "global mean)", f"{n:,}", f"{unknown_users:,}", f"{unknown_items:,}")
    return PredictReport(n, unknown_users, unknown_items, out)
