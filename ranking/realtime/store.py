"""The event store: where accepted events are kept durably and each customer's real-time state
is read back. One small interface, two implementations:

- :class:`LocalEventStore`: the segmented event log (one writer directory per process) and
  the customers' state in this process's memory, tailing the other processes' writers. One
  machine, or a customer routed to one pod.
- :class:`ranking.realtime.redis_store.RedisEventStore`: Redis/Valkey streams and
  per-customer keys shared by every pod.

What a store holds as real-time state is the same in both: exactly the accepted events
after the served bundle's data end (:meth:`EventStore.set_bundle`), until a bundle that
contains them is served. The log side (``append``, ``read``, ``ack``) is all a log-only
adapter (Kafka, say) would have to provide, with customer state kept beside it.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

from ranking.config import UserStateSettings
from ranking.realtime.eventlog import LogTailer, open_writer, read_all
from ranking.realtime.events import Event
from ranking.realtime.user_state import HeldEvents, UserStateStore

Arm = tuple[str, str]


class EventStore(Protocol):
    """What the server and the builder need of an event store.

    ``append`` is durable when it returns (or raises an ``Unavailable`` and nothing of the
    batch is acknowledged); ``events`` may raise ``Unavailable`` too, which a Rank answers
    by degrading, not failing.
    """

    kind: str
    horizon: float  # the served bundle's data end (set_bundle's); -inf before one

    def set_bundle(self, horizon: float, durable_types: Iterable[str]) -> None:
        """A bundle with data up to ``horizon`` is served: state is what came after it."""

    def append(self, events: list[Event]) -> list[Arm | None]:
        """Store accepted events durably and apply those after the horizon; returns the
        (experiment, arm) each event's request id was served in, or None."""
        ...

    def events(self, user_id: str) -> list[Event]:
        """The customer's real-time events, oldest first."""
        ...

    def held(self, user_id: str) -> Sequence[Event] | HeldEvents:
        """The customer's real-time events as a Rank's overlay reads them: :meth:`events`, or
        the recent events and the purchases apart (whose digest the overlay keeps)."""
        ...

    def impression(self, record: dict) -> None:
        """Keep a served ranking (``kind: impression``) and the arm it was served in."""

    def read(self) -> Iterator[tuple[Any, dict | None]]:
        """Every stored record no published build has acknowledged, with its offset: the store
        keeps the reader's position (Redis: the consumer group ``builder``)."""
        ...

    def ack(self, offsets: Iterable[Any]) -> None:
        """A build built from the records at ``offsets`` is published: they are consumed."""

    def close(self) -> None: ...


class LocalEventStore:
    """The segmented event log and in-memory customer state of one process.

    Parameters
    ----------
    root : Path
        The log directory shared by a server's processes (each writes ``w<k>/``).
    fsync, segment_bytes, fsync_interval_seconds
        The log writer's settings (:class:`ranking.realtime.eventlog.EventLog`).
    max_users, max_events_per_user : int
        The memory bounds of the customers' other events (purchases are never evicted).
    attribution_max_requests : int
        Recent request ids whose arm is remembered.
    """

    kind = "local"

    def __init__(
        self,
        root: Path | str,
        fsync: str = "always",
        segment_bytes: int | None = None,
        fsync_interval_seconds: float | None = None,
        max_users: int = UserStateSettings.max_users,
        max_events_per_user: int = UserStateSettings.max_events_per_user,
        attribution_max_requests: int = 100_000,
    ):
        kwargs: dict[str, Any] = {"fsync": fsync}
        if segment_bytes is not None:
            kwargs["segment_bytes"] = segment_bytes
        if fsync_interval_seconds is not None:
            kwargs["fsync_interval_seconds"] = fsync_interval_seconds
        self.root = Path(root)
        self.log = open_writer(self.root, **kwargs)
        self.tailer = LogTailer(self.root)
        self.state = UserStateStore(max_users, max_events_per_user)
        self.attribution_max_requests = attribution_max_requests
        self._arms: collections.OrderedDict[str, Arm] = collections.OrderedDict()
        self._arms_lock = threading.Lock()
        self._tail_lock = threading.Lock()

    @property
    def horizon(self) -> float:
        """The served bundle's data end: state holds only what came after it."""
        return self.state.horizon

    @property
    def bytes_appended(self) -> int:
        return self.log.bytes_appended

    def replay(self, modified_since: float | None = None) -> dict[str, int]:
        """Read every writer's log back into state and the attribution memory (this process's
        own directory included: it may hold what a crashed predecessor wrote); returns counts
        by kind. ``modified_since`` skips segments last written before it.

        Raises
        ------
        ranking.realtime.eventlog.EventLogCorrupt
            The log is damaged before its tail.
        """
        with self._tail_lock:
            counts = self._apply(self.tailer.poll(modified_since=modified_since, strict=True))
            # From now on this process applies its own writes directly.
            self.tailer.skip = self.log.directory.resolve()
        return counts

    def catch_up(self) -> None:
        """Apply what other processes' writers appended since the last call."""
        with self._tail_lock:
            self._apply(self.tailer.poll())

    def _apply(self, records: list[dict]) -> dict[str, int]:
        counts = {"event": 0, "impression": 0}
        events: list[Event] = []
        for rec in records:
            kind = rec.get("kind", "")
            if kind == "event":
                events.append(Event.from_record(rec))
            elif kind == "impression" and rec.get("experiment"):
                self._remember(rec["request_id"], rec["experiment"], rec["arm"])
            counts[kind] = counts.get(kind, 0) + 1
        if events:
            # Several writers (worker processes) each append in their own order.
            events.sort(key=lambda e: e.timestamp)
            self.state.add(events)
        return counts

    def _remember(self, request_id: str, experiment: str, arm: str) -> None:
        with self._arms_lock:
            self._arms[request_id] = (experiment, arm)
            while len(self._arms) > self.attribution_max_requests:
                self._arms.popitem(last=False)

    def set_bundle(self, horizon: float, durable_types: Iterable[str]) -> int:
        """Drop what the bundle holds; returns how many events were dropped."""
        return self.state.prune(horizon, tuple(durable_types))

    def append(self, events: list[Event]) -> list[Arm | None]:
        """Append to this process's log (fsynced under the ``always`` policy), then apply.

        Raises
        ------
        ranking.realtime.eventlog.EventLogError
            Nothing was appended (a full or read-only disk) and nothing applied.
        """
        self.log.append([{"kind": "event", **e.to_record()} for e in events], durable=True)
        # Applied only once on disk: what a Rank reflects is never more than what a restart keeps.
        self.state.add(events)
        with self._arms_lock:
            return [self._arms.get(e.request_id) if e.request_id else None for e in events]

    def events(self, user_id: str) -> list[Event]:
        self.catch_up()
        return self.state.events(user_id)

    def held(self, user_id: str) -> HeldEvents:
        self.catch_up()
        return self.state.held(user_id)

    def impression(self, record: dict) -> None:
        """Remember the arm, then write the record at once without an fsync of its own (one
        per Rank would cost more than the ranking): only a machine crash can lose it.

        Raises
        ------
        ranking.realtime.eventlog.EventLogError
        """
        if record.get("experiment"):
            self._remember(record["request_id"], record["experiment"], record["arm"])
        self.log.append([record], durable=False)

    def read(self) -> Iterator[tuple[Any, dict | None]]:
        """Every record of every writer directory: the local log is kept whole, and each build
        reads all of it (``index_builder build --events <log dir>``)."""
        return read_all(self.root)

    def ack(self, offsets: Iterable[Any]) -> None:
        """Nothing to do: segments a build consumed may be archived or removed by the operator."""

    def close(self) -> None:
        self.log.close()
