"""Where ratings come from: the files a source names, and how each is laid out.

A source is a file, a directory or a glob, local or an fsspec URL. Its layout (delimiter, header, which
column is the user, the item, the rating, the time) is read off the format asked for, the file's name and its
first line; a header names its columns in any of the spellings common exports use. ``ingest``, ``fold-in``
and ``predict`` read their files through this one module.
"""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from funkflow.pipeline.core.config import FORMATS, DataConfig, IngestConfig
from funkflow.pipeline.core.errors import DataError, UsageError
from funkflow.tasks import parse
from funkflow.tasks.ingest import Chunk, Source, SourceError, chunk_pieces

log = logging.getLogger(__name__)

# MovieLens's files say their scale: u.data (100k) and ratings.dat (1M, 10M) whole stars, ratings.csv (20M,
# 25M, latest) half stars. Other CSV and Parquet files without --rating-scale: inferred from the data.
NETFLIX_SCALE = (1.0, 5.0)
MOVIELENS_SCALES = {"u.data": (1.0, 5.0), "ratings.dat": (1.0, 5.0), "ratings.csv": (0.5, 5.0)}
ANY_RATING = (-math.inf, math.inf)
# Delimiters a text file is tried with, in this order, on its first line.
DELIMITERS = ("::", "\t", ",", ";", "|")


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


def _file_name(url: str) -> str:
    """The name of a source file, without ``.gz``: what MovieLens's layouts are known by."""
    return Path(url.split("::")[0]).name.removesuffix(".gz")


def movielens_scale(sources: list[Source]) -> tuple[float, float] | None:
    names = {_file_name(s.url) for s in sources}
    scales = {MOVIELENS_SCALES[n] for n in names if n in MOVIELENS_SCALES}
    return scales.pop() if len(scales) == 1 else None


PARQUET_MAGIC = b"PAR1"  # the first (and last) bytes of every Parquet file


def rating_file_format(source: str) -> str:
    """The format of a rating file or directory named without one, by content as ingest reads it: Parquet
    when its (first) file begins with Parquet's magic bytes, else delimited text."""
    urls = expand_sources([source])
    with fsspec.open(urls[0], "rb") as f:
        return "parquet" if f.read(len(PARQUET_MAGIC)) == PARQUET_MAGIC else "csv"


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
    """The first line of a text source; a binary file (a Parquet part among CSV files) is refused by name."""
    try:
        with fsspec.open(url, "rb", compression="infer") as f:
            line = f.readline(1 << 16)
    except (OSError, EOFError) as exc:
        raise DataError(f"{url}: unreadable: {exc}") from None
    if line.startswith(PARQUET_MAGIC):
        raise DataError(f"{url}: a Parquet file, not text: --format parquet reads it (a directory is read as "
                        "one format, so keep Parquet and text files apart)")
    if b"\0" in line:
        raise DataError(f"{url}: not text (it holds NUL bytes): is it a binary file?")
    return line.decode("utf-8", errors="replace").rstrip("\r\n")


def _parquet_columns(url: str) -> list[str]:
    try:
        with fsspec.open(url, "rb") as f:
            return list(pq.read_schema(f).names)
    except (OSError, pa.ArrowInvalid) as exc:
        raise DataError(f"{url}: not a readable Parquet file ({exc})") from None


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


def _named(fields: list[str], role: str) -> list[int]:
    """The positions of the fields whose names name ``role`` (``HEADER_NAMES``)."""
    return [j for j, field in enumerate(fields) if _normalized(field) in HEADER_NAMES[role]]


def given_options(columns: dict[str, str | None]) -> dict[str, str]:
    """Role → column name as ``IngestOptions`` keys (``user_col``, ...), for the roles given."""
    return {f"{role}_col": name for role, name in columns.items() if name is not None}


def columns_by_name(fields: list[str], options: IngestOptions, url: str, what: str = "the header",
                    flag: str = "--{role}-col NAME") -> dict[str, int | None]:
    """Each role's column among ``fields`` (a header line's, a Parquet file's or a table's column names), by
    its name, one rule for all; refuses names with no user, item or rating column, or one twice, saying
    which ``flag`` (the command line's, or the API's arguments) names it."""
    given = {"user": options.user_col, "item": options.item_col, "rating": options.rating_col,
             "time": options.time_col}
    columns: dict[str, int | None] = {}
    for role in HEADER_NAMES:
        if given[role] is not None:
            columns[role] = _column_index(given[role], None, fields, role, url)
            continue
        found = _named(fields, role)
        if len(found) > 1:
            raise DataError(f"{url}: {what} ({', '.join(fields)}) names more than one {role} column "
                            f"({', '.join(fields[j] for j in found)}); say which with {flag.format(role=role)}")
        if not found and role != "time":
            raise DataError(f"{url}: {what} ({', '.join(fields)}) names no {role} column; say which with "
                            f"{flag.format(role=role)} (or a 0-based position)")
        columns[role] = found[0] if found else None
    taken = [j for j in columns.values() if j is not None]
    if len(set(taken)) < len(taken):
        raise DataError(f"{url}: one column of {what} ({', '.join(fields)}) is taken for two roles; name them "
                        f"with {', '.join(flag.format(role=role) for role in ('user', 'item', 'rating'))}")
    log.info("%s: columns by name: %s", url,
             ", ".join(f"{role}={fields[j]!r}" for role, j in columns.items() if j is not None))
    return columns


def _delimited_layout(url: str, options: IngestOptions) -> parse.Layout:
    first = first_line(url)
    if not first.strip():
        # Nothing to detect from: an empty file yields no rows (and alone, "no ratings found").
        return parse.Layout("delimited", options.delimiter or ",", 3, {"user": 0, "item": 1, "rating": 2})
    delimiter = options.delimiter or next((d for d in DELIMITERS if d in first), ",")
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
        columns = columns_by_name(fields, options, url)
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
            names = _parquet_columns(url)
            by_name = columns_by_name(names, options, url, "the columns")
            sources.append(Source(index, url, None, {role: None if j is None else names[j]
                                                     for role, j in by_name.items()}))
        else:
            raise UsageError(f"--format must be one of {', '.join(FORMATS)}, got {options.format!r}")
    return sources


def pair_source(url: str, user_col: str | None, item_col: str | None) -> Source:
    """A file of (user, item) pairs to score: Parquet, delimited text (a header is recognised by its column
    names, as for ratings) or the Netflix probe / qualifying layout (``MovieID:`` then ``CustomerID[,Date]``)."""
    given = {"user": user_col, "item": item_col}
    if url.endswith(".parquet"):
        names = _parquet_columns(url)
        return Source(0, url, None, {role: names[_pair_column(spec, default, names, role, url, header=True)]
                                     for (role, spec), default in zip(given.items(), (0, 1))})
    first = first_line(url)
    if re.fullmatch(r"\s*[0-9]+:\s*", first):
        return Source(0, url, parse.Layout("netflix_pairs", int_ids=True))
    delimiter = next((d for d in DELIMITERS if d in first), ",")
    fields = [f.strip().strip('"') for f in first.split(delimiter)]
    named = any(c is not None and not re.fullmatch(r"[0-9]+", c) for c in given.values())
    header = named or bool(_named(fields, "user") or _named(fields, "item"))
    columns: dict[str, int | None] = {role: _pair_column(spec, default, fields, role, url, header)
                                      for (role, spec), default in zip(given.items(), (0, 1))}
    return Source(0, url, parse.Layout("delimited", delimiter, len(fields), columns | {"rating": None, "time": None},
                                       header=header))


def _pair_column(spec: str | None, default: int, fields: list[str], role: str, url: str, header: bool) -> int:
    """A pair file's column for ``role``: ``spec`` (a name or position); unset, the first field that names
    the role where there is a header, else the position ``default``."""
    if spec is None and header:
        return next(iter(_named(fields, role)), default)
    index = _column_index(spec, default, fields, role, url)
    assert index is not None, "a default is given"
    return index


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
