"""The shared event store on Redis/Valkey: what RecordEvents writes and what Rank reads on any pod.

Keys as :mod:`ranking.realtime.redis_layout` describes them. A batch of events is appended
to the streams and applied to each customer's state in one atomic script call (a Lua
script with a ``#!lua`` shebang, so Redis 7 / Valkey refuses it whole, before any write,
when out of memory), so a Rank never sees state the stream does not hold, and an OK is
only given once Redis answered it (with ``appendfsync always`` it has then written and
fsynced its AOF).

Per customer the state is two sorted sets scored by event time: ``recent`` (other events,
the latest ``max_events_per_user``) and ``buys`` (purchases, never cut by count). Every
write drops what the served bundle's window already covers (score at or before its data
end); a customer's keys expire ``key_ttl_seconds`` after their last write, a bound that
must exceed the time between builds (the server warns when the served bundle is older).

Failures surface as :class:`EventStoreError` (an ``Unavailable``): the caller decides
whether that degrades a Rank or refuses a RecordEvents.
"""

from __future__ import annotations

import itertools
import json
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

from ranking.config import UserStateSettings
from ranking.errors import Unavailable
from ranking.realtime.events import Event
from ranking.realtime.redis_layout import (
    BUILDER_CONSUMER,
    BUILDER_GROUP,
    FORMAT,
    RECORD_FIELD,
    RedisLayout,
    decode,
    encode,
    parse_entry_id,
    redacted,
    split_store_url,
)
from ranking.realtime.user_state import HeldEvents, HeldPurchases

# The settings under which an acknowledged write survives a crash of redis-server.
DURABLE_SETTINGS = {"appendonly": "yes", "appendfsync": "always", "maxmemory-policy": "noeviction"}


# RecordEvents' transaction, run atomically by Redis. With n events and u customers applied:
# KEYS = n stream keys, n state keys (a sorted set, or the stream key when not applied),
#        3u per-customer keys (recent, buys, buys_epoch), then the arm keys of the events' request ids;
# ARGV = n, u, max recent events, key ttl (ms), horizon, number of arm keys, this batch's
#        epoch token, then n records, n members ("" when not applied), n scores.
# Appends every record, applies the members, trims each customer's recent events to the
# latest ones and both keys to after the horizon, renews the buys' epoch unless the set
# only grew at its end (a new member last by (score, member)), refreshes every expiry;
# returns the arms.
_APPEND_LUA = """#!lua
local n, u, maxr = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local ttl, hz, na, epoch = ARGV[4], ARGV[5], tonumber(ARGV[6]), ARGV[7]
local buys, renew = {}, {}
for j = 1, u do buys[KEYS[2 * n + 3 * j - 1]] = true end
for i = 1, n do
  redis.call('XADD', KEYS[i], '*', '{field}', ARGV[7 + i])
  local m, key = ARGV[7 + n + i], KEYS[n + i]
  if m ~= '' then
    redis.call('ZADD', key, ARGV[7 + 2 * n + i], m)
    if buys[key] and redis.call('ZRANK', key, m) ~= redis.call('ZCARD', key) - 1 then renew[key] = true end
  end
end
for j = 1, u do
  local recent, bought, ep = KEYS[2 * n + 3 * j - 2], KEYS[2 * n + 3 * j - 1], KEYS[2 * n + 3 * j]
  redis.call('ZREMRANGEBYRANK', recent, 0, -(maxr + 1))
  if hz ~= '-inf' then
    redis.call('ZREMRANGEBYSCORE', recent, '-inf', hz)
    if redis.call('ZREMRANGEBYSCORE', bought, '-inf', hz) > 0 then renew[bought] = true end
  end
  if renew[bought] or redis.call('EXISTS', ep) == 0 then redis.call('HSET', ep, 'e', epoch .. ':' .. j) end
  redis.call('PEXPIRE', recent, ttl)
  redis.call('PEXPIRE', bought, ttl)
  redis.call('PEXPIRE', ep, ttl)
end
local arms = {}
for k = 1, na do arms[k] = redis.call('GET', KEYS[2 * n + 3 * u + k]) end
return arms
""".replace("{field}", RECORD_FIELD)


# A customer's state for one Rank. KEYS = recent, buys, buys_epoch; ARGV = the horizon
# (exclusive, as ZRANGEBYSCORE takes it), the buys' epoch the reader holds ("" for none), the
# rank its held purchases end at, the last of them (its member), and the horizon inclusive
# (for ZCOUNT). The rest after the held ones is read only when the epoch is the one held
# AND the held last member is still at its rank: a set written by a server that keeps no
# epoch, deleted or expired and written anew is read whole.
# Returns {recent after the horizon, the epoch ("" for none), purchases, whether they are the
# rest after the held ones (1) or all of them after the horizon (0), the rank they start at}.
_READ_LUA = """#!lua flags=no-writes
local recent = redis.call('ZRANGEBYSCORE', KEYS[1], ARGV[1], '+inf')
local e = redis.call('HGET', KEYS[3], 'e')
local ends = tonumber(ARGV[3])
if e and e == ARGV[2] and ends > 0 and redis.call('ZRANGE', KEYS[2], ends - 1, ends - 1)[1] == ARGV[4] then
  return {recent, e, redis.call('ZRANGE', KEYS[2], ends, -1), 1, ends}
end
local first = redis.call('ZCOUNT', KEYS[2], '-inf', ARGV[5])
return {recent, e or '', redis.call('ZRANGEBYSCORE', KEYS[2], ARGV[1], '+inf'), 0, first}
"""


class _Held(NamedTuple):
    """What a Rank last read of one customer's purchases."""

    horizon: float  # the horizon they were read after
    epoch: bytes  # the buys set's epoch then
    end: int  # the set's rank just after the last of them
    last: bytes  # the last one's member
    purchases: HeldPurchases


class EventStoreError(Unavailable):
    """The shared event store did not answer, or answered with an error.

    ``reason`` is one of ``timeout``, ``connection``, ``error``.
    """

    def __init__(self, message: str, reason: str = "error"):
        super().__init__(message)
        self.reason = reason


class StreamOffset(NamedTuple):
    """Where a record is in the shared store: its stream, its entry id, and whether it was
    delivered to the builder before (by a build that never acknowledged it)."""

    stream: str
    id: str
    redelivered: bool = False


@dataclass(frozen=True)
class Durability:
    """What the store's settings promise about an acknowledged write."""

    durable: bool
    settings: dict[str, str]
    problem: str = ""


class RedisEventStore:
    """A connection to the shared store (thread-safe: redis-py pools connections).

    Parameters
    ----------
    url : str
        ``redis://`` or ``rediss://`` URL, optionally with ``?prefix=``.
    shards : int
        Stream keys events are spread over (must agree with the store's ``meta``).
    read_timeout_s : float
        Socket timeout of Rank's read of a customer's state (its own budget).
    write_timeout_s : float
        Socket timeout of RecordEvents' transaction (an fsync may be in it).
    max_events_per_user : int
        Non-purchase events kept per customer.
    key_ttl_seconds : float
        A customer's state keys expire this long after their last write.
    attribution_ttl_seconds : float
        How long a served request's arm is remembered for attribution.
    retry_seconds : float
        After a read the store refused (no connection), reads fail at once for this long
        instead of trying on every Rank; a read that timed out is not held against the next.
    observe : callable(op, seconds, reason or None), optional
        Told about every round trip (the server's metrics).
    held_purchases : int
        Purchases this process keeps between Ranks (0: none), of customers with at least
        ``held_min_purchases``: a Rank of one of them reads only the purchases written since
        (:meth:`held`). The least recently ranked customers are let go first.
    held_min_purchases : int
        Fewer purchases than this are read whole on every Rank (cheaper than keeping them).
    observe_purchases : callable(read, purchases, held), optional
        Told after every Rank's read how many purchases it decoded (``read``: ``whole`` or
        ``rest``) and how many this process now keeps.
    """

    kind = "redis"

    def __init__(
        self,
        url: str,
        shards: int = 8,
        read_timeout_s: float = 0.01,
        write_timeout_s: float = 2.0,
        max_events_per_user: int = 200,
        key_ttl_seconds: float = 90 * 86_400.0,
        attribution_ttl_seconds: float = 7 * 86_400.0,
        retry_seconds: float = 1.0,
        observe: Callable[[str, float, str | None], None] | None = None,
        held_purchases: int = 200_000,
        held_min_purchases: int = 64,
        observe_purchases: Callable[[str, int, int], None] | None = None,
    ):
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        base, prefix = split_store_url(url)
        self.url = redacted(url)
        self.layout = RedisLayout(prefix, shards)
        self.max_events_per_user = max_events_per_user
        self.key_ttl_ms = int(key_ttl_seconds * 1000)
        self.attribution_ttl_ms = int(attribution_ttl_seconds * 1000)
        self.retry_seconds = retry_seconds
        self._retry_at = 0.0
        self.horizon = float("-inf")
        self.durable_types = frozenset(UserStateSettings.durable_types)
        self._observe = observe or (lambda op, seconds, reason: None)
        if held_purchases < 0 or held_min_purchases < 1:
            raise ValueError(
                "held_purchases must be >= 0 and held_min_purchases >= 1, "
                f"got {held_purchases} and {held_min_purchases}"
            )
        self.held_purchases, self.held_min_purchases = held_purchases, held_min_purchases
        # user id -> what a Rank last read of their purchases; least recently ranked first.
        self._held: OrderedDict[str, _Held] = OrderedDict()
        self._held_count = 0
        self._held_lock = threading.Lock()
        self._observe_purchases = observe_purchases or (lambda read, purchases, held: None)
        self._errors = (redis.RedisError, OSError)
        self._timeout = (redis.TimeoutError, TimeoutError)
        self._connection = (redis.ConnectionError, ConnectionError)

        def client(timeout: float) -> redis.Redis:
            # No retries: a Rank has its own budget, and a retried EXEC could append twice.
            return redis.Redis.from_url(
                base, socket_timeout=timeout, socket_connect_timeout=timeout, retry=Retry(NoBackoff(), 0)
            )

        self.reader = client(read_timeout_s)
        self.writer = client(write_timeout_s)
        # One script call per batch: atomic, and one command to encode instead
        # of several per event (the client's encoding was most of a 100-event batch's cost).
        self._append_script = self.writer.register_script(_APPEND_LUA)
        self._read_script = self.reader.register_script(_READ_LUA)
        # Members of a sorted set are unique: a per-process token keeps two equal events two events.
        self._token = os.urandom(4).hex()
        self._seq = itertools.count()

    @classmethod
    def existing(cls, url: str, timeout_s: float = 30.0) -> RedisEventStore:
        """The store a server has written, with the shard count its ``meta`` records (the builder's
        way in: it has no setting of its own for it).

        Raises
        ------
        EventStoreError
            The store is unreachable.
        ValueError
            No server has written under this prefix, or in another format.
        """
        prefix = split_store_url(url)[1]
        probe = cls(url, shards=1, read_timeout_s=timeout_s, write_timeout_s=timeout_s)
        try:
            raw = probe._call("meta", lambda: probe.writer.hgetall(probe.layout.meta))
        finally:
            probe.close()
        meta = {_text(k): _text(v) for k, v in raw.items()}
        if not meta:
            raise ValueError(
                f"event store {probe.url}: no {prefix}:meta hash, so no server has written events under "
                f"prefix {prefix!r} (check the URL's db and ?prefix= against the server's event_store)"
            )
        if meta.get("format") != str(FORMAT) or not meta.get("shards", "").isdigit():
            raise ValueError(f"event store {probe.url}: {prefix}:meta is {meta}; this code reads format {FORMAT}")
        return cls(url, shards=int(meta["shards"]), read_timeout_s=timeout_s, write_timeout_s=timeout_s)

    # -- plumbing ---------------------------------------------------------------------
    def _call(self, op: str, fn):
        t0 = time.perf_counter()
        try:
            out = fn()
        except self._errors as exc:
            reason = (
                "timeout"
                if isinstance(exc, self._timeout)
                else "connection"
                if isinstance(exc, self._connection)
                else "error"
            )
            self._observe(op, time.perf_counter() - t0, reason)
            raise EventStoreError(f"event store {self.url}: {op} failed ({reason}): {exc}", reason) from exc
        self._observe(op, time.perf_counter() - t0, None)
        return out

    def _member(self, ev: Event) -> bytes:
        # A fixed-width sequence: one process's members at equal times sort in arrival order.
        return f"{self._token}.{next(self._seq):012x}|".encode() + encode(ev.to_record())

    @staticmethod
    def _events(members: list[bytes]) -> tuple[Event, ...]:
        """The members' events, decoded as one JSON array (one parse instead of one per member)."""
        if not members:
            return ()
        records = decode(b"[" + b",".join(m.split(b"|", 1)[1] for m in members) + b"]")
        return tuple(Event.from_record(r) for r in records)

    # -- start-up ---------------------------------------------------------------------
    def check_meta(self) -> None:
        """Record (or check) the shard count and format in ``meta``.

        Raises
        ------
        ValueError
            The store was set up with another shard count or format.
        EventStoreError
        """

        def run():
            pipe = self.writer.pipeline(transaction=True)
            pipe.hsetnx(self.layout.meta, "shards", self.layout.shards)
            pipe.hsetnx(self.layout.meta, "format", FORMAT)
            pipe.hgetall(self.layout.meta)
            return pipe.execute()[-1]

        meta = {k.decode(): v.decode() for k, v in self._call("meta", run).items()}
        if int(meta["shards"]) != self.layout.shards or int(meta["format"]) != FORMAT:
            raise ValueError(
                f"event store {self.url} (prefix {self.layout.prefix!r}) holds format {meta['format']} with "
                f"{meta['shards']} shards; this server is set to format {FORMAT} with {self.layout.shards} "
                "(event_store_shards must not change while the streams hold events)"
            )

    def durability(self) -> Durability:
        """Whether an acknowledged write survives a crash: AOF on, fsynced on every write, no eviction."""
        try:
            got = {}
            for name in DURABLE_SETTINGS:
                got.update({k.decode() if isinstance(k, bytes) else k: v for k, v in self._config_get(name).items()})
        except EventStoreError as exc:
            return Durability(False, {}, f"cannot read its settings ({exc}); a managed store must document them")
        settings = {k: (v.decode() if isinstance(v, bytes) else str(v)) for k, v in got.items()}
        wrong = [
            f"{k} is {settings.get(k)!r} (want {want!r})"
            for k, want in DURABLE_SETTINGS.items()
            if settings.get(k) != want
        ]
        return Durability(not wrong, settings, "; ".join(wrong))

    def _config_get(self, name: str) -> dict:
        return self._call("config", lambda: self.writer.config_get(name))

    def set_bundle(self, horizon: float, durable_types) -> int:
        """State is what came after ``horizon``: reads leave out older events, and each write
        removes them from the customer's keys. Returns 0 (nothing is dropped at once)."""
        self.horizon, self.durable_types = horizon, frozenset(durable_types)
        return 0

    # -- RecordEvents -------------------------------------------------------------------
    def append(self, events: list[Event]) -> list[tuple[str, str] | None]:
        """Append ``events`` to the streams and apply those after the horizon to their
        customers' state, in one atomic script call; returns the (experiment, arm) served for
        each event's request id (None where unknown), read in the same round trip.

        Raises
        ------
        EventStoreError
            Nothing of the batch is acknowledged (the script either ran whole or not at all;
            a timeout after it was sent may still have applied it, so a client's retry can
            duplicate, never lose).
        """
        lay = self.layout
        horizon, durable_types = self.horizon, self.durable_types
        n = len(events)
        streams: list[str] = []
        states: list[str] = []
        records: list[bytes] = []
        members: list[bytes] = []
        scores: list[str] = []
        touched: dict[str, None] = {}
        for ev in events:
            stream = lay.stream(lay.shard(ev.user_id))
            streams.append(stream)
            records.append(encode({"kind": "event", **ev.to_record()}))
            if ev.timestamp <= horizon:
                states.append(stream)  # a key of the same slot; not written
                members.append(b"")
                scores.append("0")
                continue
            states.append(lay.buys(ev.user_id) if ev.event_type in durable_types else lay.recent(ev.user_id))
            members.append(self._member(ev))
            scores.append(repr(ev.timestamp))
            touched[ev.user_id] = None
        per_user = [key for uid in touched for key in (lay.recent(uid), lay.buys(uid), lay.buys_epoch(uid))]
        asked = [i for i, ev in enumerate(events) if ev.request_id]
        arm_keys = [lay.arm(events[i].request_id) for i in asked]
        args: list[bytes | str | int] = [n, len(touched), self.max_events_per_user, self.key_ttl_ms, repr(horizon)]
        args.append(len(arm_keys))
        args.append(f"{self._token}.{next(self._seq):012x}")  # a new epoch's token (a customer's adds :j)
        args.extend(records)
        args.extend(members)
        args.extend(scores)
        keys = streams + states + per_user + arm_keys
        replies = self._call("record", lambda: self._append_script(keys=keys, args=args))
        arms: list[tuple[str, str] | None] = [None] * n
        for i, value in zip(asked, replies):
            arms[i] = _arm(value)
        return arms

    # -- Rank ---------------------------------------------------------------------------
    def events(self, user_id: str) -> list[Event]:
        """The customer's events after the horizon, oldest first (at equal times the purchases
        last), in one round trip: :meth:`held`, merged.

        Raises
        ------
        EventStoreError
            The read failed, or one failed less than ``retry_seconds`` ago.
        """
        return self.held(user_id).merged()

    def held(self, user_id: str) -> HeldEvents:
        """The customer's recent events and purchases after the horizon, each oldest first, in one
        round trip (one script call reading the three keys).

        A customer with at least ``held_min_purchases`` purchases is kept between Ranks: the
        next read names the buys' epoch and where the held purchases end, and Redis answers
        with only the purchases after them (none: the same :class:`HeldPurchases`, whose
        digest the overlay already has; some: a snapshot that extends the held one). A new
        epoch (a purchase sorting before one held, purchases dropped at the horizon), the
        last held purchase no longer at its rank (a set deleted, or expired and written anew,
        or written by a server that keeps no epoch), or another horizon reads them whole.

        Raises
        ------
        EventStoreError
            The read failed, or one failed less than ``retry_seconds`` ago.
        """
        if not user_id:
            return HeldEvents()
        if time.monotonic() < self._retry_at:
            raise EventStoreError(f"event store {self.url}: skipped after a recent failure", "skipped")
        horizon = self.horizon
        low, through = (f"({horizon}", repr(horizon)) if horizon > float("-inf") else ("-inf", "-inf")
        with self._held_lock:
            held = self._held.get(user_id)
        if held is not None and held.horizon != horizon:
            held = None
        keys = [self.layout.recent(user_id), self.layout.buys(user_id), self.layout.buys_epoch(user_id)]
        args = [low, held.epoch if held else "", held.end if held else 0, held.last if held else "", through]
        try:
            recent, epoch, bought, rest, first = self._call(
                "rank_read", lambda: self._read_script(keys=keys, args=args)
            )
        except EventStoreError as exc:
            # A store that refuses connections is skipped for a while; one slow read under load
            # is not a reason to drop every customer's state for a second.
            if exc.reason == "connection":
                self._retry_at = time.monotonic() + self.retry_seconds
            raise
        if rest and held is not None:
            purchases = held.purchases if not bought else _continued(held.purchases, self._events(bought))
        else:
            purchases = HeldPurchases(self._events(bought))
        # The rank after the last purchase read: where the next read of this epoch starts.
        last = bought[-1] if bought else held.last if held is not None and rest else b""
        self._keep(user_id, _Held(horizon, epoch, int(first) + len(bought), last, purchases) if epoch else None)
        self._observe_purchases("rest" if rest else "whole", len(bought), self._held_count)
        return HeldEvents(self._events(recent), purchases)

    def _keep(self, user_id: str, held: _Held | None) -> None:
        """Keep (or let go) what a Rank read of a customer's purchases, within ``held_purchases``."""
        keep = held is not None and self.held_min_purchases <= len(held.purchases) <= self.held_purchases
        with self._held_lock:
            old = self._held.pop(user_id, None)
            if old is not None:
                self._held_count -= len(old.purchases)
            if not keep:
                return
            assert held is not None
            self._held[user_id] = held
            self._held_count += len(held.purchases)
            while self._held_count > self.held_purchases:
                _, gone = self._held.popitem(last=False)
                self._held_count -= len(gone.purchases)

    def impression(self, record: dict) -> None:
        """Log a served ranking to its customer's stream; remember its arm for attribution."""
        lay = self.layout
        experiment, arm = record.get("experiment", ""), record.get("arm", "")

        def run():
            pipe = self.reader.pipeline(transaction=False)
            pipe.xadd(lay.stream(lay.shard(record.get("user_id", ""))), {RECORD_FIELD: encode(record)})
            if experiment:
                pipe.set(lay.arm(record["request_id"]), f"{experiment}\t{arm}", px=self.attribution_ttl_ms)
            return pipe.execute()

        self._call("impression", run)

    # -- the builder's side: read through the consumer group, acknowledge once published ------
    def read(self, batch: int = 10_000) -> Iterator[tuple[StreamOffset, dict | None]]:
        """Every record no build has acknowledged, through the consumer group ``builder``.

        Per stream: first the entries delivered to the builder before and never acknowledged
        (a build that crashed), then new ones, up to the stream's last entry when its read
        began; entries appended since are the next build's (left undelivered, or pending if a
        batch brought them). The record is None for a pending entry deleted since.

        Raises
        ------
        EventStoreError
        ValueError
            An entry is not a JSON record.
        """
        for stream in self.layout.streams():
            yield from self._read_stream(stream, batch)

    def _read_group(self, stream: str, after: str, count: int) -> list:
        def run():
            got: Any = self.writer.xreadgroup(BUILDER_GROUP, BUILDER_CONSUMER, {stream: after}, count=count)
            return got[0][1] if got else []  # this client speaks RESP2: [[key, entries]]

        return self._call("read", run)

    def _read_stream(self, stream: str, batch: int) -> Iterator[tuple[StreamOffset, dict | None]]:
        import redis

        def create():
            try:
                self.writer.xgroup_create(stream, BUILDER_GROUP, id="0", mkstream=True)
            except redis.ResponseError as e:
                if "BUSYGROUP" not in str(e):
                    raise

        self._call("read", create)
        end = parse_entry_id(_text(self._call("read", lambda: self.writer.xinfo_stream(stream))["last-generated-id"]))

        def entries(after: str, redelivered: bool) -> Iterator[tuple[StreamOffset, dict | None]]:
            while True:
                got = self._read_group(stream, after, batch)
                if not got:
                    return
                for raw_id, fields in got:
                    entry_id = _text(raw_id)
                    if parse_entry_id(entry_id) > end:
                        return  # appended during this read: the next build's, left pending
                    yield StreamOffset(stream, entry_id, redelivered), _record(stream, entry_id, fields)
                if redelivered:
                    after = _text(got[-1][0])
                if parse_entry_id(_text(got[-1][0])) >= end:
                    return

        # Id 0: the entries this consumer was given before and never acknowledged.
        yield from entries("0", True)
        groups = self._call("read", lambda: self.writer.xinfo_groups(stream))
        delivered = next(
            (parse_entry_id(_text(g["last-delivered-id"])) for g in groups if _text(g["name"]) == BUILDER_GROUP),
            (0, 0),
        )
        if end != (0, 0) and delivered < end:
            yield from entries(">", False)

    def ack(self, offsets: Iterable[StreamOffset], batch: int = 10_000) -> None:
        """Acknowledge what a published build consumed and trim each stream up to the last of it
        (exactly: what is left is precisely what no build has published).

        Raises
        ------
        EventStoreError
        """
        by_stream: dict[str, list[str]] = {}
        for off in offsets:
            by_stream.setdefault(off.stream, []).append(off.id)
        for stream, ids in by_stream.items():
            self._call("ack", lambda stream=stream, ids=ids: self._ack_stream(stream, ids, batch))

    def _ack_stream(self, stream: str, ids: list[str], batch: int) -> None:
        for start in range(0, len(ids), batch):
            self.writer.xack(stream, BUILDER_GROUP, *ids[start : start + batch])
        ms, seq = max(parse_entry_id(i) for i in ids)
        self.writer.xtrim(stream, minid=f"{ms}-{seq + 1}", approximate=False)

    # -- operations ---------------------------------------------------------------------
    def stream_stats(self) -> tuple[int, int]:
        """(entries in all streams, entries the builder's consumer group has not acknowledged)."""

        def run():
            pipe = self.reader.pipeline(transaction=False)
            for key in self.layout.streams():
                pipe.xlen(key)
            return pipe.execute()

        lengths = self._call("stats", run)
        lag = 0
        for key, length in zip(self.layout.streams(), lengths):
            try:
                groups = self._call("stats", lambda key=key: self.reader.xinfo_groups(key))
            except EventStoreError:
                groups = []  # no such stream yet
            group = next((g for g in groups if _text(g.get("name")) == BUILDER_GROUP), None)
            if group is None:
                lag += int(length)
            else:
                unread = group.get("lag")
                lag += int(group.get("pending", 0)) + (int(unread) if unread is not None else int(length))
        return int(sum(lengths)), lag

    def close(self) -> None:
        self.reader.close()
        self.writer.close()


def _continued(old: HeldPurchases, rest: tuple[Event, ...]) -> HeldPurchases:
    """The held purchases and the rest after them. The rest sorts after the held ones by (time,
    member), so the snapshot extends the held one and the overlay extends its digest by the
    new purchases; a member whose time disagrees with its score (written by hand) makes a
    plain snapshot instead, which costs a digest made anew and loses nothing."""
    try:
        return HeldPurchases(old.events + rest, extends=old)
    except ValueError:
        return HeldPurchases(old.events + rest)


def _arm(value: bytes | None) -> tuple[str, str] | None:
    if value is None:
        return None
    experiment, _, arm = value.decode().partition("\t")
    return experiment, arm


def _record(stream: str, entry_id: str, fields) -> dict | None:
    if not fields or RECORD_FIELD.encode() not in fields:
        return None  # a pending entry deleted by hand since it was delivered
    try:
        return json.loads(fields[RECORD_FIELD.encode()])
    except ValueError as e:
        raise ValueError(f"{stream} entry {entry_id} is not a JSON record: {e}") from e


def _text(v) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)
