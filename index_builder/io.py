"""Reading and validating the builder's event, item and user files (CSV or Parquet)."""

from __future__ import annotations

import csv
import gzip
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from index_builder.event_archive import ArchiveError, archive_records, is_archive
from ranking import ID_NUL, EventLimits, QueryLimits

__all__ = [
    "CONTEXT_COLUMNS",
    "EventRecords",
    "InputError",
    "ReadOptions",
    "SkipReport",
    "read_events",
    "read_items",
    "read_users",
]

# Optional per-event context; a missing column or a blank cell means "not known".
CONTEXT_COLUMNS = ("channel", "device", "region")
# The length RecordEvents accepts for the same fields (ranking.realtime.events.EventLimits.max_text_chars),
# so a history export and the server's own log agree on what a context value can be.
MAX_CONTEXT_CHARS = 64
# The longest user or item id a Rank or RecordEvents request may carry (ranking.QueryLimits):
# a longer one could never be asked for, and widens every id of the bundle's fixed-width arrays.
MAX_ID_CHARS = QueryLimits().max_id_chars
# An event's value (a rating, a basket's worth in any currency) is far below this; one above it
# is an export error, and as a rating's weight it would overflow the ALS solve's float32 sums.
# RecordEvents takes the same bound, so the server's own log always builds.
MAX_ABS_VALUE = EventLimits().max_value
# How far past the reading clock an event may be dated (clocks and time zones disagree).
FUTURE_SLACK_SECONDS = 86_400
CONTEXT_TYPE = pa.dictionary(pa.int32(), pa.string())

_MAX_EXAMPLES = 5
# Years 1..9999: anything outside is almost surely milliseconds or garbage, not seconds.
_MIN_UNIX_SECONDS = -62_135_596_800
_MAX_UNIX_SECONDS = 253_402_300_799
_NUMBER_RE = r"^[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?$"
_ISO_RE = (
    r"^(?P<y>\d{4})-(?P<mo>\d{2})-(?P<d>\d{2})"
    r"(?:[Tt ](?P<h>\d{2}):(?P<mi>\d{2})(?::(?P<s>\d{2})(?:[.,]\d+)?)?)?"
    r"\s*(?:(?P<zulu>[Zz])|(?P<sign>[+-])(?P<tzh>\d{2})(?::?(?P<tzm>\d{2}))?)?$"
)
_DAYS_IN_MONTH = np.array([31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31])


class EventRecords(Protocol):
    """Event-log records read from somewhere other than a file (a store's stream,
    ``index_builder.stream_input.StreamInput``); ``str()`` names the source in errors."""

    def records(self) -> Iterable[dict]: ...


class InputError(ValueError):
    """An input file the builder cannot use, located as precisely as possible.

    Parameters
    ----------
    path : str or os.PathLike
        The file, as the caller named it.
    reason : str
        What is wrong, in words a user can act on.
    row : int, optional
        For CSV the 1-based line number (the header is line 1, the first data
        row line 2); for Parquet the 1-based record number. None when the
        problem is not tied to one row.
    column : str, optional
        The column at fault, if any.
    """

    def __init__(self, path, reason: str, *, row: int | None = None, column: str | None = None):
        self.path = str(path)
        self.reason = reason
        self.row = row
        self.column = column
        super().__init__(f"{self.path}: {self.detail()}")

    def detail(self) -> str:
        """Return the message without the path: ``row 17, column 'x': reason``."""
        where = []
        if self.row is not None:
            where.append(f"row {self.row}")
        if self.column is not None:
            where.append(f"column {self.column!r}")
        return f"{', '.join(where)}: {self.reason}" if where else self.reason

    def __reduce__(self):
        # The keyword-only constructor would break the default exception pickling
        # used when errors cross process boundaries.
        return (_rebuild_input_error, (self.path, self.reason, self.row, self.column))


def _rebuild_input_error(path, reason, row, column) -> InputError:
    return InputError(path, reason, row=row, column=column)


@dataclass
class ReadOptions:
    """How strictly input files are read.

    Parameters
    ----------
    on_bad_row : {"error", "skip"}
        "error" raises InputError on the first bad row; "skip" drops bad rows
        and counts them in the SkipReport.
    max_bad_fraction : float
        When skipping, a file with more than this fraction of bad rows is
        still an error.
    csv_delimiter : str
        One-character field delimiter for CSV files.
    latest : int, optional
        Unix seconds after which an event's timestamp is a bad row; None: a day after the
        clock when the file is read. One event dated years ahead would make the data end
        that far away, and every real event too old to weigh anything.
    """

    on_bad_row: str = "error"
    max_bad_fraction: float = 0.01
    csv_delimiter: str = ","
    latest: int | None = None

    def __post_init__(self):
        if self.on_bad_row not in ("error", "skip"):
            raise ValueError(f"on_bad_row must be 'error' or 'skip', got {self.on_bad_row!r}")
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            raise ValueError(f"max_bad_fraction must be within [0, 1], got {self.max_bad_fraction!r}")
        if len(self.csv_delimiter) != 1:
            raise ValueError(f"csv_delimiter must be one character, got {self.csv_delimiter!r}")


@dataclass
class SkipReport:
    """Rows of one file that were dropped, counted by reason, with a few examples.

    Blank CSV lines are dropped and counted (as "blank row") in both modes;
    bad rows only appear here when reading with ``on_bad_row="skip"``.
    """

    path: str
    counts: dict[str, int] = field(default_factory=dict)
    examples: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        """Number of rows dropped from the file."""
        return sum(self.counts.values())

    def to_dict(self) -> dict:
        """Return a JSON-ready dict for the build manifest."""
        return {"path": self.path, "total": self.total, "counts": dict(self.counts), "examples": list(self.examples)}


def read_events(path, options: ReadOptions | None = None) -> tuple[pa.Table, SkipReport]:
    """Read an event log.

    Parameters
    ----------
    path : str, os.PathLike or EventRecords
        A .csv, .csv.gz, .parquet or .pq file with columns user_id, item_id,
        event_type, timestamp and optionally value, channel, device, region and
        order_id (the order or basket the event belongs to);
        or a server's event log directory, the builder's event archive directory
        (``<out>/event-archive``) or a store's consumed stream (their "event"
        records, whose context fields fill channel, device and region; rows are
        numbered by event record).
    options : ReadOptions, optional
        Defaults to ``ReadOptions()``.

    Returns
    -------
    table : pyarrow.Table
        Columns user_id, item_id (string, surrounding whitespace removed),
        event_type (string, stripped and lowercased), timestamp (int64 unix
        seconds), value (float64, null where absent), then channel, device and
        region (dictionary-encoded strings, surrounding whitespace removed; null
        where the column is missing or the cell blank), and order_id (the same way).
    report : SkipReport
        The rows dropped.

    Raises
    ------
    InputError
        On a missing column, a file without events, or text that is not
        UTF-8 (whatever ``on_bad_row`` says); on the first bad row, including
        a CSV line with the wrong number of fields (in "error" mode); on too
        many bad rows (in "skip" mode).
    """
    options = options or ReadOptions()
    raw = _read_raw(path, options, "events")
    _require(raw, ["user_id", "item_id", "event_type", "timestamp"], "events")
    user_ids, user_checks = _ids(raw, "user_id")
    item_ids, item_checks = _ids(raw, "item_id")
    event_types, type_checks = _ids(raw, "event_type", max_chars=None)
    event_types = pc.utf8_lower(event_types)
    latest = options.latest if options.latest is not None else int(time.time()) + FUTURE_SLACK_SECONDS
    seconds, time_checks = _timestamps(raw, "timestamp", latest)
    checks = [*user_checks, *item_checks, *type_checks, *time_checks]
    if "value" in raw.table.column_names:
        values, value_bad = _numbers(raw, "value")
        checks.append(_quoting_check(raw, "bad value", "value", value_bad, "must be a finite number"))
        huge = _np_bool(pc.greater(pc.abs(values), MAX_ABS_VALUE)) & ~value_bad
        rule = f"must be at most {MAX_ABS_VALUE:g} in magnitude"
        checks.append(_quoting_check(raw, "bad value", "value", huge, rule))
    else:
        values = pa.nulls(raw.table.num_rows, pa.float64())
    context = []
    for name in CONTEXT_COLUMNS:
        if name in raw.table.column_names:
            column, check = _context(raw, name)
            context.append(column)
            checks.append(check)
        else:
            # Every events table has the same schema, so sources with and without context concatenate.
            context.append(_unknown_context(raw.table.num_rows))
    # The order (basket) an event belongs to; without one, a customer's purchases of one day
    # are one basket (index_builder.repeat).
    if "order_id" in raw.table.column_names:
        order_id, order_check = _context(raw, "order_id")
        checks.append(order_check)
    else:
        order_id = _unknown_context(raw.table.num_rows)
    keep, report = _settle(raw, checks, options, "events")
    table = pa.Table.from_arrays(
        [user_ids, item_ids, event_types, pa.array(seconds, pa.int64()), values, *context, order_id],
        schema=pa.schema(
            [
                ("user_id", pa.string()),
                ("item_id", pa.string()),
                ("event_type", pa.string()),
                ("timestamp", pa.int64()),
                ("value", pa.float64()),
                *((name, CONTEXT_TYPE) for name in CONTEXT_COLUMNS),
                ("order_id", CONTEXT_TYPE),
            ]
        ),
    )
    return _keep(table, keep), report


def read_items(path, options: ReadOptions | None = None) -> tuple[pa.Table, SkipReport]:
    """Read an item catalogue.

    Parameters
    ----------
    path : str or os.PathLike
        A .csv, .csv.gz, .parquet or .pq file with column item_id and
        optionally title, category (``|``-separated) and price.
    options : ReadOptions, optional
        Defaults to ``ReadOptions()``.

    Returns
    -------
    table : pyarrow.Table
        Columns item_id (string), title (string, null where blank),
        categories (list<string>, empty where absent), price (float64, null
        where absent), then every other input column as a string attribute
        (null where blank), in file order.
    report : SkipReport
        The rows dropped.

    Raises
    ------
    InputError
        As for read_events, plus on a duplicate item_id (naming both rows),
        whatever ``on_bad_row`` says.
    """
    options = options or ReadOptions()
    raw = _read_raw(path, options, "items")
    _require(raw, ["item_id"], "items")
    names = raw.table.column_names
    reserved = {"item_id", "title", "category", "price"}
    if "categories" in names:
        raise InputError(
            raw.path, "column 'categories' clashes with the list built from 'category'; rename it", column="categories"
        )
    item_ids, checks = _ids(raw, "item_id")
    n = raw.table.num_rows
    title = _attribute(raw, "title") if "title" in names else pa.nulls(n, pa.string())
    categories = _categories(raw, "category") if "category" in names else _empty_lists(n)
    if "price" in names:
        price, price_bad = _numbers(raw, "price")
        negative = _np_bool(pc.less(price, 0.0)) & ~price_bad
        checks.append(_quoting_check(raw, "bad price", "price", price_bad, "must be a finite number"))
        checks.append(_quoting_check(raw, "bad price", "price", negative, "must not be negative"))
    else:
        price = pa.nulls(n, pa.float64())
    extra = [name for name in names if name not in reserved]
    table = pa.Table.from_arrays(
        [item_ids, title, categories, price, *(_attribute(raw, name) for name in extra)],
        names=["item_id", "title", "categories", "price", *extra],
    )
    keep, report = _settle(raw, checks, options, "items")
    table = _keep(table, keep)
    _require_unique(raw, table.column("item_id"), keep, "item_id")
    return table, report


def read_users(path, options: ReadOptions | None = None) -> tuple[pa.Table, SkipReport]:
    """Read a user table.

    Parameters
    ----------
    path : str or os.PathLike
        A .csv, .csv.gz, .parquet or .pq file with column user_id.
    options : ReadOptions, optional
        Defaults to ``ReadOptions()``.

    Returns
    -------
    table : pyarrow.Table
        Column user_id (string), then every other input column as a string
        attribute (null where blank), in file order.
    report : SkipReport
        The rows dropped.

    Raises
    ------
    InputError
        As for read_events, plus on a duplicate user_id (naming both rows).
    """
    options = options or ReadOptions()
    raw = _read_raw(path, options, "users")
    _require(raw, ["user_id"], "users")
    user_ids, id_checks = _ids(raw, "user_id")
    extra = [name for name in raw.table.column_names if name != "user_id"]
    table = pa.Table.from_arrays([user_ids, *(_attribute(raw, name) for name in extra)], names=["user_id", *extra])
    keep, report = _settle(raw, id_checks, options, "users")
    table = _keep(table, keep)
    _require_unique(raw, table.column("user_id"), keep, "user_id")
    return table, report


# --- reading files ------------------------------------------------------------------


@dataclass
class _RaggedRow:
    """A CSV record whose field count differs from the header's (already dropped)."""

    record: int | None  # 1-based record number, header included; None if pyarrow did not say
    expected: int
    actual: int
    text: str  # the start of the record, for messages
    newlines: int  # inside the record's quoted values


@dataclass
class _Raw:
    """A file read as a table, plus what is needed to name its rows."""

    path: str
    table: pa.Table
    rows: Callable[[np.ndarray], list]  # table positions -> file rows
    ragged: list[_RaggedRow]
    ragged_rows: Callable[[], list]
    blank: np.ndarray  # per table row: a blank CSV line


def _read_raw(path, options: ReadOptions, noun: str) -> _Raw:
    if noun == "events" and hasattr(path, "records"):
        # Records from somewhere other than a file (index_builder.stream_input): the shared store's stream.
        return _raw_from_records(str(path), path.records(), "holds no events")
    if noun == "events" and Path(path).is_dir():
        if is_archive(path):
            try:
                return _raw_from_records(str(path), archive_records(path), "the event archive holds no events")
            except ArchiveError as e:
                raise InputError(path, str(e)) from e
        return _read_eventlog(path)
    name = Path(path).name.lower()
    if name.endswith((".csv", ".csv.gz")):
        return _read_csv(path, options, noun)
    if name.endswith((".parquet", ".pq")):
        return _read_parquet(path)
    raise InputError(path, "unsupported file extension; expected .csv, .csv.gz, .parquet or .pq")


def _read_parquet(path) -> _Raw:
    try:
        table = pq.read_table(path)
    except pa.ArrowInvalid as e:
        raise InputError(path, f"cannot read as Parquet: {e}") from e
    _check_header(path, table.column_names)
    return _Raw(
        str(path),
        table,
        lambda positions: [int(p) + 1 for p in positions],
        [],
        lambda: [],
        np.zeros(table.num_rows, bool),
    )


def _read_eventlog(path) -> _Raw:
    """The events of a server's event log directory (ranking.realtime.eventlog), as a raw table that goes
    through the same checks as a file. Rows are numbered by event record, 1-based."""
    from ranking import EventLogCorrupt, log_dirs, read_all

    if not log_dirs(path):
        raise InputError(
            path,
            "is a directory but holds no event log (segments <number>.log, or writer directories w<k>/ holding them), "
            "nor an event archive (.parquet files the builder wrote from a store's stream)",
        )
    try:
        return _raw_from_records(str(path), (rec for _, rec in read_all(path)), "the event log holds no events")
    except EventLogCorrupt as e:
        raise InputError(path, str(e)) from e


def _raw_from_records(path: str, records: Iterable[dict], empty: str) -> _Raw:
    """The ``"event"`` records of the server's log format (a local log, the shared store's stream or
    its archive) as a raw table that goes through the same checks as a file. Rows are numbered by
    event record, 1-based; ``empty`` is the reason given when there is none."""
    cols: dict[str, list] = {
        "user_id": [],
        "item_id": [],
        "event_type": [],
        "timestamp": [],
        "value": [],
        **{name: [] for name in CONTEXT_COLUMNS},
    }
    for rec in records:
        if rec.get("kind") != "event":
            continue
        for name in ("user_id", "item_id", "event_type", "timestamp"):
            cols[name].append(rec.get(name))
        for name in CONTEXT_COLUMNS:  # left out of the record when the event had none
            cols[name].append(rec.get(name) or None)
        # The API's value defaults to 0, meaning "not given": read it as absent, as a blank CSV cell.
        value = rec.get("value")
        cols["value"].append(float(value) if value else None)
    if not cols["user_id"]:
        raise InputError(path, empty)
    table = pa.table(
        {
            "user_id": pa.array(cols["user_id"], pa.string()),
            "item_id": pa.array(cols["item_id"], pa.string()),
            "event_type": pa.array(cols["event_type"], pa.string()),
            "timestamp": pa.array(cols["timestamp"], pa.float64()),
            "value": pa.array(cols["value"], pa.float64()),
            # Few distinct values, repeated per event: dictionary-encoded from the start.
            **{name: pa.array(cols[name], pa.string()).dictionary_encode() for name in CONTEXT_COLUMNS},
        }
    )
    return _Raw(
        path,
        table,
        lambda positions: [int(p) + 1 for p in positions],
        [],
        lambda: [],
        np.zeros(table.num_rows, bool),
    )


def _read_csv(path, options: ReadOptions, noun: str) -> _Raw:
    header = _csv_header(path, options.csv_delimiter)
    if header is None:
        raise InputError(path, f"file has no {noun}: it is empty")
    _check_header(path, header)
    table, ragged = _csv_table(path, header, options, use_threads=True)
    if ragged:
        # Only a single-threaded read tells where the ragged records are; malformed
        # files are rare enough to pay for a second pass.
        table, ragged = _csv_table(path, header, options, use_threads=False)
        ragged.sort(key=lambda r: r.record or 0)
    if table.column_names != header:
        raise InputError(path, f"header read as {table.column_names}, expected {header}", row=1)
    locator = _CsvRows(table, ragged, sum(name.count("\n") for name in header))
    table = _decode_utf8(path, table, locator.rows)
    blank = _np_bool(pc.equal(table.column(0), "")) if table.num_columns else np.zeros(0, bool)
    if blank.any():  # rare, so the other columns are only checked when needed
        for column in table.columns[1:]:
            blank &= _np_bool(pc.equal(column, ""))
    return _Raw(str(path), table, locator.rows, ragged, locator.ragged_rows, blank)


def _csv_header(path, delimiter: str) -> list[str] | None:
    opener = gzip.open if str(path).lower().endswith(".gz") else open
    try:
        # surrogateescape: bad bytes later in the file are for pyarrow to find and place.
        with opener(path, "rt", encoding="utf-8-sig", errors="surrogateescape", newline="") as f:
            header = next(csv.reader(f, delimiter=delimiter), None)
    except (csv.Error, gzip.BadGzipFile, EOFError) as e:
        raise InputError(path, f"cannot read the header line: {e}", row=1) from e
    if header and any("\udc80" <= char <= "\udcff" for name in header for char in name):
        raise InputError(path, "the header is not valid UTF-8; save the file as UTF-8", row=1)
    return header


def _check_header(path, names: list[str]) -> None:
    seen = set()
    for name in names:
        if name == "":
            raise InputError(path, f"the header has an empty column name: {names}", row=1)
        if name in seen:
            raise InputError(path, f"the header names column {name!r} twice", row=1)
        seen.add(name)


def _csv_table(path, header, options: ReadOptions, *, use_threads: bool):
    ragged: list[_RaggedRow] = []

    def on_ragged(row) -> str:
        ragged.append(
            _RaggedRow(row.number, row.expected_columns, row.actual_columns, row.text[:80], row.text.count("\n"))
        )
        return "skip"  # decided after reading: it may not be the first bad row

    try:
        table = pa_csv.read_csv(
            path,
            read_options=pa_csv.ReadOptions(use_threads=use_threads),
            parse_options=pa_csv.ParseOptions(
                delimiter=options.csv_delimiter,
                newlines_in_values=True,
                # Blank lines must stay rows so table positions map to line numbers.
                ignore_empty_lines=False,
                invalid_row_handler=on_ragged,
            ),
            # Every column as bytes, decoded later to place bad UTF-8; never inferred,
            # so "007" stays an id instead of becoming 7.
            convert_options=pa_csv.ConvertOptions(
                column_types={name: pa.binary() for name in header}, strings_can_be_null=False
            ),
        )
    except pa.ArrowInvalid as e:
        raise InputError(path, f"cannot parse as CSV: {e}") from e
    return table, ragged


def _decode_utf8(path, table: pa.Table, rows) -> pa.Table:
    """The table with every column as UTF-8 text, or an error at the first bad value."""
    columns = []
    for name, column in zip(table.column_names, table.columns):
        try:
            columns.append(pc.cast(column, pa.string()))
        except pa.ArrowInvalid as e:
            position = _first_bad_utf8(column)
            value = column[position].as_py()[:60]
            raise InputError(
                path, f"not valid UTF-8: {value!r}; save the file as UTF-8", row=rows([position])[0], column=name
            ) from e
    return pa.Table.from_arrays(columns, names=table.column_names)


def _first_bad_utf8(column: pa.ChunkedArray) -> int:
    """Position of the first value that is not UTF-8, by bisection within the bad chunk."""
    offset = 0
    for chunk in column.chunks:
        if not _is_utf8(chunk):
            low, high = 0, len(chunk)  # the first bad value is in [low, high)
            while high - low > 1:
                middle = (low + high) // 2
                if _is_utf8(chunk.slice(low, middle - low)):
                    low = middle
                else:
                    high = middle
            return offset + low
        offset += len(chunk)
    raise AssertionError("a column failed UTF-8 decoding but none of its chunks did")


def _is_utf8(values: pa.Array) -> bool:
    try:
        pc.cast(values, pa.string())
    except pa.ArrowInvalid:
        return False
    return True


class _CsvRows:
    """Maps table positions and ragged records (sorted by record) to CSV line numbers.

    Line numbers shift past dropped ragged records and past newlines inside
    quoted values; both are only counted when a row number is asked for.
    """

    def __init__(self, table: pa.Table, ragged: list[_RaggedRow], header_newlines: int):
        self._table = table
        self._exact = all(r.record is not None for r in ragged)
        records = np.array([r.record or 0 for r in ragged], np.int64)
        # Table rows preceding each ragged record.
        self._ragged_after = records - 2 - np.arange(len(ragged))
        self._ragged_newlines = np.concatenate([[0], np.cumsum([r.newlines for r in ragged])]).astype(np.int64)
        self._n_ragged = len(ragged)
        self._base = 2 + header_newlines
        self._newlines: np.ndarray | None = None

    def _table_newlines(self) -> np.ndarray:
        if self._newlines is None:
            per_row = np.zeros(self._table.num_rows, np.int64)
            for column in self._table.columns:
                per_row += pc.count_substring(column, "\n").to_numpy(zero_copy_only=False)
            self._newlines = np.concatenate([[0], np.cumsum(per_row)])
        return self._newlines

    def rows(self, positions) -> list:
        if not self._exact:
            return [None] * len(positions)
        positions = np.asarray(positions, np.int64)
        before = np.searchsorted(self._ragged_after, positions, side="right")
        lines = self._base + positions + before + self._table_newlines()[positions] + self._ragged_newlines[before]
        return [int(line) for line in lines]

    def ragged_rows(self) -> list:
        """Line numbers of the ragged records, in order."""
        if not self._exact:
            return [None] * self._n_ragged
        j = np.arange(self._n_ragged)
        after = self._ragged_after
        lines = self._base + after + j + self._table_newlines()[after] + self._ragged_newlines[j]
        return [int(line) for line in lines]


# --- validating rows -----------------------------------------------------------------


@dataclass
class _Check:
    """One way a row can be bad."""

    key: str  # the SkipReport count it adds to
    column: str
    bad: np.ndarray  # per table row
    reason: Callable[[int], str]  # why the row at this table position is bad


def _quoting_check(raw: _Raw, key: str, name: str, bad: np.ndarray, rule: str) -> _Check:
    """A check whose reason reads ``<name> <rule>, got '<raw value>'``."""
    return _Check(key, name, bad, lambda i: f"{name} {rule}, got {_raw_value(raw, name, i)!r}")


def _settle(raw: _Raw, checks: list[_Check], options: ReadOptions, noun: str):
    """Decide which rows to keep; raise or report on the bad ones."""
    considered = ~raw.blank
    first_failing = np.full(raw.table.num_rows, -1, np.int16)
    for index, check in enumerate(checks):
        first_failing[check.bad & considered & (first_failing < 0)] = index
    bad = first_failing >= 0
    n_bad = int(bad.sum()) + len(raw.ragged)
    n_rows = int(considered.sum()) + len(raw.ragged)
    if n_rows == 0:
        raise InputError(raw.path, f"file has no {noun}: no data rows after the header")
    keep = considered & ~bad
    limit = 1 if options.on_bad_row == "error" else _MAX_EXAMPLES
    problems = _problems(raw, checks, first_failing, limit) if n_bad else []
    if n_bad and options.on_bad_row == "error":
        raise problems[0]
    if n_bad > options.max_bad_fraction * n_rows:
        raise InputError(
            raw.path,
            f"{n_bad} of {n_rows} rows are bad ({n_bad / n_rows:.2%}), more "
            f"than max_bad_fraction={options.max_bad_fraction:g} allows; first: "
            f"{problems[0].detail()}",
        )
    counts: dict[str, int] = {}
    if raw.ragged:
        counts["wrong number of fields"] = len(raw.ragged)
    for index, check in enumerate(checks):
        count = int((first_failing == index).sum())
        if count:
            counts[check.key] = counts.get(check.key, 0) + count
    n_blank = int(raw.blank.sum())
    if n_blank:
        counts["blank row"] = n_blank
    report = SkipReport(raw.path, counts, [str(p) for p in problems])
    if not keep.any():
        raise InputError(raw.path, f"file has no {noun} left after skipping {n_bad} bad rows")
    return keep, report


def _problems(raw: _Raw, checks, first_failing: np.ndarray, limit: int) -> list[InputError]:
    """The first ``limit`` bad rows in file order, as errors."""
    positions = np.flatnonzero(first_failing >= 0)[:limit]
    found = [
        (
            row,
            InputError(
                raw.path, checks[first_failing[p]].reason(int(p)), row=row, column=checks[first_failing[p]].column
            ),
        )
        for p, row in zip(positions, raw.rows(positions))
    ]
    for r, row in list(zip(raw.ragged, raw.ragged_rows()))[:limit]:
        found.append(
            (row, InputError(raw.path, f"expected {r.expected} fields, found {r.actual}: {r.text!r}", row=row))
        )
    found.sort(key=lambda pair: pair[0] or 0)
    return [error for _, error in found[:limit]]


def _keep(table: pa.Table, keep: np.ndarray) -> pa.Table:
    return table if keep.all() else table.filter(pa.array(keep))


def _require(raw: _Raw, required: list[str], noun: str) -> None:
    names = raw.table.column_names
    missing = [name for name in required if name not in names]
    if missing:
        raise InputError(
            raw.path,
            f"missing required column{'s' if len(missing) > 1 else ''} "
            f"{', '.join(map(repr, missing))}; found columns: "
            f"{', '.join(map(repr, names))}",
            column=missing[0],
        )
    if raw.table.num_rows == 0 and not raw.ragged:
        raise InputError(raw.path, f"file has no {noun}: no data rows after the header")


def _require_unique(raw: _Raw, ids: pa.ChunkedArray, keep: np.ndarray, name: str) -> None:
    if len(pc.unique(ids)) == len(ids):
        return
    codes = pc.dictionary_encode(ids).combine_chunks().indices.to_numpy()
    order = np.argsort(codes, kind="stable")
    ordered = codes[order]
    repeats = np.flatnonzero(ordered[1:] == ordered[:-1]) + 1
    second = order[repeats].min()  # the earliest row that repeats an earlier one
    first = order[np.searchsorted(ordered, codes[second])]
    first_row, second_row = raw.rows(np.flatnonzero(keep)[[first, second]])
    raise InputError(
        raw.path,
        f"duplicate {name} {ids[int(second)].as_py()!r} (first at row {first_row})",
        row=second_row,
        column=name,
    )


def _raw_value(raw: _Raw, name: str, position: int):
    value = raw.table.column(name)[position].as_py()
    return value[:60] + "..." if isinstance(value, str) and len(value) > 60 else value


def _np_bool(mask) -> np.ndarray:
    return pc.fill_null(mask, False).to_numpy(zero_copy_only=False)


def _text(raw: _Raw, name: str) -> pa.ChunkedArray:
    column = raw.table.column(name)
    if pa.types.is_string(column.type):
        return column
    try:
        return pc.cast(column, pa.string())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
        raise InputError(raw.path, f"cannot read {column.type} values as text", column=name) from e


def _ids(raw: _Raw, name: str, max_chars: int | None = MAX_ID_CHARS) -> tuple[pa.ChunkedArray, list[_Check]]:
    """An id column, trimmed, and its checks: not empty, and (with ``max_chars``) no longer
    than the API takes, so every id the bundle holds can be asked for."""
    # Surrounding whitespace in an id is an export accident, never meaning.
    ids = pc.utf8_trim_whitespace(_text(raw, name))
    empty = _np_bool(pc.fill_null(pc.equal(ids, ""), True))
    checks = [_Check(f"empty {name}", name, empty, lambda i: f"{name} is empty")]
    if max_chars is not None:
        too_long = _np_bool(pc.greater(pc.utf8_length(ids), max_chars))
        checks.append(_quoting_check(raw, f"long {name}", name, too_long, f"must be at most {max_chars} characters"))
        nul = _np_bool(pc.match_substring(ids, "\x00"))
        checks.append(_Check(f"bad {name}", name, nul, lambda i: f"{name} {ID_NUL}"))
    return ids, checks


def _context(raw: _Raw, name: str) -> tuple[pa.ChunkedArray, _Check]:
    """A context column: trimmed, blank as null, dictionary-encoded; too long a value is a bad row.

    The column is encoded first and the few distinct values cleaned after, so no event's text
    is copied: a log of millions of events holds a handful of channels.
    """
    encoded = pc.dictionary_encode(_text(raw, name))
    encoded = (
        encoded.unify_dictionaries().combine_chunks()
        if encoded.num_chunks
        else pa.array([], pa.string()).dictionary_encode()
    )
    values = pc.utf8_trim_whitespace(encoded.dictionary)
    cleaned = pc.dictionary_encode(values)  # " app" and "app" become one value
    remap = cleaned.indices.to_numpy(zero_copy_only=False).astype(np.int32)
    remap[_np_bool(pc.equal(values, ""))] = -1
    too_long_value = _np_bool(pc.greater(pc.utf8_length(values), MAX_CONTEXT_CHARS))
    codes = pc.fill_null(encoded.indices, -1).to_numpy(zero_copy_only=False)
    # The extra last slot takes code -1 (a null cell).
    new_codes = np.append(remap, np.int32(-1))[codes]
    too_long = np.append(too_long_value, False)[codes]
    column = pa.DictionaryArray.from_arrays(pa.array(new_codes, pa.int32(), mask=new_codes < 0), cleaned.dictionary)
    check = _quoting_check(raw, f"bad {name}", name, too_long, f"must be at most {MAX_CONTEXT_CHARS} characters")
    return pa.chunked_array([column], CONTEXT_TYPE), check


def _unknown_context(n: int, chunk: int = 1 << 16) -> pa.ChunkedArray:
    """``n`` nulls of the context type whose chunks share one buffer: a file without the column
    costs a few hundred kilobytes instead of four bytes per event."""
    block = pa.nulls(min(n, chunk), CONTEXT_TYPE)
    full, rest = divmod(n, chunk) if n > chunk else (0, n)
    return pa.chunked_array([block] * full + ([block.slice(0, rest)] if rest else []), CONTEXT_TYPE)


def _attribute(raw: _Raw, name: str) -> pa.ChunkedArray:
    text = _text(raw, name)
    return pc.if_else(pc.equal(text, ""), pa.scalar(None, pa.string()), text)


def _empty_lists(n: int) -> pa.Array:
    return pa.ListArray.from_arrays(pa.array(np.zeros(n + 1, np.int32)), pa.array([], pa.string()))


def _categories(raw: _Raw, name: str) -> pa.Array:
    column = raw.table.column(name)
    if pa.types.is_list(column.type) or pa.types.is_large_list(column.type):
        try:
            lists = pc.cast(column, pa.list_(pa.string())).combine_chunks()
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
            raise InputError(raw.path, f"cannot read {column.type} values as categories", column=name) from e
    else:
        lists = pc.split_pattern(_text(raw, name), "|").combine_chunks()
    # Drop blanks so "a||b", "a|" and "" all mean what they look like.
    parents = pc.list_parent_indices(lists).to_numpy(zero_copy_only=False)
    values = pc.utf8_trim_whitespace(pc.list_flatten(lists))
    nonblank = _np_bool(pc.not_equal(values, ""))
    counts = np.bincount(parents[nonblank], minlength=len(lists))
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pc.filter(values, pa.array(nonblank)))


def _numbers(raw: _Raw, name: str) -> tuple[pa.ChunkedArray, np.ndarray]:
    """Float64 values (null where blank) and a mask of values that are not finite numbers."""
    column = raw.table.column(name)
    if pa.types.is_integer(column.type) or pa.types.is_floating(column.type) or pa.types.is_decimal(column.type):
        numbers = pc.cast(column, pa.float64())
        not_text = np.zeros(len(column), bool)
    else:
        text = pc.utf8_trim_whitespace(_text(raw, name))
        text = pc.if_else(pc.equal(text, ""), pa.scalar(None, pa.string()), text)
        try:
            numbers = pc.cast(text, pa.float64())
            not_text = np.zeros(len(column), bool)
        except pa.ArrowInvalid:
            # Some values are not numbers; find which ones instead of failing the file.
            numeric = pc.match_substring_regex(text, _NUMBER_RE)
            not_text = _np_bool(pc.invert(numeric))
            numbers = pc.cast(pc.if_else(numeric, text, pa.scalar(None, pa.string())), pa.float64())
    bad = not_text | _np_bool(pc.invert(pc.is_finite(numbers)))
    return numbers, bad


def _timestamps(raw: _Raw, name: str, latest: int) -> tuple[np.ndarray, list[_Check]]:
    column = raw.table.column(name)
    kind = column.type
    if pa.types.is_integer(kind):
        ints = pc.cast(column, pa.int64(), safe=False)
        seconds, unparsed = _np_int(ints), _np_bool(pc.is_null(ints))
    elif pa.types.is_floating(kind):
        floats = pc.cast(column, pa.float64()).to_numpy(zero_copy_only=False)
        seconds, unparsed = _floor_seconds(floats)
    elif pa.types.is_timestamp(kind):
        per_second = {"s": 1, "ms": 1_000, "us": 1_000_000, "ns": 1_000_000_000}[kind.unit]
        ints = pc.cast(column, pa.int64())  # epoch units whatever the zone
        seconds, unparsed = _np_int(ints) // per_second, _np_bool(pc.is_null(ints))
    elif pa.types.is_date32(kind):
        days = pc.cast(pc.cast(column, pa.int32()), pa.int64())
        seconds, unparsed = _np_int(days) * 86_400, _np_bool(pc.is_null(days))
    elif pa.types.is_date64(kind):
        millis = pc.cast(column, pa.int64())
        seconds, unparsed = _np_int(millis) // 1_000, _np_bool(pc.is_null(millis))
    elif pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_dictionary(kind):
        seconds, unparsed = _parse_time_text(pc.utf8_trim_whitespace(_text(raw, name)))
    else:
        raise InputError(raw.path, f"cannot read {kind} values as timestamps", column=name)
    out_of_range = ~unparsed & ((seconds < _MIN_UNIX_SECONDS) | (seconds > _MAX_UNIX_SECONDS))
    future = ~unparsed & ~out_of_range & (seconds > latest)
    latest_iso = datetime.fromtimestamp(latest, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")

    def unparsed_reason(i: int) -> str:
        value = _raw_value(raw, name, i)
        if value is None or (isinstance(value, str) and not value.strip()):
            return "timestamp is empty"
        return f"cannot parse {value!r} as unix seconds or ISO-8601"

    return seconds, [
        _Check("bad timestamp", name, unparsed, unparsed_reason),
        _Check(
            "bad timestamp",
            name,
            out_of_range,
            lambda i: f"{_raw_value(raw, name, i)!r} is outside years 1-9999 as unix seconds (milliseconds?)",
        ),
        _Check(
            "bad timestamp",
            name,
            future,
            lambda i: f"{_raw_value(raw, name, i)!r} is in the future (after {latest_iso})",
        ),
    ]


def _np_int(ints) -> np.ndarray:
    return pc.fill_null(ints, 0).to_numpy(zero_copy_only=False).astype(np.int64, copy=False)


def _floor_seconds(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Whole seconds (floored) and a mask of values that are not finite."""
    finite = np.isfinite(values)
    # Clip first so the int cast of huge values is defined; the range check flags them.
    clipped = np.clip(np.where(finite, values, 0.0), -1e18, 1e18)
    return np.floor(clipped).astype(np.int64), ~finite


def _parse_time_text(text: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """Unix seconds from text holding unix seconds or ISO-8601, and a mask of failures."""
    try:
        # Logs mostly hold integer seconds: one cast settles the whole column.
        ints = pc.cast(text, pa.int64())
        return _np_int(ints), _np_bool(pc.is_null(ints))
    except pa.ArrowInvalid:
        pass  # mixed or other formats: every value is classified and parsed below
    n = len(text)
    seconds = np.zeros(n, np.int64)
    parsed = np.zeros(n, bool)
    # Plain digit strings are cheap to spot and cast; regexes only see what is left.
    is_int = _np_bool(pc.ascii_is_decimal(text)) & (
        pc.fill_null(pc.binary_length(text), 0).to_numpy(zero_copy_only=False) <= 18
    )
    if is_int.any():
        where = np.flatnonzero(is_int)
        seconds[where] = _np_int(pc.cast(pc.take(text, where), pa.int64()))
        parsed[where] = True
    rest = np.flatnonzero(~is_int)
    if len(rest):
        rest_text = pc.take(text, rest)
        is_number = _np_bool(pc.match_substring_regex(rest_text, _NUMBER_RE))
        where = rest[is_number]
        floats = pc.cast(pc.filter(rest_text, pa.array(is_number)), pa.float64())
        seconds[where], not_finite = _floor_seconds(floats.to_numpy(zero_copy_only=False))
        parsed[where] = ~not_finite
        where = rest[~is_number]
        iso_seconds, iso_ok = _parse_iso(pc.filter(rest_text, pa.array(~is_number)))
        seconds[where] = iso_seconds
        parsed[where] = iso_ok
    return seconds, ~parsed


def _parse_iso(text) -> tuple[np.ndarray, np.ndarray]:
    """Unix seconds from ISO-8601 text (naive means UTC) and a mask of valid values."""
    parts = pc.extract_regex(text, _ISO_RE)
    matched = _np_bool(pc.is_valid(parts))

    def field(name: str) -> np.ndarray:
        digits = pc.struct_field(parts, name)
        digits = pc.if_else(pc.equal(pc.fill_null(digits, ""), ""), "0", digits)
        return pc.cast(digits, pa.int64()).to_numpy(zero_copy_only=False)

    y, mo, d, h, mi, s = (field(name) for name in ("y", "mo", "d", "h", "mi", "s"))
    tzh, tzm = field("tzh"), field("tzm")
    sign = np.where(_np_bool(pc.equal(pc.struct_field(parts, "sign"), "-")), -1, 1)
    leap = (y % 4 == 0) & ((y % 100 != 0) | (y % 400 == 0))
    month_ok = (mo >= 1) & (mo <= 12)
    days_in_month = _DAYS_IN_MONTH[np.clip(mo, 1, 12) - 1] + (leap & (mo == 2))
    valid = (
        matched
        & month_ok
        & (d >= 1)
        & (d <= days_in_month)
        & (h <= 23)
        & (mi <= 59)
        & (s <= 59)
        & (tzh <= 23)
        & (tzm <= 59)
    )
    seconds = _days_from_civil(y, mo, d) * 86_400 + h * 3_600 + mi * 60 + s - sign * (tzh * 3_600 + tzm * 60)
    return seconds, valid


def _days_from_civil(y: np.ndarray, m: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Days since 1970-01-01 of proleptic Gregorian dates (H. Hinnant's algorithm)."""
    y = y - (m <= 2)
    era = np.floor_divide(y, 400)
    year_of_era = y - era * 400
    day_of_year = (153 * np.where(m > 2, m - 3, m + 9) + 2) // 5 + d - 1
    day_of_era = year_of_era * 365 + year_of_era // 4 - year_of_era // 100 + day_of_year
    return era * 146_097 + day_of_era - 719_468
