"""Where the shared event store keeps things in Redis/Valkey: one description that the
server (which writes) and the builder (which reads the streams) both follow.

A store URL is redis-py's (``redis://[user:password@]host:port/db`` or ``rediss://`` for
TLS) with one more query parameter, ``prefix`` (default ``one2one``), so that several
shops can share one Redis. Under a prefix ``P`` with ``S`` shards:

- ``P:meta``: a hash with ``format`` (1) and ``shards`` (S), written by the first server;
  a server configured with another shard count refuses to start, and the builder reads it.
- ``P:{s<k>}:events`` for k in 0..S-1: a stream. Every accepted event and every logged
  impression is one entry with one field ``r``: the same JSON record as the local log's
  (``{"kind": "event", ...}`` or ``{"kind": "impression", ...}``). A customer's events go
  to shard ``crc32(user_id) % S``, so their order is kept and no single key is hot.
- ``P:{s<k>}:u:<user_id>:recent``: that customer's latest events other than purchases,
  newest first (a list of JSON records, trimmed to the configured count).
- ``P:{s<k>}:u:<user_id>:buys``: every purchase (``consumed`` event type) of theirs since
  the served bundle's data end, oldest first; never trimmed by count.
- ``P:{s<k>}:u:<user_id>:buys_epoch``: a hash whose field ``e`` names the buys set's epoch, a
  token renewed by every write that changes the set other than by appending after its last
  member (a purchase that sorts before one held, or purchases dropped at the horizon). Within
  one epoch the set only grows at its end, so a reader holding its first members reads only
  the rest (:meth:`ranking.realtime.redis_store.RedisEventStore.held`).
- ``P:arm:<request_id>``: ``experiment<TAB>arm`` of a Rank served in an experiment, with
  an expiry, so a purchase recorded on any pod is attributed to the arm that was served.

The ``{s<k>}`` hash tag puts a shard's stream and its customers' keys in one cluster slot.
The builder reads the streams through the consumer group ``builder``.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

FORMAT = 1
DEFAULT_PREFIX = "one2one"
BUILDER_GROUP = "builder"
# The builder reads as one fixed consumer: a build that crashed left its entries pending
# under this name, and the next build, reading as the same consumer, is given them again.
BUILDER_CONSUMER = "index_builder"
RECORD_FIELD = "r"


def is_store_url(value: str) -> bool:
    """True for a ``redis://`` or ``rediss://`` URL."""
    return str(value).startswith(("redis://", "rediss://"))


@dataclass(frozen=True)
class RedisLayout:
    """The key names under one prefix (see the module docstring)."""

    prefix: str = DEFAULT_PREFIX
    shards: int = 8

    @property
    def meta(self) -> str:
        return f"{self.prefix}:meta"

    def shard(self, user_id: str) -> int:
        return zlib.crc32(user_id.encode()) % self.shards

    def stream(self, shard: int) -> str:
        return f"{self.prefix}:{{s{shard}}}:events"

    def streams(self) -> list[str]:
        return [self.stream(k) for k in range(self.shards)]

    def recent(self, user_id: str) -> str:
        return f"{self.prefix}:{{s{self.shard(user_id)}}}:u:{user_id}:recent"

    def buys(self, user_id: str) -> str:
        return f"{self.prefix}:{{s{self.shard(user_id)}}}:u:{user_id}:buys"

    def buys_epoch(self, user_id: str) -> str:
        return f"{self.prefix}:{{s{self.shard(user_id)}}}:u:{user_id}:buys_epoch"

    def arm(self, request_id: str) -> str:
        return f"{self.prefix}:arm:{request_id}"


def split_store_url(url: str) -> tuple[str, str]:
    """(the URL redis-py is given, the key prefix): ``prefix`` is taken out of the query.

    Raises
    ------
    ValueError
        Not a redis:// or rediss:// URL, no host, or an empty prefix.
    """
    parts = urlsplit(url)
    shown = redacted(url)
    if parts.scheme not in ("redis", "rediss"):
        raise ValueError(f"event store {shown!r}: expected 'local' or a redis:// or rediss:// URL")
    if not parts.hostname:
        raise ValueError(f"event store {shown!r}: the URL names no host")
    query = parse_qsl(parts.query, keep_blank_values=True)
    prefix = DEFAULT_PREFIX
    rest = []
    for k, v in query:
        if k == "prefix":
            prefix = v
        else:
            rest.append((k, v))
    if not prefix or any(c in prefix for c in "{} \t"):
        raise ValueError(f"event store {shown!r}: prefix must be non-empty, without braces or spaces")
    return urlunsplit((parts.scheme, parts.netloc, parts.path, urlencode(rest), "")), prefix


def parse_entry_id(entry_id: str) -> tuple[int, int]:
    """A stream entry id ``<ms>-<seq>`` as a tuple that compares as Redis orders them."""
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def redacted(url: str) -> str:
    """The URL without its password, for logs and errors."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return "<unparsable URL>"
    if password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = f"{parts.username}:***@" if parts.username else ":***@"
    return urlunsplit((parts.scheme, user + netloc, parts.path, parts.query, ""))


def encode(record: dict) -> bytes:
    """One stream entry's or state list's value: compact JSON, as the local log writes it."""
    return json.dumps(record, separators=(",", ":"), ensure_ascii=False).encode()


def decode(raw: bytes | str) -> dict:
    return json.loads(raw)
