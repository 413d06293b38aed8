"""The builder's events from the shared event store: its streams read through the consumer group
``builder``, archived to Parquet beside the bundle, acknowledged and trimmed once the bundle is out.

The store (``ranking.realtime.redis_layout``) holds only what no build has consumed yet, since a
build trims what it published. A bundle is fitted on the whole history, so every build reads the
archives of the earlier builds from the same artifacts directory (``<out>/event-archive/``) and
the stream's entries, and adds one archive file of its own when it publishes:

1. :meth:`StreamInput.consume` creates the group if missing, reads the entries delivered to this
   consumer by an earlier build that never acknowledged them (it crashed), then new ones, up to the
   last entry each stream held when the read started. An entry an archive already holds (a build
   that crashed after archiving but before acknowledging) is not read twice.
2. The bundle is fitted on :meth:`StreamInput.records` and published.
3. :meth:`StreamInput.commit` writes this build's archive (temporary name, renamed into place), then
   acknowledges (XACK) the consumed entries and trims every stream up to the last of them (XTRIM
   MINID). A crash before it leaves the entries pending, for the next build to read again; an entry
   appended during the build is neither acknowledged nor trimmed.

One builder consumes a store at a time (the CronJob forbids concurrent runs).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.parquet as pq

from index_builder.event_archive import (
    ARCHIVE_DIR,
    archive_files,
    archive_records,
    has_events,
    last_ids,
    parse_id,
    write_archive,
)
from ranking import (
    BUILDER_CONSUMER,
    BUILDER_GROUP,
    EventStoreError,
    RedisEventStore,
    RedisLayout,
    StreamOffset,
    is_store_url,
    redacted,
    split_store_url,
)

__all__ = ["CONSUMER", "StreamInput", "StreamInputError", "is_store_url"]

log = logging.getLogger(__name__)

CONSUMER = BUILDER_CONSUMER


class StreamInputError(RuntimeError):
    """The store cannot be read or acknowledged; the message names it (password redacted)."""


# ---------------------------------------------------------------------------
# The stream
# ---------------------------------------------------------------------------


@dataclass
class _Consumed:
    """What one build read from one stream."""

    offsets: list[StreamOffset] = field(default_factory=list)  # every entry to acknowledge
    last: tuple[int, int] | None = None  # the last entry id read up to the snapshot
    pending: int = 0  # of them, delivered to an earlier build that never acknowledged them
    already_archived: int = 0  # of them, already in an archive: acknowledged, not read again


class StreamInput:
    """One build's reading of a shared event store (see the module docstring).

    Parameters
    ----------
    url : str
        ``redis://`` or ``rediss://`` URL with an optional ``prefix`` query parameter
        (``ranking.realtime.redis_layout.split_store_url``).
    out : Path
        The artifacts directory; the archive is ``out/event-archive/``.
    batch : int
        Entries per XREADGROUP round trip.
    timeout : float
        Seconds a round trip to the store may take before the build fails.
    """

    def __init__(self, url: str, out: Path | str, batch: int = 10_000, timeout: float = 30.0):
        self.url = url
        self.label = redacted(url)
        prefix = split_store_url(url)[1]
        self.prefix = prefix
        self.archive_dir = Path(out) / ARCHIVE_DIR
        self.batch = batch
        self.timeout = timeout
        self.store: RedisEventStore | None = None
        self.layout: RedisLayout | None = None
        self._new: list[tuple[str, str, dict]] = []  # (stream, id, record) of this build
        self._consumed: dict[str, _Consumed] = {}
        self.archive_path: Path | None = None

    def __str__(self) -> str:
        return self.label

    def __repr__(self) -> str:
        return f"StreamInput({self.label!r})"

    # -- reading --------------------------------------------------------------------

    def _fail(self, what: str, exc: Exception) -> StreamInputError:
        return StreamInputError(f"event store {self.label}: {what}: {type(exc).__name__}: {exc}")

    def consume(self) -> StreamInput:
        """Read every stream up to its last entry at this moment (module docstring, step 1).

        Raises
        ------
        StreamInputError
            The store is unreachable, holds no events of this prefix, or an entry is not a record.
        """
        try:
            self.store = RedisEventStore.existing(self.url, self.timeout)
        except ValueError as e:
            raise StreamInputError(str(e)) from e
        except EventStoreError as e:
            raise StreamInputError(f"{e} (cannot read the store)") from e
        self.layout = self.store.layout
        last_archived = last_ids(self.archive_dir)
        self._consumed = {stream: _Consumed() for stream in self.layout.streams()}
        try:
            for off, record in self.store.read(self.batch):
                self._take(off, record, last_archived.get(off.stream))
        except EventStoreError as e:
            raise StreamInputError(f"{e} (reading the streams through consumer group {BUILDER_GROUP})") from e
        except ValueError as e:
            raise StreamInputError(f"event store {self.label}: {e}") from e
        done = self._consumed.values()
        log.info(
            "event store %s: %d new entries (%d re-read from an unfinished build, %d already archived) "
            "from %d streams; %d archived entries from earlier builds",
            self.label,
            len(self._new),
            sum(c.pending for c in done),
            sum(c.already_archived for c in done),
            len(self._consumed),
            sum(pq.read_metadata(p).num_rows for p in archive_files(self.archive_dir))
            if self.archive_dir.is_dir()
            else 0,
        )
        return self

    def _take(self, off: StreamOffset, record: dict | None, archived: tuple[int, int] | None) -> None:
        done = self._consumed[off.stream]
        parsed = parse_id(off.id)
        done.offsets.append(off)
        done.last = parsed
        done.pending += off.redelivered
        if archived is not None and parsed <= archived:
            # A build that crashed after archiving it, before acknowledging: not read twice.
            done.already_archived += 1
            return
        if record is None:
            # A pending entry trimmed by hand has no fields left; nothing to read.
            log.warning("event store %s: %s %s has no field %r; skipped", self.label, off.stream, off.id, "r")
            return
        self._new.append((off.stream, off.id, record))

    def records(self) -> Iterator[dict]:
        """The whole history: the earlier builds' archives, then this build's entries."""
        if self.archive_dir.is_dir():
            yield from archive_records(self.archive_dir)
        for _, _, record in self._new:
            yield record

    def has_events(self) -> bool:
        """True when the history (archives and this build's entries) holds at least one event."""
        return any(rec.get("kind") == "event" for _, _, rec in self._new) or has_events(self.archive_dir)

    def summary(self) -> dict:
        """The manifest's account of this read."""
        return {
            "store": self.label,
            "prefix": self.prefix,
            "group": BUILDER_GROUP,
            "archive": str(self.archive_dir),
            "archive_files": [p.name for p in archive_files(self.archive_dir)] if self.archive_dir.is_dir() else [],
            "new_entries": len(self._new),
            "new_events": sum(1 for _, _, rec in self._new if rec.get("kind") == "event"),
            "reread_pending": sum(c.pending for c in self._consumed.values()),
            "already_archived": sum(c.already_archived for c in self._consumed.values()),
        }

    # -- after publishing -------------------------------------------------------------

    def commit(self) -> None:
        """Archive this build's entries, then acknowledge and trim them (module docstring, step 3).
        Call only once the bundle built from :meth:`records` is published.

        Raises
        ------
        StreamInputError
            The store failed while acknowledging; the archive is written, and the next build
            acknowledges the entries without reading them twice.
        """
        self.archive_path = write_archive(self.archive_dir, self._new) if self._new else None
        assert self.store is not None, "commit() before consume()"
        try:
            self.store.ack(off for done in self._consumed.values() for off in done.offsets)
        except EventStoreError as e:
            raise StreamInputError(f"{e} (the bundle is published, but acknowledging what it consumed failed)") from e
        log.info(
            "event store %s: acknowledged and trimmed %d entries; archived %d to %s",
            self.label,
            sum(len(c.offsets) for c in self._consumed.values()),
            len(self._new),
            self.archive_path,
        )

    def close(self) -> None:
        if self.store is not None:
            self.store.close()
            self.store = None
