"""The builder's event archive: what it consumed from the shared store's streams, kept as Parquet
beside the bundles (``<artifacts>/event-archive/``), since the store keeps only what no build has
published yet.

One file per build that consumed something, ``<sequence>-<UTC time>-<random>.parquet``, written to
a hidden temporary name and renamed into place; the sequence orders the files as the builds ran.
Its rows are the stream entries in the order they were read: ``stream`` (the key), ``id`` (the
entry id), ``kind``, ``user_id`` and ``timestamp`` (to query it without parsing), and ``record``,
the entry's JSON record whole (``{"kind": "event", ...}`` or ``{"kind": "impression", ...}``, as a
server's local event log writes it).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from ranking import parse_entry_id

__all__ = [
    "ARCHIVE_DIR",
    "ArchiveError",
    "archive_files",
    "archive_records",
    "is_archive",
    "last_ids",
    "log_records",
    "parse_id",
    "write_archive",
]

ARCHIVE_DIR = "event-archive"
SCHEMA = pa.schema(
    [
        ("stream", pa.string()),
        ("id", pa.string()),
        ("kind", pa.string()),
        ("user_id", pa.string()),
        ("timestamp", pa.float64()),
        ("record", pa.string()),
    ]
)


class ArchiveError(ValueError):
    """A file in the archive directory that the builder did not write as an archive."""


def parse_id(entry_id: str) -> tuple[int, int]:
    """A stream entry id ``<ms>-<seq>`` as a tuple that compares as Redis orders them."""
    return parse_entry_id(entry_id)


def _sequence(path: Path) -> int:
    head = path.name.split("-", 1)[0]
    return int(head) if head.isdigit() else -1


def archive_files(directory: Path | str) -> list[Path]:
    """The archive's files in the order the builds wrote them."""
    files = [p for p in Path(directory).glob("*.parquet") if not p.name.startswith(".")]
    return sorted(files, key=lambda p: (_sequence(p), p.name))


def is_archive(directory: Path | str) -> bool:
    """True for a directory holding the builder's event archive files."""
    files = archive_files(directory)
    return bool(files) and "record" in pq.read_schema(files[0]).names


def _read(path: Path, columns: list[str]) -> pa.Table:
    try:
        return pq.read_table(path, columns=columns)
    except (pa.ArrowInvalid, KeyError) as e:
        raise ArchiveError(f"{path}: not an event archive file: {e}") from e


def archive_records(directory: Path | str) -> Iterator[dict]:
    """Every record of the archive (events and impressions), in the order they were consumed.

    Raises
    ------
    ArchiveError
        A file of the archive is not one the builder wrote.
    """
    for path in archive_files(directory):
        for chunk in _read(path, ["record"]).column("record").chunks:
            for raw in chunk.to_pylist():
                yield json.loads(raw)


def log_records(directory: Path | str) -> Iterator[dict]:
    """The records of a server's event log directory or of the builder's event archive (with a
    shared store the archive holds what the servers recorded), whichever ``directory`` is."""
    if is_archive(directory):
        yield from archive_records(directory)
        return
    from ranking import read_all

    for _, rec in read_all(directory):
        yield rec


def last_ids(directory: Path | str) -> dict[str, tuple[int, int]]:
    """Per stream key, the last entry id the archive holds (none for a missing directory)."""
    last: dict[str, tuple[int, int]] = {}
    if not Path(directory).is_dir():
        return last
    for path in archive_files(directory):
        table = _read(path, ["stream", "id"])
        for stream, entry_id in zip(table.column("stream").to_pylist(), table.column("id").to_pylist()):
            parsed = parse_id(entry_id)
            if parsed > last.get(stream, (-1, -1)):
                last[stream] = parsed
    return last


def has_events(directory: Path | str) -> bool:
    """True when a file of the archive holds at least one event record."""
    if not Path(directory).is_dir():
        return False
    return any("event" in _read(p, ["kind"]).column("kind").to_pylist() for p in archive_files(directory))


def write_archive(directory: Path | str, entries: list[tuple[str, str, dict]]) -> Path:
    """Add one file holding ``entries`` (stream key, entry id, record), durably.

    Returns
    -------
    Path
        The new file, renamed into place and its directory entry synced.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob(".tmp-*"):  # a build that died while writing
        stale.unlink(missing_ok=True)
    table = pa.table(
        {
            "stream": [s for s, _, _ in entries],
            "id": [i for _, i, _ in entries],
            "kind": [rec.get("kind") for _, _, rec in entries],
            "user_id": [rec.get("user_id") for _, _, rec in entries],
            "timestamp": [float(rec.get("timestamp") or 0.0) for _, _, rec in entries],
            "record": [json.dumps(rec, separators=(",", ":"), ensure_ascii=False) for _, _, rec in entries],
        },
        schema=SCHEMA,
    )
    sequence = max((_sequence(p) for p in archive_files(directory)), default=0) + 1
    now = _dt.datetime.now(_dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    name = f"{sequence:06d}-{now}-{secrets.token_hex(3)}.parquet"
    tmp = directory / f".tmp-{name}"
    pq.write_table(table, tmp)
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.rename(tmp, directory / name)
    # The rename itself must survive a machine crash: the stream is trimmed right after.
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return directory / name
