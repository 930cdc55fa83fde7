"""Worker tasks of ingest: scan a source, parse a chunk, merge id sets, encode, resolve duplicates.

A source is cut into chunks that start at a line (and, for Netflix text, carry
the ``MovieID:`` header above them) or at a Parquet row group; each chunk is
parsed in pieces of bounded size, so memory per task stays bounded whatever
the source size, and a text chunk's rows are staged as an Arrow file of raw
ids (a Parquet chunk is cheaper to read again). Ids are then mapped to dense
indices by their sorted order, rows are bucketed by user range, and each bucket
resolves its duplicate (user, item) pairs and becomes one canonical part sorted
by (user, item).
"""

from __future__ import annotations

import math
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fsspec
import numba
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from funkflow.tasks import parse
from funkflow.tasks.counting import placed, places_by_key
from funkflow.tasks.idmap import distinct_ids, index_of
from funkflow.tasks.io import WrittenPart, naming, read_arrow, write_arrow, write_parquet

# Source position of a row: source index in the high bits, line (or row) number in the low ones.
LINE_BITS = 40
PIECE_BYTES = 32 << 20


class SourceError(ValueError):
    """A source cannot be read at all (unreadable, truncated, wrong type); the message names it."""


@dataclass(frozen=True)
class Source:
    """One input file: a text ``layout``, or for Parquet the ``columns`` (role → column name)."""

    index: int
    url: str
    layout: parse.Layout | None = None
    columns: dict[str, str | None] = field(default_factory=dict)

    @property
    def is_parquet(self) -> bool:
        return self.layout is None


@dataclass(frozen=True)
class Chunk:
    """A part of a source to parse: bytes ``[start, end)`` (``end`` None: to the end) starting at
    line ``first_line``, under the Netflix header ``context``; for Parquet, ``row_groups`` (none: all)."""

    source: Source
    start: int = 0
    end: int | None = None
    first_line: int = 1
    context: tuple[str, int] | None = None
    row_groups: tuple[int, ...] = ()


def read_pieces(url: str, start: int, end: int | None, piece_bytes: int) -> Iterator[tuple[bytes, int]]:
    """Pieces of ``url`` from ``start`` to ``end`` that end at a line boundary, with the count of lines before.

    Compressed sources (by extension) are decompressed on the fly; a stream cut
    short or corrupt is a :class:`SourceError`.
    """
    lines_before = 0
    carry = b""
    try:
        with fsspec.open(url, "rb", compression="infer") as f:
            if start:
                f.seek(start)
            remaining = None if end is None else end - start
            while True:
                size = piece_bytes if remaining is None else min(piece_bytes, remaining)
                block = f.read(size) if size else b""
                if remaining is not None:
                    remaining -= len(block)
                if not block:
                    break
                data = carry + block
                cut = data.rfind(b"\n") + 1
                if cut == 0:
                    carry = data
                    continue
                carry = data[cut:]
                yield data[:cut], lines_before
                lines_before += data.count(b"\n", 0, cut)
    except (EOFError, zlib.error, OSError) as exc:
        if isinstance(exc, FileNotFoundError):
            raise SourceError(f"{url}: no such file") from None
        raise SourceError(f"{url}: unreadable, truncated or corrupt after line {lines_before + 1}: {exc}") from None
    if carry:
        yield carry, lines_before


def _is_compressed(url: str) -> bool:
    return fsspec.utils.infer_compression(url) is not None


@numba.jit(nopython=True, nogil=True, cache=True)
def _header_candidate(buf: np.ndarray, end: int, pairs: bool) -> int:
    """The start of the last line wholly in ``buf[:end]`` that :func:`parse.header_mask` could call a header:
    one with a colon, or in training files one without a comma that is not empty before its ``\\r\\n``; -1
    if none."""
    colon, comma, filled = False, False, False
    j = end - 2 if end > 0 and buf[end - 1] == 10 else end - 1  # the last line's own newline is not a start
    while j >= -1:
        if j == -1 or buf[j] == 10:  # the line from j + 1 is complete
            if colon or (not pairs and filled and not comma):
                return j + 1
            colon, comma, filled = False, False, False
        else:
            colon |= buf[j] == 58
            comma |= buf[j] == 44
            filled |= buf[j] != 13
        j -= 1
    return -1


def _header_above(data: bytes, position: int, lines_before: int, pairs: bool,
                  earlier: tuple[str, int] | None) -> tuple[str, int] | None:
    """The last ``MovieID:`` header line of a piece of Netflix text above byte ``position`` (text, line
    number), or ``earlier`` if there is none: the nearest line :func:`parse.header_mask` calls a header."""
    buf = np.frombuffer(data, dtype=np.uint8)
    end = position
    while (start := _header_candidate(buf, end, pairs)) >= 0:
        stop = data.find(b"\n", start, position)
        try:  # a line that is not UTF-8 is no header
            return (data[start:position if stop < 0 else stop].rstrip(b"\r\n").decode("utf-8"),
                    lines_before + data.count(b"\n", 0, start) + 1)
        except UnicodeDecodeError:
            end = start
    return earlier


def scan_text(source: Source, chunk_bytes: int) -> list[Chunk]:
    """Cut a plain-text source into chunks of about ``chunk_bytes``, each starting at a line.

    A compressed source cannot be entered mid-stream: it is one chunk. For
    Netflix text, each chunk carries the header line above its first line.
    """
    fs, path = fsspec.core.url_to_fs(source.url)
    size = fs.size(path)
    if _is_compressed(source.url) or size <= chunk_bytes:
        return [Chunk(source)]
    layout = source.layout
    assert layout is not None, "a text source has a layout"
    netflix = layout.kind.startswith("netflix")
    chunks: list[Chunk] = []
    # ``opened``: the header above the chunk being cut; ``seen``: the last header read so far.
    start, first_line, opened, seen = 0, 1, None, None
    offset = 0
    pairs = layout.kind == "netflix_pairs"
    for data, lines_before in read_pieces(source.url, 0, None, PIECE_BYTES):
        # Boundaries inside this piece: the first line start at or after each multiple of chunk_bytes.
        while offset + len(data) > start + chunk_bytes:
            target = start + chunk_bytes - offset
            nl = data.find(b"\n", max(target - 1, 0))
            if nl < 0 or nl + 1 >= len(data):
                break
            boundary = nl + 1
            chunks.append(Chunk(source, start, offset + boundary, first_line, opened))
            start, first_line = offset + boundary, lines_before + data.count(b"\n", 0, boundary) + 1
            opened = _header_above(data, boundary, lines_before, pairs, seen) if netflix else None
        if netflix:
            seen = _header_above(data, len(data), lines_before, pairs, seen)
        offset += len(data)
    chunks.append(Chunk(source, start, None, first_line, opened))
    return chunks


def parquet_chunks(source: Source, rows_per_chunk: int) -> list[Chunk]:
    """Cut a Parquet source into chunks of whole row groups."""
    try:
        with fsspec.open(source.url, "rb") as f:
            metadata = pq.ParquetFile(f).metadata
    except (OSError, pa.ArrowException) as exc:
        raise SourceError(f"{source.url}: not a readable Parquet file: {exc}") from None
    chunks, group, rows, first = [], [], 0, 1
    for g in range(metadata.num_row_groups):
        group.append(g)
        rows += metadata.row_group(g).num_rows
        if rows >= rows_per_chunk:
            chunks.append(Chunk(source, first_line=first, row_groups=tuple(group)))
            first, group, rows = first + rows, [], 0
    if group or not chunks:
        chunks.append(Chunk(source, first_line=first, row_groups=tuple(group)))
    return chunks


REJECT_SCHEMA = pa.schema([("source", pa.string()), ("line", pa.int64()), ("reason", pa.string()),
                           ("detail", pa.string()), ("text", pa.string())])


def _parquet_pieces(chunk: Chunk, scale: tuple[float, float]) -> Iterator[parse.Parsed]:
    source = chunk.source
    wanted = {role: name for role, name in source.columns.items() if name is not None}
    try:
        with fsspec.open(source.url, "rb") as f:
            file = pq.ParquetFile(f)
            missing = [name for name in wanted.values() if name not in file.schema_arrow.names]
            if missing:
                raise SourceError(f"{source.url}: no column {', '.join(map(repr, missing))}; "
                                  f"the columns are {', '.join(file.schema_arrow.names)}")
            first = chunk.first_line
            for g in chunk.row_groups or range(file.num_row_groups):  # none named: the whole file
                table = file.read_row_group(g, columns=list(dict.fromkeys(wanted.values())))
                try:
                    yield parse.parse_table(table, wanted, first, scale)
                except ValueError as exc:
                    raise SourceError(f"{source.url}: {exc}") from None
                first += table.num_rows
    except SourceError:
        raise
    except (OSError, pa.ArrowException) as exc:
        raise SourceError(f"{source.url}: unreadable or truncated Parquet: {exc}") from None


def chunk_pieces(chunk: Chunk, scale: tuple[float, float]) -> Iterator[parse.Parsed]:
    """The parsed pieces of one chunk of a source, in order."""
    source = chunk.source
    if source.is_parquet:
        yield from _parquet_pieces(chunk, scale)
        return
    context = chunk.context
    layout = source.layout
    assert layout is not None, "a text source has a layout"
    for data, lines_before in read_pieces(source.url, chunk.start, chunk.end, PIECE_BYTES):
        first = chunk.first_line + lines_before
        if layout.kind == "delimited":
            yield parse.parse_delimited(data, first, layout, scale)
        else:
            parsed = parse.parse_netflix(data, first, context, scale, pairs=layout.kind == "netflix_pairs")
            context = parsed.context
            yield parsed


@dataclass(frozen=True)
class ChunkStats:
    """What parsing one chunk found, for the driver's decisions (scale, id types, time, rejects)."""

    source: int  # the source's index
    rows: int
    rejects: dict[str, int]  # by reason
    first_reject: dict[str, Any] | None  # source, line, reason, detail
    user_ids_int: bool  # every user id looks like an integer
    item_ids_int: bool
    has_time: bool
    staged: str | None  # the staged Arrow file of a text chunk's rows, None without rows or for Parquet
    rating_min: float
    rating_max: float
    whole: bool  # every rating a whole number
    halves: bool  # every rating a multiple of 0.5


@dataclass(frozen=True)
class ParsedChunk:
    stats: ChunkStats
    users: pa.Array  # the chunk's distinct raw ids
    items: pa.Array


def _positioned(table: pa.Table, source: Source) -> pa.Table:
    """``table`` with its line numbers made source positions: the source's index in the high bits."""
    return table.set_column(table.schema.get_field_index("line"), "line",
                            pc.add(table["line"], pa.scalar(source.index << LINE_BITS, pa.int64())))


def parse_chunk(chunk: Chunk, scale: tuple[float, float], staging: str, index: int) -> ParsedChunk:
    """Parse one chunk, and its rejects into ``staging``; its stats and distinct raw ids.

    A text chunk's rows are staged in ``staging/chunk-NNNNN.arrow`` (raw ids) for :func:`encode_chunk`. A
    Parquet chunk is not: reading it again costs less than writing and reading a staged copy, and writes
    nothing.
    """
    source = chunk.source
    out = None if source.is_parquet else Path(staging) / f"chunk-{index:05d}.arrow"
    writer: pa.ipc.RecordBatchFileWriter | None = None
    rejects: list[pa.Table] = []
    reasons: Counter[str] = Counter()
    rows = 0
    pieces = chunk_pieces(chunk, scale)
    users: list[Any] = []
    items: list[Any] = []
    int_like = {"user": True, "item": True}
    has_time = False
    low, high, whole, halves = math.inf, -math.inf, True, True  # the ratings seen, to infer a scale
    for parsed in pieces:
        table = parsed.rows
        if table.num_rows:
            table = _positioned(table, source)
            if out is not None:
                with naming(out):
                    writer = writer or pa.ipc.new_file(str(out), table.schema)
                    writer.write_table(table)
            rows += table.num_rows
            for role, acc in (("user", users), ("item", items)):
                column = table[role].combine_chunks()
                acc.append(distinct_ids([column]))
                if not pa.types.is_integer(column.type):
                    digits, _ = parse.int_like(column)
                    int_like[role] &= bool(digits.all())
            has_time |= table["time"].null_count < table.num_rows
            ratings = table["rating"].to_numpy()
            low, high = min(low, float(ratings.min())), max(high, float(ratings.max()))
            whole &= bool(np.all(ratings == np.round(ratings)))
            halves &= bool(np.all(ratings * 2 == np.round(ratings * 2)))
        if parsed.reject_lines.shape[0]:
            reasons.update(parsed.reject_reasons)
            rejects.append(pa.table({"source": [source.url] * parsed.reject_lines.shape[0],
                                     "line": parsed.reject_lines, "reason": parsed.reject_reasons,
                                     "detail": parsed.reject_details, "text": parsed.reject_texts},
                                    schema=REJECT_SCHEMA))
    if writer is not None:
        assert out is not None, "a writer is opened for text sources only, which stage to out"
        with naming(out):
            writer.close()
    first_reject = None
    if rejects:
        all_rejects = pa.concat_tables(rejects)
        write_parquet(all_rejects, Path(staging) / f"rejects-{index:05d}.parquet")
        first_reject = {k: all_rejects[k][0].as_py() for k in ("source", "line", "reason", "detail")}
    stats = ChunkStats(source.index, rows, dict(reasons), first_reject, int_like["user"], int_like["item"], has_time,
                       str(out) if out is not None and rows else None, low, high, whole, halves)
    return ParsedChunk(stats, distinct_ids(users), distinct_ids(items))


@dataclass(frozen=True)
class EncodedChunk:
    """Rows of a chunk written to each bucket, and rows left out for a user / an item the id maps lack."""

    counts: tuple[int, ...]
    unseen_users: int
    unseen_items: int


def encode_chunk(chunk: Chunk, stats: ChunkStats, scale: tuple[float, float], index: int, user_ids: pa.Array,
                 item_ids: pa.Array, n_buckets: int, buckets_dir: str) -> EncodedChunk:
    """Map a parsed chunk's raw ids to dense indices and split its rows into user-range buckets.

    Reads the chunk's staged rows, or a Parquet chunk again. Rows whose user or item the maps lack (possible
    only with given maps) are left out and counted.
    """
    if stats.staged is not None:
        table = read_arrow(stats.staged)
    else:
        table = pa.concat_tables([_positioned(p.rows, chunk.source) for p in chunk_pieces(chunk, scale)])
        if table.num_rows != stats.rows:
            raise SourceError(f"{chunk.source.url}: changed while being ingested ({table.num_rows:,} rows of "
                              f"row groups {chunk.row_groups} read again, {stats.rows:,} at first)")
    users = index_of(table["user"].combine_chunks(), user_ids)
    items = index_of(table["item"].combine_chunks(), item_ids)
    unseen_users, unseen_items = int((users < 0).sum()), int((items < 0).sum())
    known = (users >= 0) & (items >= 0)
    if not known.all():
        table, users, items = table.filter(pa.array(known)), users[known], items[known]
    users, items = users.astype(np.int32), items.astype(np.int32)
    # Rows go to their user-range buckets by a counting sort, which reads each column once; gathering each
    # bucket's rows through a sorted order would read every column once per bucket.
    destination, bounds = places_by_key(users.astype(np.int64) * n_buckets // max(len(user_ids), 1), n_buckets)
    columns = {"user": users, "item": items, "rating": table["rating"].to_numpy(), "pos": table["line"].to_numpy()}
    time = table["time"].combine_chunks()
    has_time = time.null_count < len(time)
    if has_time:
        columns |= {"time": pc.fill_null(time, 0).to_numpy(), "time_valid": time.is_valid().to_numpy(False)}
    columns = {name: placed(values, destination) for name, values in columns.items()}
    for b in range(n_buckets):
        rows = {name: values[bounds[b]:bounds[b + 1]] for name, values in columns.items()}
        n = rows["user"].shape[0]
        if n:
            time = pa.array(rows["time"], mask=~rows["time_valid"]) if has_time else pa.nulls(n, pa.int64())
            out = Path(buckets_dir) / f"bucket-{b:05d}"
            out.mkdir(parents=True, exist_ok=True)
            write_arrow(pa.table({"user": rows["user"], "item": rows["item"], "rating": rows["rating"], "time": time,
                                  "pos": rows["pos"]}), out / f"chunk-{index:05d}.arrow")
    counts = tuple(int(n) for n in np.diff(bounds))
    return EncodedChunk(counts, unseen_users, unseen_items)


@dataclass(frozen=True)
class ResolvedBucket:
    """A bucket with its duplicates resolved: the part written (None for an empty bucket), the duplicated
    (user, item) pairs and the rows dropped, and the source positions of the first duplicate's first two rows."""

    part: WrittenPart | None
    pairs: int = 0
    dropped: int = 0
    first_duplicate: tuple[int, int] | None = None


def sorted_pairs(users: np.ndarray, items: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The rows in (user, item) order, ties in row order: the order a stable argsort of the pairs would give,
    and the users and items in it (int64).

    One unstable sort of int64 keys that carry the pair in their high bits and the row number in their low
    bits: several times faster than a stable argsort, and the sorted users and items come out of the keys
    without a gather. A lexsort where the pair and the row number do not fit 63 bits together. Rows already
    in (user, item) order, as an export sorted by both comes, are returned as they are after one comparison
    pass instead of a sort.
    """
    n = users.shape[0]
    if n == 0:
        return np.zeros(0, dtype=np.int64), users.astype(np.int64), items.astype(np.int64)
    low_user, n_items = int(users.min()), int(items.max()) + 1
    row_bits = max(1, (n - 1).bit_length())
    if ((int(users.max()) - low_user + 1) * n_items).bit_length() + row_bits > 62:
        order = np.lexsort((items, users))
        return order, users[order].astype(np.int64), items[order].astype(np.int64)
    pair = (users.astype(np.int64) - low_user) * n_items + items
    if bool((pair[1:] >= pair[:-1]).all()):  # an export sorted by user and item: no sort to do
        return np.arange(n, dtype=np.int64), users.astype(np.int64), items.astype(np.int64)
    keyed = np.sort((pair << row_bits) | np.arange(n, dtype=np.int64))
    pair = keyed >> row_bits
    return keyed & ((1 << row_bits) - 1), pair // n_items + low_user, pair % n_items


def resolve_bucket(buckets_dir: str, bucket: int, policy: str, out: str, has_time: bool) -> ResolvedBucket:
    """Resolve duplicate (user, item) pairs of one bucket by ``policy``; write it sorted by (user, item).

    ``keep_last`` keeps the latest rating by time, then by source position;
    ``keep_first`` the earliest; ``mean`` averages the ratings (and keeps the
    latest time); ``error`` keeps all and reports the first duplicate pair.
    """
    folder = Path(buckets_dir) / f"bucket-{bucket:05d}"
    files = sorted(folder.glob("chunk-*.arrow")) if folder.exists() else []
    table = pa.concat_tables([read_arrow(f) for f in files]) if files else None
    if table is None or table.num_rows == 0:
        return ResolvedBucket(None)
    users = table["user"].to_numpy()
    items = table["item"].to_numpy()
    pos = table["pos"].to_numpy()  # source positions, read through ``order``
    # Sorted on (user, item): the bucket's rows arrive in source order, so ties keep it.
    order, users, items = sorted_pairs(users, items)
    new_pair = np.ones(users.shape[0], dtype=bool)
    new_pair[1:] = (users[1:] != users[:-1]) | (items[1:] != items[:-1])
    starts = np.flatnonzero(new_pair)
    sizes = np.diff(np.append(starts, users.shape[0]))
    duplicated = sizes > 1
    if has_time:
        times = pc.fill_null(table["time"], np.iinfo(np.int64).min).to_numpy()[order]
        if duplicated.any():  # a pair's rows by time, ties still in source order; a lexsort of 4 keys took 2 s
            by_time = np.lexsort((times, np.cumsum(new_pair)))
            order, times = order[by_time], times[by_time]
    ratings = table["rating"].to_numpy()[order]
    first_duplicate = None
    if duplicated.any():
        where = starts[duplicated]
        first = int(np.argmin(pos[order[where]]))  # report the pair whose first row comes first in the sources
        group = slice(where[first], where[first] + sizes[duplicated][first])
        a, b = sorted(int(p) for p in pos[order[group]][:2])
        first_duplicate = (a, b)
    if policy == "keep_first":
        pick = starts
    else:
        pick = np.append(starts[1:], users.shape[0]) - 1  # the last row of each pair: latest time, then position
    kept_ratings = ratings[pick]
    if policy == "mean":
        kept_ratings = (np.add.reduceat(ratings.astype(np.float64), starts) / sizes).astype(np.float32)
    columns = {"user": users[pick].astype(np.int32), "item": items[pick].astype(np.int32),
               "rating": kept_ratings.astype(np.float32)}
    if has_time:
        columns["time"] = pa.array(times[pick], mask=times[pick] == np.iinfo(np.int64).min)
    write_parquet(pa.table(columns), out)
    return ResolvedBucket(WrittenPart.of(out, int(pick.shape[0])), pairs=int(duplicated.sum()),
                          dropped=0 if policy == "error" else int((sizes - 1).sum()), first_duplicate=first_duplicate)
