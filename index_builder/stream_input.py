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

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import redis

from index_builder.event_archive import (
    ARCHIVE_DIR,
    archive_files,
    archive_records,
    has_events,
    last_ids,
    parse_id,
    write_archive,
)
from ranking.realtime.redis_layout import (
    BUILDER_GROUP,
    FORMAT,
    RECORD_FIELD,
    RedisLayout,
    is_store_url,
    redacted,
    split_store_url,
)

__all__ = ["CONSUMER", "StreamInput", "StreamInputError", "is_store_url"]

log = logging.getLogger(__name__)

# One fixed name: a build that crashed left its entries pending under it, and the next build,
# reading as the same consumer, is given them again.
CONSUMER = "index_builder"


class StreamInputError(RuntimeError):
    """The store cannot be read or acknowledged; the message names it (password redacted)."""


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _read_group(r: redis.Redis, stream: str, after: str, count: int) -> list[tuple[bytes, dict[bytes, bytes] | None]]:
    """One XREADGROUP of one stream: its entries, ``(id, fields)``; fields are empty or None for a
    pending entry that was deleted since it was delivered."""
    # redis-py annotates the reply for RESP3 as well; this client speaks RESP2: [[key, entries]].
    got: Any = r.xreadgroup(BUILDER_GROUP, CONSUMER, {stream: after}, count=count)
    return got[0][1] if got else []


# ---------------------------------------------------------------------------
# The stream
# ---------------------------------------------------------------------------


@dataclass
class _Consumed:
    """What one build read from one stream."""

    ids: list[str] = field(default_factory=list)  # every entry to acknowledge
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
        client_url, prefix = split_store_url(url)
        self.prefix = prefix
        self.archive_dir = Path(out) / ARCHIVE_DIR
        self.batch = batch
        self.timeout = timeout
        self._client_url = client_url
        self._client: redis.Redis | None = None
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

    def _connect(self) -> redis.Redis:
        if self._client is None:
            self._client = redis.Redis.from_url(
                self._client_url, socket_timeout=self.timeout, socket_connect_timeout=self.timeout
            )
        return self._client

    def _read_layout(self) -> RedisLayout:
        r = self._connect()
        try:
            meta = {_text(k): _text(v) for k, v in r.hgetall(RedisLayout(self.prefix).meta).items()}
        except redis.RedisError as e:
            raise self._fail("cannot read the store", e) from e
        if not meta:
            raise StreamInputError(
                f"event store {self.label}: no {self.prefix}:meta hash, so no server has written events under "
                f"prefix {self.prefix!r} (check the URL's db and ?prefix= against the server's event_store)"
            )
        if meta.get("format") != str(FORMAT) or not meta.get("shards", "").isdigit():
            raise StreamInputError(
                f"event store {self.label}: {self.prefix}:meta is {meta}; this builder reads format {FORMAT}"
            )
        return RedisLayout(self.prefix, int(meta["shards"]))

    def consume(self) -> StreamInput:
        """Read every stream up to its last entry at this moment (module docstring, step 1).

        Raises
        ------
        StreamInputError
            The store is unreachable, holds no events of this prefix, or an entry is not a record.
        """
        self.layout = self._read_layout()
        last_archived = last_ids(self.archive_dir)
        r = self._connect()
        try:
            for stream in self.layout.streams():
                self._consumed[stream] = self._consume_stream(r, stream, last_archived.get(stream))
        except redis.RedisError as e:
            raise self._fail("reading the streams through consumer group " + BUILDER_GROUP, e) from e
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

    def _consume_stream(self, r: redis.Redis, stream: str, archived: tuple[int, int] | None) -> _Consumed:
        try:
            r.xgroup_create(stream, BUILDER_GROUP, id="0", mkstream=True)
        except redis.ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise
        # The snapshot: entries appended from now on are the next build's.
        end = parse_id(_text(r.xinfo_stream(stream)["last-generated-id"]))
        done = _Consumed()

        def take(entries: list[tuple[bytes, dict[bytes, bytes] | None]], pending: bool) -> bool:
            """Keep the entries up to the snapshot; False once past it."""
            for raw_id, fields in entries:
                entry_id = _text(raw_id)
                parsed = parse_id(entry_id)
                if parsed > end:
                    # Delivered by the last batch but appended during the build: left pending
                    # (unacknowledged), so the next build reads it first.
                    return False
                done.ids.append(entry_id)
                done.last = parsed
                done.pending += pending
                if archived is not None and parsed <= archived:
                    done.already_archived += 1
                    continue
                if not fields or RECORD_FIELD.encode() not in fields:
                    # A pending entry trimmed by hand has no fields left; nothing to read.
                    log.warning("event store %s: %s %s has no field %r; skipped", self.label, stream, entry_id, "r")
                    continue
                try:
                    record = json.loads(fields[RECORD_FIELD.encode()])
                except ValueError as e:
                    raise StreamInputError(
                        f"event store {self.label}: {stream} entry {entry_id} is not a JSON record: {e}"
                    ) from e
                self._new.append((stream, entry_id, record))
            return True

        # Entries an earlier build was given and never acknowledged: id 0 means "my pending ones".
        after = "0"
        while True:
            entries = _read_group(r, stream, after, self.batch)
            if not entries:
                break
            take(entries, pending=True)
            after = _text(entries[-1][0])
        if end == (0, 0) or self._delivered(r, stream) >= end:
            return done
        while True:
            entries = _read_group(r, stream, ">", self.batch)
            if not entries or not take(entries, pending=False) or (done.last or (0, 0)) >= end:
                return done

    @staticmethod
    def _delivered(r: redis.Redis, stream: str) -> tuple[int, int]:
        for group in r.xinfo_groups(stream):
            if _text(group["name"]) == BUILDER_GROUP:
                return parse_id(_text(group["last-delivered-id"]))
        return (0, 0)

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
        r = self._connect()
        try:
            for stream, done in self._consumed.items():
                for start in range(0, len(done.ids), self.batch):
                    r.xack(stream, BUILDER_GROUP, *done.ids[start : start + self.batch])
                if done.last is not None:
                    # Exact, not "~": what is left is precisely what no build has published.
                    ms, seq = done.last
                    r.xtrim(stream, minid=f"{ms}-{seq + 1}", approximate=False)
        except redis.RedisError as e:
            raise self._fail("the bundle is published, but acknowledging what it consumed failed", e) from e
        log.info(
            "event store %s: acknowledged and trimmed %d entries; archived %d to %s",
            self.label,
            sum(len(c.ids) for c in self._consumed.values()),
            len(self._new),
            self.archive_path,
        )

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
