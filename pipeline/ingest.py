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
import re
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from funkflow.pipeline.cluster import Executor
from funkflow.pipeline.config import DataConfig, IngestConfig
from funkflow.pipeline.dataset import DATASET_JSON, Dataset, open_dataset
from funkflow.pipeline.errors import DataError, UsageError
from funkflow.pipeline.rundir import built_in_place
from funkflow.tasks import parse
from funkflow.tasks.idmap import merge_ids, read_ids, sorted_ids, write_ids
from funkflow.tasks.ingest import (
    FORMATS,
    LINE_BITS,
    REJECT_SCHEMA,
    Chunk,
    ChunkStats,
    Source,
    SourceError,
    chunk_pieces,
    encode_chunk,
    parquet_chunks,
    parse_chunk,
    resolve_bucket,
    scan_text,
)
from funkflow.tasks.io import file_sha256, write_bytes, write_json, write_parquet

log = logging.getLogger(__name__)

# MovieLens's files say their scale: u.data (100k) and ratings.dat (1M, 10M) whole stars, ratings.csv (20M,
# 25M, latest) half stars. Other CSV and Parquet files without --rating-scale: inferred from the data.
NETFLIX_SCALE = (1.0, 5.0)
MOVIELENS_SCALES = {"u.data": (1.0, 5.0), "ratings.dat": (1.0, 5.0), "ratings.csv": (0.5, 5.0)}
ANY_RATING = (-math.inf, math.inf)
ROWS_PER_BUCKET = 4_000_000
_DELIMITERS = ("::", "\t", ",", ";", "|")


class IngestOptions(IngestConfig):
    """What ``funkflow ingest`` was asked: the ``data.ingest`` keys, the format, and how to run."""

    format: str
    chunk_bytes: int = 64 << 20
    id_maps: Path | None = None

    def scale(self) -> tuple[float, float] | None:
        """The rating scale given or known for the format, or None: to be inferred from the data."""
        if self.rating_scale is not None:
            low, high = self.rating_scale
            if not (math.isfinite(low) and math.isfinite(high) and low < high):
                raise UsageError(f"--rating-scale (data.ingest.rating_scale) needs MIN < MAX, got {low:g},{high:g}")
            return self.rating_scale
        return NETFLIX_SCALE if self.format == "netflix" else None


def inferred_scale(low: float, high: float, whole: bool, halves: bool) -> tuple[float, float]:
    """The scale of ratings from ``low`` to ``high``: stars (1–5 whole, 0.5–5 in halves) when they fit,
    else the range seen."""
    if whole and 1 <= low and high <= 5:
        return 1.0, 5.0
    if halves and 0.5 <= low and high <= 5:
        return 0.5, 5.0
    return float(low), float(high)


def _file_name(url: str) -> str:
    """The name of a source file, without ``.gz``: what MovieLens's layouts are known by."""
    return Path(url.split("::")[0]).name.removesuffix(".gz")


def _movielens_scale(sources: list[Source]) -> tuple[float, float] | None:
    names = {_file_name(s.url) for s in sources}
    scales = {MOVIELENS_SCALES[n] for n in names if n in MOVIELENS_SCALES}
    return scales.pop() if len(scales) == 1 else None


def rating_file_format(path: str) -> str:
    """The format of a rating file named without one: Parquet by its suffix, else delimited text."""
    return "parquet" if path.endswith(".parquet") else "csv"


def ingest_options(data: DataConfig) -> IngestOptions:
    """The ingest options of a config's ``data`` section (``data.format`` and ``data.ingest``)."""
    return IngestOptions(format=data.format, **data.ingest.model_dump())


# A rating line of a text export is about this long (MovieLens's ratings.csv: 27 bytes); compressed files
# hold several times more lines, so a size-based count errs towards small.
BYTES_PER_LINE = 24


def estimated_ratings(srcs: list[str]) -> int:
    """About how many ratings the sources hold, from their sizes (to choose where to run before reading them)."""
    total = 0
    for url in expand_sources(srcs):
        fs, path = fsspec.core.url_to_fs(url)
        total += int(fs.info(path).get("size") or 0)
    return total // BYTES_PER_LINE


def source_stamp(url: str) -> str:
    """Size and modification stamp of a source file, for the ingest stage's up-to-date check."""
    fs, path = fsspec.core.url_to_fs(url)
    info = fs.info(path)
    return f"{url}|{info.get('size')}|{info.get('mtime') or info.get('LastModified') or info.get('ETag')}"


def expand_sources(sources: list[str]) -> list[str]:
    """Files named by ``sources``: files, directories (their files, recursively, sorted) or globs."""
    urls: list[str] = []
    for src in sources:
        fs, path = fsspec.core.url_to_fs(src)
        if fs.isdir(path):
            found = sorted(p for p in fs.find(path) if not Path(p).name.startswith((".", "_")))
        elif any(ch in path for ch in "*?["):
            found = sorted(fs.glob(path))
        elif fs.isfile(path):
            found = [path]
        else:
            raise DataError(f"{src}: no such file or directory")
        if not found:
            raise DataError(f"{src}: no files in it")
        urls += [fs.unstrip_protocol(p) if fs.protocol not in ("file", ("file", "local")) else p for p in found]
    return urls


def first_line(url: str) -> str:
    try:
        with fsspec.open(url, "rt", compression="infer", encoding="utf-8", errors="replace") as f:
            return f.readline().rstrip("\r\n")
    except (OSError, EOFError) as exc:
        raise DataError(f"{url}: unreadable: {exc}") from None


def _column_index(spec: str | None, default: int | None, names: list[str] | None, role: str,
                  url: str) -> int | None:
    if spec is None:
        return default
    if re.fullmatch(r"[0-9]+", spec):
        return int(spec)
    if names is None or spec not in names:
        header = ", ".join(names) if names else "no header line"
        raise DataError(f"{url}: no {role} column named {spec!r} (columns: {header})")
    return names.index(spec)


# Header names by role, as :func:`_normalized` writes them ("movieId", "movie_id" → "movieid").
HEADER_NAMES = {
    "user": {"user", "userid", "users", "uid", "customer", "customerid", "client", "clientid", "member",
             "memberid", "visitor", "visitorid", "account", "accountid", "reviewer", "reviewerid", "person"},
    "item": {"item", "itemid", "items", "iid", "movie", "movieid", "product", "productid", "sku", "asin",
             "isbn", "book", "bookid", "track", "trackid", "song", "songid", "artist", "artistid", "article",
             "articleid", "business", "businessid", "title", "titleid", "game", "gameid", "anime", "animeid"},
    "rating": {"rating", "ratings", "stars", "star", "score", "grade", "value", "rate", "rated", "bookrating",
               "reviewscore", "overall"},
    "time": {"timestamp", "time", "ts", "date", "datetime", "ratedat", "createdat", "unixtime",
             "reviewtime", "unixreviewtime"},
}


def _normalized(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def _columns_by_name(fields: list[str], options: IngestOptions, url: str) -> dict[str, int | None]:
    """Each role's column in a header line, by its name; refuses a header that names no user, item or
    rating column, or names one twice, saying which flags to pass."""
    given = {"user": options.user_col, "item": options.item_col, "rating": options.rating_col,
             "time": options.time_col}
    columns: dict[str, int | None] = {}
    for role, names in HEADER_NAMES.items():
        if given[role] is not None:
            columns[role] = _column_index(given[role], None, fields, role, url)
            continue
        found = [j for j, field in enumerate(fields) if _normalized(field) in names]
        if len(found) > 1:
            raise DataError(f"{url}: the header ({', '.join(fields)}) names more than one {role} column "
                            f"({', '.join(fields[j] for j in found)}); say which with --{role}-col NAME")
        if not found and role != "time":
            raise DataError(f"{url}: the header ({', '.join(fields)}) names no {role} column; say which with "
                            f"--{role}-col NAME (or a 0-based position)")
        columns[role] = found[0] if found else None
    taken = [j for j in columns.values() if j is not None]
    if len(set(taken)) < len(taken):
        raise DataError(f"{url}: one column of the header ({', '.join(fields)}) is taken for two roles; pass "
                        "--user-col, --item-col and --rating-col")
    log.info("%s: columns by the header: %s", url,
             ", ".join(f"{role}={fields[j]!r}" for role, j in columns.items() if j is not None))
    return columns


def _delimited_layout(url: str, options: IngestOptions) -> parse.Layout:
    first = first_line(url)
    if not first.strip():
        # Nothing to detect from: an empty file yields no rows (and alone, "no ratings found").
        return parse.Layout("delimited", options.delimiter or ",", 3, {"user": 0, "item": 1, "rating": 2})
    delimiter = options.delimiter or next((d for d in _DELIMITERS if d in first), ",")
    fields = [f.strip().strip('"') for f in first.split(delimiter)]
    named = [c for c in (options.user_col, options.item_col, options.rating_col, options.time_col)
             if c is not None and not re.fullmatch(r"[0-9]+", c)]
    # A header is declared by naming columns, or recognised by a field that names a role or by a rating
    # field that is not a number. With a header, columns go by name; by position only without one.
    rating_at = _column_index(options.rating_col, 2, fields, "rating", url) if not named else None
    known = set().union(*HEADER_NAMES.values())
    header = bool(named) or any(_normalized(f) in known for f in fields) or (
        rating_at is not None and rating_at < len(fields)
        and not re.fullmatch(parse._NUMBER, fields[rating_at].strip()))
    if header:
        columns = _columns_by_name(fields, options, url)
    else:
        columns = {
            "user": _column_index(options.user_col, 0, None, "user", url),
            "item": _column_index(options.item_col, 1, None, "item", url),
            "rating": _column_index(options.rating_col, 2, None, "rating", url),
            "time": _column_index(options.time_col, 3 if len(fields) >= 4 and options.time_col is None else None,
                                  None, "time", url),
        }
    too_far = {role: j for role, j in columns.items() if j is not None and j >= len(fields)}
    if too_far:
        raise DataError(f"{url}: line 1 has {len(fields)} fields with delimiter {delimiter!r}; "
                        f"no column {', '.join(f'{r}={j}' for r, j in too_far.items())}")
    return parse.Layout("delimited", delimiter, len(fields), columns, header=header)


def _movielens_layout(url: str) -> parse.Layout:
    name = _file_name(url)
    first = first_line(url)
    four: dict[str, int | None] = {"user": 0, "item": 1, "rating": 2, "time": 3}
    if name == "ratings.dat" or "::" in first:
        return parse.Layout("delimited", "::", 4, four, int_ids=True, time_kind="unix")
    if name == "u.data" or "\t" in first:
        return parse.Layout("delimited", "\t", 4, four, int_ids=True, time_kind="unix")
    if name == "ratings.csv" or first.startswith("userId"):
        return parse.Layout("delimited", ",", 4, four, header=first.startswith("userId"), int_ids=True,
                            time_kind="unix")
    raise DataError(f"{url}: not a MovieLens ratings file (u.data, ratings.dat or ratings.csv); "
                    "use --format csv with --user-col etc. for other layouts")


def make_sources(urls: list[str], options: IngestOptions, pairs: bool = False) -> list[Source]:
    """One :class:`Source` per file, with its layout detected from ``options.format``, name and content."""
    sources = []
    for index, url in enumerate(urls):
        if options.format == "netflix":
            sources.append(Source(index, url, parse.Layout("netflix_pairs" if pairs else "netflix", int_ids=True)))
        elif options.format == "movielens":
            sources.append(Source(index, url, _movielens_layout(url)))
        elif options.format == "csv":
            sources.append(Source(index, url, _delimited_layout(url, options)))
        elif options.format == "parquet":
            columns = {"user": options.user_col or "user", "item": options.item_col or "item",
                       "rating": options.rating_col or "rating", "time": options.time_col}
            sources.append(Source(index, url, None, columns))
        else:
            raise UsageError(f"--format must be one of {', '.join(FORMATS)}, got {options.format!r}")
    return sources


def read_rating_rows(src: str, options: IngestOptions) -> pa.Table:
    """All rows of one small rating file (raw ``user``, ``item``, ``rating``, ``time``), parsed in this
    process; a bad line is a :class:`DataError` naming it."""
    (url,) = expand_sources([src])
    (source,) = make_sources([url], options)
    tables = []
    try:
        for parsed in chunk_pieces(Chunk(source), options.scale() or ANY_RATING):
            if parsed.reject_lines.shape[0]:
                raise DataError(f"{url}:{parsed.reject_lines[0]}: {parsed.reject_details[0]} "
                                f"({parsed.reject_reasons[0]})")
            tables.append(parsed.rows)
    except SourceError as exc:
        raise DataError(str(exc)) from None
    if not tables or sum(t.num_rows for t in tables) == 0:
        raise DataError(f"{url}: no ratings found")
    return pa.concat_tables(tables)


def _position(pos: int, sources: list[Source]) -> str:
    return f"{sources[pos >> LINE_BITS].url}:{pos & ((1 << LINE_BITS) - 1)}"


def _merge_tree(executor: Executor, futures: list[Any], name: str) -> Any:
    """One future of the distinct ids of all chunks, merged pairwise on the workers."""
    while len(futures) > 1:
        futures = [executor.submit(merge_ids, *futures[i:i + 2], name=name) for i in range(0, len(futures), 2)]
    return futures[0]


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
                  staging: Path) -> tuple[list[ChunkStats], list[Any], list[Any]]:
    """Scan and parse every source into ``staging``, refusing ratings outside ``scale``; the chunks' stats and
    id-set futures, in source order."""
    scans = [executor.submit(parquet_chunks, s, ROWS_PER_BUCKET, name="plan_parquet") if s.is_parquet
             else executor.submit(scan_text, s, options.chunk_bytes, name="scan_text") for s in sources]
    chunks: list[Chunk] = [c for found in executor.gather(scans) for c in found]
    parsed = [executor.submit(parse_chunk, chunk, scale, str(staging), j, name="parse_chunk")
              for j, chunk in enumerate(chunks)]
    stats = executor.gather([executor.submit(operator.attrgetter("stats"), p, name="chunk_stats")
                                       for p in parsed])
    users = [executor.submit(operator.attrgetter("users"), p, name="chunk_users") for p in parsed]
    items = [executor.submit(operator.attrgetter("items"), p, name="chunk_items") for p in parsed]
    return stats, users, items


def ingest(executor: Executor, srcs: list[str], options: IngestOptions, out: Path) -> Dataset:
    """Ingest ``srcs`` into the canonical dataset ``out`` (written whole or not at all)."""
    maps_of = None if options.id_maps is None else open_dataset(options.id_maps)
    sources = make_sources(expand_sources(srcs), options)
    scale = options.scale() or (_movielens_scale(sources) if options.format == "movielens" else None)
    try:
        with built_in_place(out) as tmp:
            staging = tmp / "_staging"
            staging.mkdir()
            stats, user_sets, item_sets = stage_sources(executor, sources, options, scale or ANY_RATING, staging)
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
            encoded = [executor.submit(encode_chunk, s.staged, j, user_ids, item_ids, n_buckets, str(buckets),
                                       name="encode_chunk") for j, s in enumerate(stats) if s.staged]
            encoded = executor.gather(encoded)
            unseen = {"rows_with_unseen_user": sum(e["unseen_users"] for e in encoded),
                      "rows_with_unseen_item": sum(e["unseen_items"] for e in encoded)}
            (tmp / "ratings").mkdir()
            resolved = executor.gather([
                executor.submit(resolve_bucket, str(buckets), b, options.duplicates,
                                str(tmp / "ratings" / f"part-{b:05d}.parquet"), has_time, name="resolve_bucket")
                for b in range(n_buckets)])
            duplicates = {"policy": options.duplicates, "pairs": sum(r["pairs"] for r in resolved),
                          "rows_dropped": sum(r["dropped"] for r in resolved)}
            if options.duplicates == "error" and duplicates["pairs"]:
                a, b = min((r["first_duplicate"] for r in resolved if r["first_duplicate"]), key=lambda p: p[0])
                raise DataError(f"{_position(b, sources)}: duplicate of the (user, item) pair at "
                                f"{_position(a, sources)}; {duplicates['pairs']:,} duplicated pairs in all "
                                "(--duplicates keep_last, keep_first or mean resolves them)")

            users, items = executor.gather([user_ids, item_ids])
            for name, ids in (("users", users), ("items", items)):
                if len(ids) >= 2**31:
                    raise DataError(f"{len(ids):,} distinct {name}: more than int32 indices can hold")
                write_ids(ids, tmp / f"{name}.parquet")
            if options.rejects is not None:
                _write_rejects(sorted(staging.glob("rejects-*.parquet")), options.rejects)
            shutil.rmtree(staging)

            parts = [r for r in resolved if r["path"]]
            digest = hashlib.sha256()
            for r in parts:
                digest.update(r["sha256"].encode())
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
                "n_ratings": sum(r["n_ratings"] for r in parts),
                "rating_scale": list(scale),
                "has_time": has_time,
                "user_partitioned": True,  # parts are user-range buckets
                "id_types": {"user": str(users.type), "item": str(items.type)},
                "rejects": {"total": n_rejected, "by_reason": dict(sorted(reasons.items())),
                            "file": str(options.rejects) if options.rejects else None},
                "duplicates": duplicates,
                "id_maps_of": None if maps_of is None else maps_of.fingerprint,
                "unseen": unseen,
                "parts": [{"path": f"ratings/{Path(r['path']).name}", "n_ratings": r["n_ratings"],
                           "sha256": r["sha256"]} for r in parts],
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
