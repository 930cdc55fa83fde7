"""Parse rating text into typed columns, line by line exact, with a reason for every rejected line.

Pure functions over bytes and Arrow arrays; the ingest tasks in
:mod:`funkflow.tasks.ingest` feed them pieces of a source that end at a line boundary.
A line either becomes a row or is rejected with a reason; empty lines are not
rows. Validity never depends on a line's neighbours (apart from the Netflix
``MovieID:`` header above it), so it does not depend on how a source is cut
into pieces.

Vectorised with Arrow compute: one regular expression per layout matches the
well-formed lines and captures their fields; only the lines it does not match
are looked at one by one, to name their fault. Netflix training text whose
every line is plain, as the Prize files are, is read in one numba pass over
its bytes instead.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numba
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

# Reasons a line is rejected: stable codes (in dataset.json and the rejects file).
FIELD_COUNT = "field_count"
MISSING_FIELD = "missing_field"
NON_NUMERIC = "non_numeric"
RATING_NAN = "rating_nan"
RATING_OUT_OF_SCALE = "rating_out_of_scale"
ID_OVERFLOW = "id_overflow"
BAD_TIME = "bad_time"
HEADER_MISSING = "movie_header_missing"
HEADER_MALFORMED = "movie_header_malformed"
BAD_ENCODING = "bad_encoding"

INT64_MAX = str(np.iinfo(np.int64).max)
INT64_MIN_MAGNITUDE = str(np.iinfo(np.int64).min)[1:]
_NUMBER = r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?"
_NUMBER_RE = re.compile(rf"^{_NUMBER}$")
_DIGITS_RE = re.compile(r"^[0-9]+$")
_DATE = r"[0-9]{4}-[0-9]{2}-[0-9]{2}"
_TIME_FORMATS = ("%Y-%m-%d", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M:%S")


@dataclass(frozen=True)
class Layout:
    """How the lines of a text source map to fields.

    ``kind``: ``"netflix"`` (``MovieID:`` sections of ``CustomerID,Rating,Date``),
    ``"netflix_pairs"`` (probe / qualifying: ``CustomerID[,Date]``) or
    ``"delimited"``. For delimited text, ``delimiter`` (one or more characters),
    ``n_fields`` per line, the 0-based ``columns`` of user, item, rating and
    time (None: absent), and ``header`` (the first line of the source names the
    columns). ``int_ids``: ids must be integers (else they may be strings).
    ``time_kind``: ``"unix"`` seconds, ``"date"`` (YYYY-MM-DD) or ``"auto"``.
    """

    kind: str
    delimiter: str = ","
    n_fields: int = 3
    columns: dict[str, int | None] = field(default_factory=dict)
    header: bool = False
    int_ids: bool = False
    time_kind: str = "auto"


@dataclass
class Parsed:
    """The rows and the rejected lines of one piece."""

    rows: pa.Table                     # user, item, rating (float32), time (int64, nullable), line (int64)
    reject_lines: np.ndarray           # int64 line numbers
    reject_reasons: list[str]
    reject_details: list[str]
    reject_texts: list[str]
    context: tuple[str, int] | None = None  # netflix: (last header line's text, its line number)


def split_lines(data: bytes) -> tuple[pa.StringArray, np.ndarray]:
    """The lines of ``data`` (without ``\\n``; a final line without one counts) and the bad-UTF-8 mask."""
    buf = np.frombuffer(data, dtype=np.uint8)
    ends = np.flatnonzero(buf == 10)
    if buf.shape[0] and (ends.shape[0] == 0 or ends[-1] != buf.shape[0] - 1):
        ends = np.append(ends, buf.shape[0])  # the last line has no newline
    starts = np.concatenate(([0], ends[:-1] + 1))
    # One string per line that includes its newline; the patterns allow for the "\r\n" and "\n".
    offsets = np.concatenate((starts, [buf.shape[0]])).astype(np.int64)
    lines = pa.LargeStringArray.from_buffers(ends.shape[0], pa.py_buffer(offsets), pa.py_buffer(data))
    bad = np.zeros(ends.shape[0], dtype=bool)
    try:
        lines.validate(full=True)
    except pa.ArrowInvalid:
        texts = []
        for i, (s, e) in enumerate(zip(starts, ends)):
            try:
                texts.append(data[s:e + 1].decode("utf-8"))
            except UnicodeDecodeError:
                texts.append("\n")
                bad[i] = True
        lines = pa.array(texts, type=pa.large_string())
    return lines, bad


def strip_lines(lines: pa.Array) -> pa.Array:
    return pc.utf8_rtrim(lines, characters="\r\n")


def int_like(values: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """Masks over ``values`` (strings): integer-looking (a minus sign allowed), and integer-looking but past
    int64 (beyond 9223372036854775807, or below -9223372036854775808)."""
    def mask(array: pa.Array) -> np.ndarray:
        return pc.fill_null(array, False).to_numpy(zero_copy_only=False)

    digits = mask(pc.match_substring_regex(values, r"^-?[0-9]+$"))
    negative = mask(pc.starts_with(values, "-"))
    magnitude = pc.replace_substring_regex(values, "^-", "")
    lengths = pc.utf8_length(magnitude).to_numpy(zero_copy_only=False)
    beyond = np.where(negative, mask(pc.greater(magnitude, INT64_MIN_MAGNITUDE)), mask(pc.greater(magnitude,
                                                                                                  INT64_MAX)))
    overflow = digits & ((lengths > 19) | ((lengths == 19) & beyond))
    return digits, overflow


def _iso_dates(values: pa.Array) -> tuple[np.ndarray, np.ndarray] | None:
    """Seconds and validity of ``YYYY-MM-DD`` strings by arithmetic (strptime is ten times slower);
    None unless every value has that shape."""
    if not pc.all(pc.fill_null(pc.match_substring_regex(values, rf"^{_DATE}$"), False)).as_py():
        return None
    values = pc.cast(values, pa.large_string())
    offsets = np.frombuffer(values.buffers()[1], dtype=np.int64)[values.offset:values.offset + len(values)]
    data = np.frombuffer(values.buffers()[2], dtype=np.uint8)

    def number(first: int, width: int) -> np.ndarray:
        out = np.zeros(offsets.shape[0], dtype=np.int64)
        for j in range(first, first + width):
            out = out * 10 + (data[offsets + j].astype(np.int64) - 48)
        return out

    year, month, day = number(0, 4), number(5, 2), number(8, 2)
    leap = (year % 4 == 0) & ((year % 100 != 0) | (year % 400 == 0))
    month_days = np.array([0, 31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31])[np.clip(month, 0, 12)] + (
        leap & (month == 2))
    ok = (month >= 1) & (month <= 12) & (day >= 1) & (day <= month_days)
    # Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's days_from_civil).
    y = year - (month <= 2)
    era = np.floor_divide(y, 400)
    year_of_era = y - era * 400
    day_of_year = (153 * np.where(month > 2, month - 3, month + 9) + 2) // 5 + day - 1
    day_of_era = year_of_era * 365 + year_of_era // 4 - year_of_era // 100 + day_of_year
    return (era * 146097 + day_of_era - 719468) * 86400, ok


def _seconds(values: pa.Array, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """Times as int64 Unix seconds and a validity mask; strict (2005-02-30 is invalid)."""
    if kind == "date":
        fast = _iso_dates(values)
        if fast is not None:
            return fast
    n = len(values)
    out = np.zeros(n, dtype=np.int64)
    ok = np.zeros(n, dtype=bool)
    if kind in ("unix", "auto"):
        digits = pc.fill_null(pc.match_substring_regex(values, r"^-?[0-9]{1,18}$"), False).to_numpy(
            zero_copy_only=False)
        if digits.any():
            out[digits] = pc.cast(pc.filter(values, pa.array(digits)), pa.int64()).to_numpy()
            ok |= digits
    if kind in ("date", "auto"):
        for fmt in _TIME_FORMATS if kind == "auto" else _TIME_FORMATS[:1]:
            todo = ~ok
            if not todo.any():
                break
            subset = pc.filter(values, pa.array(todo))
            parsed = pc.strptime(subset, format=fmt, unit="s", error_is_null=True)
            # strptime rolls 2005-02-30 over to March: a date must print back as it was written.
            exact = pc.fill_null(pc.equal(pc.strftime(parsed, format=fmt), subset), False)
            exact = exact.to_numpy(zero_copy_only=False)
            where = np.flatnonzero(todo)[exact]
            out[where] = pc.cast(pc.filter(parsed, exact), pa.int64()).to_numpy()
            ok[where] = True
    return out, ok


def _ratings(values: pa.Array, scale: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """Ratings as float32 and a reason (None = fine) per value, for well-formed numbers."""
    ratings = pc.cast(values, pa.float64()).to_numpy(zero_copy_only=False)
    low, high = scale
    outside = ~((ratings >= low) & (ratings <= high))  # NaN is outside too, but named apart below
    return ratings.astype(np.float32), outside


def describe_field(value: str, what: str, numeric: bool) -> tuple[str, str] | None:
    """The reason and detail of a bad field value, or None when it is fine (used on rejected lines only)."""
    if value.strip() == "":
        return MISSING_FIELD, f"missing {what}"
    if what == "rating":
        if value.strip().lower() in ("nan", "+nan", "-nan"):
            return RATING_NAN, "rating is NaN"
        if not _NUMBER_RE.match(value):
            return NON_NUMERIC, f"non-numeric rating {value!r}"
    elif numeric and not _DIGITS_RE.match(value):
        return NON_NUMERIC, f"non-numeric {what} {value!r}"
    return None


class _Rejects:
    def __init__(self) -> None:
        self.lines: list[int] = []
        self.reasons: list[str] = []
        self.details: list[str] = []
        self.texts: list[str] = []

    def add(self, line: int, reason: str, detail: str, text: str) -> None:
        self.lines.append(line)
        self.reasons.append(reason)
        self.details.append(detail)
        self.texts.append(text)

    def sorted(self) -> tuple[np.ndarray, list[str], list[str], list[str]]:
        order = np.argsort(np.array(self.lines, dtype=np.int64), kind="stable")
        return (np.array(self.lines, dtype=np.int64)[order], [self.reasons[i] for i in order],
                [self.details[i] for i in order], [self.texts[i] for i in order])


def _rows(users: pa.Array, items: pa.Array, ratings: np.ndarray, times: pa.Array | None,
          lines: np.ndarray) -> pa.Table:
    time = times if times is not None else pa.nulls(len(lines), type=pa.int64())
    return pa.table({"user": users, "item": items, "rating": pa.array(ratings, type=pa.float32()), "time": time,
                     "line": pa.array(lines, type=pa.int64())})


def _finish(rows: pa.Table, rejects: _Rejects, context: tuple[str, int] | None = None) -> Parsed:
    lines, reasons, details, texts = rejects.sorted()
    return Parsed(rows, lines, reasons, details, texts, context)


def _check_values(ids: dict[str, pa.Array], rating: pa.Array | None, time: pa.Array | None, line_no: np.ndarray,
                  texts: pa.Array, layout: Layout, scale: tuple[float, float], rejects: _Rejects,
                  time_optional: bool = False) -> tuple[np.ndarray, dict[str, pa.Array], np.ndarray, pa.Array | None]:
    """Value checks on well-formed lines; returns the keep mask, ids, ratings (NaN without ``rating``), times.

    ``times`` are Unix seconds, null where an optional time is empty.
    """
    n = len(line_no)
    keep = np.ones(n, dtype=bool)
    reason = np.full(n, None, dtype=object)
    detail = np.full(n, None, dtype=object)

    def fail(mask: np.ndarray, why: str, message) -> None:
        new = mask & keep
        for i in np.flatnonzero(new):
            reason[i], detail[i] = why, message(i)
        keep[new] = False

    typed: dict[str, pa.Array] = {}
    for what, values in ids.items():
        empty = (pc.utf8_length(values).to_numpy(zero_copy_only=False) == 0)
        fail(empty, MISSING_FIELD, lambda i, w=what: f"missing {w} id")
        digits, overflow = int_like(values)
        fail(overflow, ID_OVERFLOW, lambda i, w=what, v=values: f"{w} id {v[i].as_py()} overflows int64")
        if layout.int_ids:
            fail(~digits, NON_NUMERIC, lambda i, w=what, v=values: f"non-numeric {w} id {v[i].as_py()!r}")
        typed[what] = values
    if rating is None:  # pairs to predict
        ratings = np.full(n, np.nan, dtype=np.float32)
    else:
        ratings, outside = _ratings(rating, scale)
        fail(np.isnan(ratings), RATING_NAN, lambda i: "rating is NaN")
        low, high = scale
        fail(outside, RATING_OUT_OF_SCALE, lambda i: f"rating {rating[i].as_py()} outside [{low:g}, {high:g}]")
    times = None
    if time is not None:
        empty = (pc.utf8_length(time).to_numpy(zero_copy_only=False) == 0)
        if not time_optional:
            fail(empty, MISSING_FIELD, lambda i: "missing time")
        seconds, ok = _seconds(time, "date" if layout.kind.startswith("netflix") else layout.time_kind)
        fail(~ok & ~empty, BAD_TIME, lambda i: f"invalid time {time[i].as_py()!r}")
        times = pa.array(seconds, type=pa.int64(), mask=empty)
    for i in np.flatnonzero(~keep):
        rejects.add(int(line_no[i]), reason[i], detail[i], texts[i].as_py())
    return keep, typed, ratings, times


def _movie_id(header: str) -> int | None:
    """The movie id of a ``MovieID:`` header line, or None when it is malformed."""
    if re.fullmatch(r"[0-9]{1,19}:", header) and (len(header) < 20 or header[:-1] <= INT64_MAX):
        return int(header[:-1])
    return None


def header_mask(lines: pa.Array, bad_utf8: np.ndarray, pairs: bool) -> np.ndarray:
    """Which (stripped) lines are ``MovieID:`` headers, well-formed or not.

    A line with a colon is one; in training files (not ``pairs``) so is a
    non-empty line without a comma: a header that lost its colon.
    """
    header = pc.match_substring(lines, ":").to_numpy(zero_copy_only=False)
    if not pairs:
        empty = pc.utf8_length(lines).to_numpy(zero_copy_only=False) == 0
        header |= ~pc.match_substring(lines, ",").to_numpy(zero_copy_only=False) & ~empty
    return header & ~bad_utf8


@numba.jit(nopython=True, nogil=True, cache=True)
def _digits(buf: np.ndarray, at: int, end: int) -> tuple[int, int]:
    """The number written in decimal digits from ``at`` (at most 18 of them, so no overflow) and where they
    stop; (-1, at) without a digit or with more than 18."""
    value, j = 0, at
    while j < end and 48 <= buf[j] <= 57 and j - at < 19:
        value = value * 10 + (buf[j] - 48)
        j += 1
    if j == at or j - at > 18:
        return -1, at
    return value, j


@numba.jit(nopython=True, nogil=True, cache=True)
def _plain_netflix(buf: np.ndarray, context_movie: int, low: float, high: float) -> tuple[
        bool, int, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, int, int, int]:
    """Netflix training text in which every line is plain: ``MovieID:`` or ``CustomerID,Rating,YYYY-MM-DD``
    (ids of at most 18 digits, a whole rating inside [low, high], a real date), empty, or any of them ended
    by ``\\r\\n``; and no rating line above the first header unless ``context_movie`` (>= 0) gives its movie.

    Returns whether the piece is plain (nothing else is meaningful when it is not), the rows found (users,
    movies, ratings, seconds, line indices), and the index, start and end of the last header line (-1 if none).
    """
    n_lines = 1
    for b in buf:
        n_lines += b == 10
    users = np.empty(n_lines, dtype=np.int64)
    movies = np.empty(n_lines, dtype=np.int64)
    ratings = np.empty(n_lines, dtype=np.float32)
    seconds = np.empty(n_lines, dtype=np.int64)
    lines = np.empty(n_lines, dtype=np.int64)
    month_days = np.array([0, 31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31])
    movie, n, line, start = context_movie, 0, 0, 0
    last_header, header_start, header_end = -1, 0, 0
    size = buf.shape[0]
    while start < size:
        end = start
        while end < size and buf[end] != 10:
            end += 1
        stop = end - 1 if end > start and buf[end - 1] == 13 else end  # the line without its "\r\n"
        if stop > start:
            first, j = _digits(buf, start, stop)
            if first < 0:
                return False, 0, users, movies, ratings, seconds, lines, -1, 0, 0
            if j + 1 == stop and buf[j] == 58:  # "MovieID:"
                movie, last_header, header_start, header_end = first, line, start, stop
            else:
                if movie < 0 or j >= stop or buf[j] != 44:
                    return False, 0, users, movies, ratings, seconds, lines, -1, 0, 0
                rating, j = _digits(buf, j + 1, stop)
                if rating < 0 or not (low <= rating <= high) or stop - j != 11 or buf[j] != 44:
                    return False, 0, users, movies, ratings, seconds, lines, -1, 0, 0
                year, k = _digits(buf, j + 1, j + 5)
                month, m = _digits(buf, j + 6, j + 8)
                day, e = _digits(buf, j + 9, j + 11)
                if (k != j + 5 or m != j + 8 or e != j + 11 or buf[j + 5] != 45 or buf[j + 8] != 45
                        or not 1 <= month <= 12):
                    return False, 0, users, movies, ratings, seconds, lines, -1, 0, 0
                leap = year % 4 == 0 and (year % 100 != 0 or year % 400 == 0)
                if not 1 <= day <= month_days[month] + (leap and month == 2):
                    return False, 0, users, movies, ratings, seconds, lines, -1, 0, 0
                # Days since 1970-01-01 (H. Hinnant's days_from_civil), as _iso_dates counts them.
                y = year - (month <= 2)
                era = y // 400
                year_of_era = y - era * 400
                day_of_year = (153 * (month - 3 if month > 2 else month + 9) + 2) // 5 + day - 1
                day_of_era = year_of_era * 365 + year_of_era // 4 - year_of_era // 100 + day_of_year
                users[n], movies[n], ratings[n] = first, movie, rating
                seconds[n], lines[n] = (era * 146097 + day_of_era - 719468) * 86400, line
                n += 1
        line += 1
        start = end + 1
    return True, n, users, movies, ratings, seconds, lines, last_header, header_start, header_end


def parse_netflix(data: bytes, first_line: int, context: tuple[str, int] | None, scale: tuple[float, float],
                  pairs: bool = False) -> Parsed:
    """Parse a piece of Netflix Prize text: ``MovieID:`` sections of ``CustomerID,Rating,YYYY-MM-DD``.

    ``context`` is the last header line above the piece (text, line number), or
    None at the start of a file. With ``pairs``, lines are ``CustomerID[,Date]``
    (probe and qualifying files) and the ratings are NaN.
    A line with a colon is a header; in training files a non-empty line without
    a comma is a header that lost its colon. Rows under a malformed header, or
    above the first header, are rejected: they cannot be given a movie.

    A training piece whose every line is plain, as the Prize files are, is read by one pass over its bytes
    (:func:`_plain_netflix`); any other piece line by line with Arrow's string kernels, which
    name each fault.
    """
    context_movie = -1 if context is None else _movie_id(context[0])
    if not pairs and context_movie is not None:
        plain, n, users, movies, ratings, seconds, lines, last, start, end = _plain_netflix(
            np.frombuffer(data, dtype=np.uint8), context_movie, *scale)
        if plain:
            rows = pa.table({"user": users[:n], "item": movies[:n], "rating": ratings[:n], "time": seconds[:n],
                             "line": lines[:n] + first_line})
            new_context = context if last < 0 else (data[start:end].decode(), first_line + last)
            return Parsed(rows, np.zeros(0, dtype=np.int64), [], [], [], new_context)
    return _netflix_by_pattern(data, first_line, context, scale, pairs)


def _netflix_by_pattern(data: bytes, first_line: int, context: tuple[str, int] | None, scale: tuple[float, float],
                        pairs: bool) -> Parsed:
    """:func:`parse_netflix` line by line: the lines a regular expression matches, and the others' faults."""
    raw, bad_utf8 = split_lines(data)
    lines = strip_lines(raw)
    n = len(lines)
    line_no = np.arange(first_line, first_line + n, dtype=np.int64)
    empty = pc.utf8_length(lines).to_numpy(zero_copy_only=False) == 0
    header = header_mask(lines, bad_utf8, pairs)
    rejects = _Rejects()

    # Each line's section: the index of the header above it in this piece, or -1 for the context.
    idx = np.where(header, np.arange(n), -1)
    section = np.maximum.accumulate(idx) if n else idx
    header_texts = [lines[int(i)].as_py() for i in np.flatnonzero(header)]
    # movie_at[i]: the movie of header line i, or -1 for a malformed header (movie ids are >= 0).
    movie_at = np.full(n, -1, dtype=np.int64)
    for i, text in zip(np.flatnonzero(header), header_texts):
        movie = _movie_id(text)
        if movie is None:
            rejects.add(int(line_no[i]), HEADER_MALFORMED, f"malformed MovieID header {text!r}", text)
        else:
            movie_at[i] = movie
    context_movie = _movie_id(context[0]) if context is not None else None

    pattern = (rf"^(?P<user>[0-9]+)(?:,(?P<time>{_DATE}))?\r?\n?$" if pairs
               else rf"^(?P<user>[0-9]+),(?P<rating>{_NUMBER}),(?P<time>{_DATE})\r?\n?$")
    data_line = ~header & ~empty & ~bad_utf8
    for i in np.flatnonzero(bad_utf8):
        rejects.add(int(line_no[i]), BAD_ENCODING, "not UTF-8", "")
    match = pc.extract_regex(raw, pattern)
    matched = match.is_valid().to_numpy(zero_copy_only=False) & data_line

    # Every data line's movie: its section's, or the context's above the piece; -1 when there is none.
    line_movie = np.where(section >= 0, movie_at[np.maximum(section, 0)],
                          -1 if context_movie is None else context_movie)
    sectionless = data_line & (section < 0) & (context_movie is None)
    under_bad = data_line & (line_movie < 0) & ~sectionless
    for i in np.flatnonzero(sectionless | under_bad):
        if section[i] >= 0:
            why, where = HEADER_MALFORMED, f"under the malformed MovieID header at line {line_no[section[i]]}"
        elif context is not None:
            why, where = HEADER_MALFORMED, f"under the malformed MovieID header at line {context[1]}"
        else:
            why, where = HEADER_MISSING, "no MovieID: header above this line"
        rejects.add(int(line_no[i]), why, where, lines[int(i)].as_py())
    placed = data_line & ~sectionless & ~under_bad

    # Well-formed lines get value checks; the others are told apart one by one.
    for i in np.flatnonzero(placed & ~matched):
        text = lines[int(i)].as_py()
        fields = text.split(",")
        if (len(fields) not in (1, 2)) if pairs else len(fields) != 3:
            want = "1 or 2" if pairs else "3"
            rejects.add(int(line_no[i]), FIELD_COUNT, f"expected {want} fields, got {len(fields)}", text)
            continue
        named = zip(("user", "time") if pairs else ("user", "rating", "time"), fields)
        found = None
        for what, value in named:
            found = (describe_field(value, what, numeric=what != "time")
                     or (what == "time" and not re.fullmatch(_DATE, value) and (BAD_TIME, f"invalid date {value!r}"))
                     or None)
            if found:
                break
        why, message = found or (NON_NUMERIC, "malformed line")
        rejects.add(int(line_no[i]), why, message, text)
    good = placed & matched
    take = pa.array(good)
    movies = line_movie[good]
    fields = pc.filter(match, take)
    users = fields.field("user")
    times_text = fields.field("time")
    keep, typed, ratings, times = _check_values(
        {"user": users}, None if pairs else fields.field("rating"), times_text, line_no[good],
        pc.filter(lines, take), Layout("netflix", int_ids=True), scale, rejects, time_optional=pairs)
    keep_mask = pa.array(keep)
    users_int = pc.cast(pc.filter(typed["user"], keep_mask), pa.int64())
    rows = pa.table({"user": users_int, "item": pa.array(movies[keep], type=pa.int64()),
                     "rating": pa.array(ratings[keep], type=pa.float32()),
                     "time": pc.filter(times, keep_mask),
                     "line": pa.array(line_no[good][keep], type=pa.int64())})

    last = np.flatnonzero(header)
    new_context = (header_texts[-1], int(line_no[last[-1]])) if last.shape[0] else context
    return _finish(rows, rejects, new_context)


def _numeric(rating_text: pa.Array | None, line_no: np.ndarray, texts: pa.Array, rejects: _Rejects) -> np.ndarray:
    """Mask of ratings that are numbers; the others are rejected here with their fault, so that
    :func:`_check_values` sees only numbers. All true without a rating column (pairs)."""
    if rating_text is None:
        return np.ones(len(line_no), dtype=bool)
    number = pc.fill_null(pc.match_substring_regex(rating_text, rf"^{_NUMBER}$"), False).to_numpy(
        zero_copy_only=False)
    for i in np.flatnonzero(~number):
        value = rating_text[int(i)].as_py()
        why, message = describe_field(value, "rating", numeric=True) or (NON_NUMERIC, f"non-numeric rating {value!r}")
        rejects.add(int(line_no[i]), why, message, texts[int(i)].as_py())
    return number


def _field_pattern(delimiter: str) -> str:
    if len(delimiter) == 1:
        d = re.escape(delimiter)
        # A field is quoted ("a,b" with "" for a quote) or free of delimiters and quotes.
        return rf'("(?:[^"]|"")*"|[^{d}"\r\n]*)'
    return r"(.*?)"


def _unquote(values: pa.Array) -> pa.Array:
    quoted = pc.fill_null(pc.match_substring_regex(values, r'^".*"$'), False)
    if not pc.any(quoted).as_py():
        return values
    inner = pc.replace_substring(pc.utf8_slice_codeunits(values, 1, -1), '""', '"')
    return pc.if_else(quoted, inner, values)


def parse_delimited(data: bytes, first_line: int, layout: Layout, scale: tuple[float, float]) -> Parsed:
    """Parse a piece of delimited text (CSV, TSV, MovieLens ``::``) with ``layout``'s columns.

    The header line (line 1 when ``layout.header``) is not a row.
    """
    raw, bad_utf8 = split_lines(data)
    lines = strip_lines(raw)
    n = len(lines)
    line_no = np.arange(first_line, first_line + n, dtype=np.int64)
    empty = pc.utf8_length(lines).to_numpy(zero_copy_only=False) == 0
    skip = empty.copy()
    if layout.header and first_line == 1 and n:
        skip[0] = True
    rejects = _Rejects()
    for i in np.flatnonzero(bad_utf8):
        rejects.add(int(line_no[i]), BAD_ENCODING, "not UTF-8", "")
    candidate = ~skip & ~bad_utf8

    field = _field_pattern(layout.delimiter)
    pattern = "^" + re.escape(layout.delimiter).join([field] * layout.n_fields) + r"\r?\n?$"
    names = [f"f{j}" for j in range(layout.n_fields)]
    match = pc.extract_regex(raw, _name_groups(pattern, field, names))
    matched = match.is_valid().to_numpy(zero_copy_only=False) & candidate

    columns = layout.columns
    for i in np.flatnonzero(candidate & ~matched):
        text = lines[int(i)].as_py()
        fields = _split_fields(text, layout.delimiter)
        if len(fields) != layout.n_fields:
            rejects.add(int(line_no[i]), FIELD_COUNT, f"expected {layout.n_fields} fields, got {len(fields)}",
                        text)
        else:
            rejects.add(int(line_no[i]), NON_NUMERIC, "malformed line", text)
    take = pa.array(matched)
    fields = pc.filter(match, take)

    def col(what: str) -> pa.Array | None:
        j = columns.get(what)
        # Spaces around a field ("1, 2, 4.5") are not part of it.
        return None if j is None else _unquote(pc.utf8_trim_whitespace(fields.field(names[j])))

    rating_text = col("rating")
    matched_lines = line_no[matched]
    matched_texts = pc.filter(lines, take)
    number = _numeric(rating_text, matched_lines, matched_texts, rejects)
    ok = pa.array(number)
    ids = {"user": pc.filter(col("user"), ok), "item": pc.filter(col("item"), ok)}
    time_text = col("time")
    keep, typed, ratings, times = _check_values(
        ids, None if rating_text is None else pc.filter(rating_text, ok),
        None if time_text is None else pc.filter(time_text, ok), matched_lines[number],
        pc.filter(matched_texts, ok), layout, scale, rejects)
    keep_mask = pa.array(keep)
    rows = _rows(pc.filter(typed["user"], keep_mask), pc.filter(typed["item"], keep_mask), ratings[keep],
                 None if times is None else pc.filter(times, keep_mask), matched_lines[number][keep])
    return _finish(rows, rejects)


def _name_groups(pattern: str, field: str, names: list[str]) -> str:
    """``pattern`` with its field groups named ``names`` in order (extract_regex needs names)."""
    out = pattern
    for name in names:
        out = out.replace(field, f"(?P<{name}>" + field[1:], 1)
    return out


def _split_fields(text: str, delimiter: str) -> list[str]:
    if len(delimiter) == 1:
        import csv

        return next(csv.reader([text], delimiter=delimiter), [""])
    return text.split(delimiter)


def _as_text(column: pa.ChunkedArray, name: str) -> pa.Array:
    """A typed Parquet column as the text the same value would have in a CSV file ('' for null)."""
    column = column.combine_chunks()
    kind = column.type
    if pa.types.is_timestamp(kind) or pa.types.is_date(kind):
        column = pc.cast(pc.cast(column, pa.timestamp("s")), pa.int64())
    elif not (pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_string(kind)
              or pa.types.is_large_string(kind)):
        raise ValueError(f"column {name!r} has type {kind}; expected integers, floats, strings or timestamps")
    return pc.fill_null(pc.cast(column, pa.large_string()), "")


def _numeric_table(table: pa.Table, columns: dict[str, str], first_row: int, scale: tuple[float, float]) -> Parsed:
    """:func:`parse_table` for integer ids, numeric ratings and integer or timestamp times, without text."""
    n = table.num_rows
    line_no = np.arange(first_row, first_row + n, dtype=np.int64)
    keep = np.ones(n, dtype=bool)
    reasons: list[tuple[np.ndarray, str, str]] = []

    def fail(mask: np.ndarray, why: str, detail: str) -> None:
        if mask.any():
            reasons.append((mask & keep, why, detail))
            keep[mask] = False

    def present(column: pa.Array, what: str) -> pa.Array:
        """``column`` with its nulls rejected as ``missing <what>`` and filled with 0 (a typical export has
        none, and skips both passes)."""
        if column.null_count == 0:
            return column
        fail(~column.is_valid().to_numpy(zero_copy_only=False), MISSING_FIELD, f"missing {what}")
        return pc.fill_null(column, 0)

    ids = {}
    for role in ("user", "item"):
        ids[role] = pc.cast(present(table[columns[role]].combine_chunks(), f"{role} id"), pa.int64()).to_numpy()
    if "rating" in columns:
        ratings = pc.cast(present(table[columns["rating"]].combine_chunks(), "rating"), pa.float64()).to_numpy()
        fail(np.isnan(ratings), RATING_NAN, "rating is NaN")
        fail(~((ratings >= scale[0]) & (ratings <= scale[1])), RATING_OUT_OF_SCALE,
             f"rating outside [{scale[0]:g}, {scale[1]:g}]")
        ratings = ratings.astype(np.float32)
    else:
        ratings = np.full(n, np.nan, dtype=np.float32)
    times = None
    if "time" in columns:
        time = table[columns["time"]].combine_chunks()
        if pa.types.is_timestamp(time.type) or pa.types.is_date(time.type):
            time = pc.cast(pc.cast(time, pa.timestamp("s")), pa.int64())
        times = pc.cast(present(time, "time"), pa.int64())
    rejects = _Rejects()
    for mask, why, detail in reasons:
        for i in np.flatnonzero(mask):
            values = ",".join("" if not table[name][int(i)].is_valid else str(table[name][int(i)].as_py())
                              for name in columns.values())
            rejects.add(int(line_no[i]), why, detail, values)
    if reasons:  # else every row is kept, and nothing needs copying
        ids = {role: values[keep] for role, values in ids.items()}
        ratings, line_no = ratings[keep], line_no[keep]
        times = None if times is None else pc.filter(times, pa.array(keep))
    rows = _rows(pa.array(ids["user"]), pa.array(ids["item"]), ratings, times, line_no)
    return _finish(rows, rejects)


def parse_table(table: pa.Table, columns: dict[str, str], first_row: int, scale: tuple[float, float]) -> Parsed:
    """Check the rows of a Parquet table (``columns``: role → column name) as text lines would be.

    Values of other types go through their text form, so a Parquet file and a
    CSV file of the same ratings are accepted and rejected alike; integer ids
    with numeric ratings (a typical export) are checked as numbers, faster.
    ``line`` is the row number.
    """
    kinds = {role: table.schema.field(name).type for role, name in columns.items()}
    if (all(pa.types.is_integer(kinds[role]) for role in ("user", "item"))
            and ("rating" not in kinds or pa.types.is_integer(kinds["rating"]) or pa.types.is_floating(kinds["rating"]))
            and ("time" not in kinds or pa.types.is_integer(kinds["time"]) or pa.types.is_timestamp(kinds["time"])
                 or pa.types.is_date(kinds["time"]))):
        return _numeric_table(table, columns, first_row, scale)
    text = {role: _as_text(table[name], name) for role, name in columns.items()}
    n = table.num_rows
    line_no = np.arange(first_row, first_row + n, dtype=np.int64)
    rows_text = pc.binary_join_element_wise(*text.values(), pa.scalar(",", pa.large_string()))
    rejects = _Rejects()
    rating = text.get("rating")
    number = _numeric(rating, line_no, rows_text, rejects)
    ok = pa.array(number)
    layout = Layout("delimited", time_kind="auto")
    keep, typed, ratings, times = _check_values(
        {"user": pc.filter(text["user"], ok), "item": pc.filter(text["item"], ok)},
        None if rating is None else pc.filter(rating, ok),
        pc.filter(text["time"], ok) if "time" in text else None, line_no[number], pc.filter(rows_text, ok),
        layout, scale, rejects)
    keep_mask = pa.array(keep)
    rows = _rows(pc.filter(typed["user"], keep_mask), pc.filter(typed["item"], keep_mask), ratings[keep],
                 None if times is None else pc.filter(times, keep_mask), line_no[number][keep])
    return _finish(rows, rejects)
