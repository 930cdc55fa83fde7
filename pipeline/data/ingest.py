"""``funkflow ingest``: rating files of any common layout → a canonical dataset, strict and lossless.

Sources are files, directories or fsspec URLs. They are cut into chunks that
are parsed in parallel on the workers (bounded memory per task), ids are mapped
to dense indices in their sorted order, and duplicate (user, item) pairs are
resolved per user-range bucket. Every line becomes a row or is rejected with a
reason: in strict mode (the default) one rejected line ends the ingest (exit
65, naming file, line and reason) and nothing is written; with a rejects file,
each bad line goes there and the counts by reason go to ``dataset.json``.
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import operator
import shutil
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from funkflow.pipeline.core.cluster import Executor
from funkflow.pipeline.core.errors import DataError
from funkflow.pipeline.core.rundir import built_in_place
from funkflow.pipeline.data.dataset import DATASET_JSON, Dataset, open_dataset
from funkflow.pipeline.data.sources import ANY_RATING, IngestOptions, expand_sources, make_sources, movielens_scale
from funkflow.tasks.idmap import merge_ids, read_ids, sorted_ids, write_ids
from funkflow.tasks.ingest import (
    LINE_BITS,
    REJECT_SCHEMA,
    Chunk,
    ChunkStats,
    Source,
    SourceError,
    encode_chunk,
    parquet_chunks,
    parse_chunk,
    resolve_bucket,
    scan_text,
)
from funkflow.tasks.io import file_sha256, write_bytes, write_json, write_parquet

log = logging.getLogger(__name__)

ROWS_PER_BUCKET = 4_000_000


def inferred_scale(low: float, high: float, whole: bool, halves: bool) -> tuple[float, float]:
    """The scale of ratings from ``low`` to ``high``: stars (1–5 whole, 0.5–5 in halves) when they fit,
    else the range seen."""
    if whole and 1 <= low and high <= 5:
        return 1.0, 5.0
    if halves and 0.5 <= low and high <= 5:
        return 0.5, 5.0
    return float(low), float(high)


def _position(pos: int, sources: list[Source]) -> str:
    return f"{sources[pos >> LINE_BITS].url}:{pos & ((1 << LINE_BITS) - 1)}"


def _merge_tree(executor: Executor, futures: list[Any], name: str) -> Any:
    """One future of the distinct ids of all chunks, merged pairwise on the workers."""
    while len(futures) > 1:
        futures = [executor.submit(merge_ids, *futures[i:i + 2], name=name) for i in range(0, len(futures), 2)]
    return futures[0]


def _remove(paths: list[str]) -> None:
    for path in paths:
        Path(path).unlink(missing_ok=True)


def _write_rejects(parts: list[Path], out: Path) -> None:
    """The rejects of all chunks, in source order, as CSV (or Parquet for ``.parquet``), atomically."""
    tables = [pq.read_table(p) for p in parts]
    table = pa.concat_tables(tables) if tables else REJECT_SCHEMA.empty_table()
    if out.suffix == ".parquet":
        write_parquet(table, out)
        return
    buffer = io.BytesIO()
    pacsv.write_csv(table, buffer)
    write_bytes(buffer.getvalue(), out)


def stage_sources(executor: Executor, sources: list[Source], options: IngestOptions, scale: tuple[float, float],
                  staging: Path) -> tuple[list[Chunk], list[ChunkStats], list[Any], list[Any]]:
    """Scan and parse every source into ``staging``, refusing ratings outside ``scale``; the chunks, their
    stats and id-set futures, in source order."""
    scans = [executor.submit(parquet_chunks, s, ROWS_PER_BUCKET, name="plan_parquet") if s.is_parquet
             else executor.submit(scan_text, s, options.chunk_bytes, name="scan_text") for s in sources]
    chunks: list[Chunk] = [c for found in executor.gather(scans) for c in found]
    parsed = [executor.submit(parse_chunk, chunk, scale, str(staging), j, name="parse_chunk")
              for j, chunk in enumerate(chunks)]
    stats = executor.gather([executor.submit(operator.attrgetter("stats"), p, name="chunk_stats")
                                       for p in parsed])
    users = [executor.submit(operator.attrgetter("users"), p, name="chunk_users") for p in parsed]
    items = [executor.submit(operator.attrgetter("items"), p, name="chunk_items") for p in parsed]
    return chunks, stats, users, items


def ingest(executor: Executor, srcs: list[str], options: IngestOptions, out: Path, replace: bool = True) -> Dataset:
    """Ingest ``srcs`` into the canonical dataset ``out`` (written whole or not at all). ``replace``: an older
    ``out`` that funkflow made may be replaced (a run directory's own data); otherwise it is refused."""
    maps_of = None if options.id_maps is None else open_dataset(options.id_maps)
    sources = make_sources(expand_sources(srcs), options)
    scale = options.scale() or (movielens_scale(sources) if options.format == "movielens" else None)
    try:
        with built_in_place(out, replace) as tmp:
            staging = tmp / "_staging"
            staging.mkdir()
            parse_scale = scale or ANY_RATING
            chunks, stats, user_sets, item_sets = stage_sources(executor, sources, options, parse_scale, staging)
            reasons: Counter[str] = Counter()
            for s in stats:
                reasons.update(s.rejects)
            n_rejected = sum(reasons.values())
            if n_rejected and options.rejects is None:
                first = next(s.first_reject for s in stats if s.first_reject)
                raise DataError(f"{first['source']}:{first['line']}: {first['detail']} ({first['reason']}); "
                                f"{n_rejected:,} bad line{'s' if n_rejected > 1 else ''} in all. Fix the input, or "
                                "pass --rejects FILE to set bad lines aside and go on")
            n_rows = sum(s.rows for s in stats)
            if n_rows == 0:
                raise DataError(f"{', '.join(srcs)}: no ratings found"
                                + (f" ({n_rejected:,} lines rejected)" if n_rejected else ""))
            if scale is None:
                rated = [s for s in stats if s.rows]
                scale = inferred_scale(min(s.rating_min for s in rated), max(s.rating_max for s in rated),
                                       all(s.whole for s in rated), all(s.halves for s in rated))
                log.info("rating scale inferred from the data: [%g, %g] (--rating-scale sets it; predictions are "
                         "clipped to it)", *scale)
            has_time = any(s.has_time for s in stats)
            user_int = all(s.user_ids_int for s in stats if s.rows)
            item_int = all(s.item_ids_int for s in stats if s.rows)

            if options.id_maps is None:
                user_ids = executor.submit(sorted_ids, _merge_tree(executor, user_sets, "merge_user_ids"), user_int,
                                           name="sorted_user_ids")
                item_ids = executor.submit(sorted_ids, _merge_tree(executor, item_sets, "merge_item_ids"), item_int,
                                           name="sorted_item_ids")
            else:  # a test set, say, indexed like the training data it goes with
                user_ids, item_ids = (executor.submit(read_ids, str(options.id_maps / f"{name}.parquet"),
                                                      name=f"read_{name}") for name in ("users", "items"))
            n_buckets = max(1, math.ceil(n_rows / ROWS_PER_BUCKET))
            buckets = staging / "buckets"
            encoded = [executor.submit(encode_chunk, chunk, s, parse_scale, j, user_ids, item_ids, n_buckets,
                                       str(buckets), name="encode_chunk")
                       for j, (chunk, s) in enumerate(zip(chunks, stats)) if s.rows]
            encoded = executor.gather(encoded)
            # The staged chunks are spent: removed while the buckets are resolved, since removing large files
            # takes a while on some file systems (ext4 with online discard).
            removal = threading.Thread(target=_remove, args=([s.staged for s in stats if s.staged],),
                                       name="remove-staged-chunks", daemon=True)
            removal.start()
            unseen = {"rows_with_unseen_user": sum(e.unseen_users for e in encoded),
                      "rows_with_unseen_item": sum(e.unseen_items for e in encoded)}
            (tmp / "ratings").mkdir()
            resolved = executor.gather([
                executor.submit(resolve_bucket, str(buckets), b, options.duplicates,
                                str(tmp / "ratings" / f"part-{b:05d}.parquet"), has_time, name="resolve_bucket")
                for b in range(n_buckets)])
            duplicates = {"policy": options.duplicates, "pairs": sum(r.pairs for r in resolved),
                          "rows_dropped": sum(r.dropped for r in resolved)}
            if options.duplicates == "error" and duplicates["pairs"]:
                a, b = min(r.first_duplicate for r in resolved if r.first_duplicate)
                raise DataError(f"{_position(b, sources)}: duplicate of the (user, item) pair at "
                                f"{_position(a, sources)}; {duplicates['pairs']:,} duplicated pairs in all "
                                "(--duplicates keep_last, keep_first or mean resolves them)")

            removal.join()
            users, items = executor.gather([user_ids, item_ids])
            for name, ids in (("users", users), ("items", items)):
                if len(ids) >= 2**31:
                    raise DataError(f"{len(ids):,} distinct {name}: more than int32 indices can hold")
                write_ids(ids, tmp / f"{name}.parquet")
            if options.rejects is not None:
                _write_rejects(sorted(staging.glob("rejects-*.parquet")), options.rejects)
            shutil.rmtree(staging)

            parts = [r.part for r in resolved if r.part]
            digest = hashlib.sha256()
            for part in parts:
                digest.update(part.sha256.encode())
            for name in ("users.parquet", "items.parquet"):
                digest.update(file_sha256(tmp / name).encode())
            kept: Counter[int] = Counter()  # by source index
            rejected: Counter[int] = Counter()
            for chunk_stats in stats:
                kept[chunk_stats.source] += chunk_stats.rows
                rejected[chunk_stats.source] += sum(chunk_stats.rejects.values())
            meta = {
                "source": options.format,
                "sources": [{"url": s.url, "rows": kept[s.index], "rejected": rejected[s.index]} for s in sources],
                "n_users": len(users),
                "n_items": len(items),
                "n_ratings": sum(part.n_ratings for part in parts),
                "rating_scale": list(scale),
                "has_time": has_time,
                "user_partitioned": True,  # parts are user-range buckets
                "id_types": {"user": str(users.type), "item": str(items.type)},
                "rejects": {"total": n_rejected, "by_reason": dict(sorted(reasons.items())),
                            "file": str(options.rejects) if options.rejects else None},
                "duplicates": duplicates,
                "id_maps_of": None if maps_of is None else maps_of.fingerprint,
                "unseen": unseen,
                "parts": [part.entry() for part in parts],
                "fingerprint": digest.hexdigest(),
            }
            write_json(meta, tmp / DATASET_JSON)
    except SourceError as exc:
        raise DataError(str(exc)) from None
    if n_rejected:
        log.warning("%s lines rejected (%s), written to %s", f"{n_rejected:,}",
                    ", ".join(f"{k} {v:,}" for k, v in sorted(reasons.items())), options.rejects)
    if any(unseen.values()):
        log.warning("left out %s rows with a user and %s rows with an item that %s does not know",
                    f"{unseen['rows_with_unseen_user']:,}", f"{unseen['rows_with_unseen_item']:,}", options.id_maps)
    if duplicates["pairs"]:
        log.info("%s duplicated (user, item) pairs resolved by %s (%s rows dropped)", f"{duplicates['pairs']:,}",
                 options.duplicates, f"{duplicates['rows_dropped']:,}")
    return Dataset(out, meta)
