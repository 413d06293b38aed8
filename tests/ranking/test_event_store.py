"""The event store interface, run against both implementations: the local log with in-memory
state, and a real redis-server (two store objects on it stand for two pods)."""

from __future__ import annotations

import json
import time

import pytest
from redis_support import RedisServer

from ranking import Event, EventStoreError, LocalEventStore, RedisEventStore, read_all

PURCHASE = ("purchase",)


@pytest.fixture(scope="module")
def redis(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture(params=["local", "redis"])
def pods(request, tmp_path, redis):
    """Two store objects: two processes of one server (local), or two pods (redis)."""
    if request.param == "local":
        stores = [LocalEventStore(tmp_path / "events", max_users=2, max_events_per_user=3) for _ in range(2)]
    else:
        url = f"{redis.url}?prefix={tmp_path.name}"
        stores = [RedisEventStore(url, shards=4, max_events_per_user=3, read_timeout_s=1.0) for _ in range(2)]
        stores[0].check_meta()
    for s in stores:
        s.set_bundle(1000.0, PURCHASE)
    yield stores
    for s in stores:
        s.close()


def items(events: list[Event]) -> list[str]:
    return [e.item_id for e in events]


def test_what_one_writes_the_other_reads_in_time_order(pods):
    a, b = pods
    a.append([Event("u1", "i2", "click", 1002.0), Event("u1", "i1", "view", 1001.0), Event("u2", "i9", "view", 1003.0)])
    assert items(b.events("u1")) == ["i1", "i2"]
    assert items(b.events("u2")) == ["i9"] and b.events("nobody") == [] and b.events("") == []


def test_events_inside_the_bundle_are_stored_but_not_state(pods):
    a, b = pods
    a.append([Event("u1", "old", "purchase", 999.0), Event("u1", "new", "purchase", 1001.0)])
    assert items(b.events("u1")) == ["new"]
    stored = [r for _, r in a.read()] if a.kind == "local" else None
    if stored is not None:
        assert {r["item_id"] for r in stored} == {"old", "new"}


def test_purchases_survive_the_per_customer_bound_and_a_new_bundle_drops_what_it_holds(pods):
    a, b = pods
    a.append([Event("u1", f"p{k}", "purchase", 1001.0 + k) for k in range(5)])
    a.append([Event("u1", f"c{k}", "click", 1001.5 + k) for k in range(5)])
    held = items(b.events("u1"))
    assert [i for i in held if i.startswith("p")] == [f"p{k}" for k in range(5)]  # every purchase
    assert [i for i in held if i.startswith("c")] == ["c2", "c3", "c4"]  # the latest 3 others
    for s in pods:
        s.set_bundle(1003.0, PURCHASE)  # a bundle with data up to 1003 is served
    assert items(b.events("u1")) == ["c2", "p3", "c3", "p4", "c4"]
    a.append([Event("u1", "later", "view", 1010.0)])  # still the latest 3 other events
    assert items(b.events("u1")) == ["p3", "c3", "p4", "c4", "later"]


def test_an_impression_on_one_pod_attributes_an_event_on_the_other(redis, tmp_path):
    url = f"{redis.url}?prefix={tmp_path.name}"
    a, b = (RedisEventStore(url, shards=4, read_timeout_s=1.0) for _ in range(2))
    a.impression({"kind": "impression", "request_id": "r1", "user_id": "u1", "experiment": "x", "arm": "B"})
    arms = b.append([Event("u1", "i1", "purchase", 1005.0, request_id="r1"), Event("u1", "i2", "click", 1005.0)])
    assert arms == [("x", "B"), None]
    a.close()
    b.close()


def test_local_attribution_comes_from_the_other_processes_log(tmp_path):
    a, b = (LocalEventStore(tmp_path / "events") for _ in range(2))
    b.replay()
    a.impression({"kind": "impression", "request_id": "r1", "user_id": "u1", "experiment": "x", "arm": "B"})
    b.catch_up()
    assert b.append([Event("u1", "i1", "purchase", 1005.0, request_id="r1")]) == [("x", "B")]
    a.close()
    b.close()


def test_redis_down_fails_reads_and_writes_and_backs_off(tmp_path):
    server = RedisServer(tmp_path / "redis").start()
    seen: list[tuple[str, str | None]] = []
    store = RedisEventStore(
        server.url, shards=2, read_timeout_s=0.2, retry_seconds=0.5, observe=lambda op, s, r: seen.append((op, r))
    )
    store.check_meta()
    store.append([Event("u1", "i1", "click", time.time())])
    server.stop()
    with pytest.raises(EventStoreError) as err:
        store.events("u1")
    assert err.value.reason == "connection"
    with pytest.raises(EventStoreError) as err:
        store.events("u1")  # within retry_seconds: not even tried
    assert err.value.reason == "skipped"
    with pytest.raises(EventStoreError):
        store.append([Event("u1", "i2", "click", time.time())])
    assert ("rank_read", "connection") in seen and ("record", "connection") in seen
    server.start()
    time.sleep(0.6)
    assert items(store.events("u1")) == ["i1"]  # back by itself; the refused write never landed
    store.close()
    server.stop()


def test_local_store_reads_its_log_whole(tmp_path):
    store = LocalEventStore(tmp_path / "events")
    store.append([Event("u1", "i1", "view", 5.0)])
    store.impression({"kind": "impression", "request_id": "r", "user_id": "u1", "experiment": "", "arm": ""})
    assert [r["kind"] for _, r in store.read()] == ["event", "impression"]
    assert [r["kind"] for _, r in read_all(tmp_path / "events")] == ["event", "impression"]
    store.close()


def test_a_full_redis_refuses_the_whole_batch(redis, tmp_path):
    """Out of memory under noeviction: the script is refused before its first write, so a
    refused batch leaves nothing behind (no stream entry, no state) for a retry to duplicate."""
    store = RedisEventStore(f"{redis.url}?prefix={tmp_path.name}", shards=2, read_timeout_s=1.0)
    store.check_meta()
    client = redis.client()
    client.config_set("maxmemory", 1)
    try:
        with pytest.raises(EventStoreError, match="used memory > 'maxmemory'"):
            store.append([Event(f"u{k}", "i1", "purchase", 2000.0) for k in range(50)])
    finally:
        client.config_set("maxmemory", 0)
    assert sum(client.xlen(key) for key in store.layout.streams()) == 0
    assert store.events("u1") == []
    store.append([Event("u1", "i1", "purchase", 2000.0)])
    assert items(store.events("u1")) == ["i1"]
    store.close()


def test_redis_read_and_ack_through_the_builders_group(redis, tmp_path):
    """The log side of the interface: what a build reads stays pending until it acknowledges,
    a second read (a crashed build's successor) gets it again, and ack trims it."""
    url = f"{redis.url}?prefix={tmp_path.name}"
    pod = RedisEventStore(url, shards=2, read_timeout_s=1.0)
    pod.check_meta()
    pod.append([Event(f"u{k}", "i1", "view", 2000.0 + k) for k in range(6)])
    builder = RedisEventStore.existing(url)
    assert builder.layout.shards == 2
    first = list(builder.read())
    assert sorted(r["user_id"] for _, r in first) == [f"u{k}" for k in range(6)]
    assert not any(off.redelivered for off, _ in first)
    again = list(builder.read())  # never acknowledged: delivered again, marked so
    assert [off.id for off, _ in again] == [off.id for off, _ in first] and all(off.redelivered for off, _ in again)
    pod.append([Event("late", "i1", "view", 3000.0)])
    builder.ack(off for off, _ in again)
    assert [r["user_id"] for _, r in builder.read()] == ["late"]  # only what came after
    client = redis.client()
    assert sum(client.xlen(key) for key in builder.layout.streams()) == 1  # trimmed up to what was acknowledged
    with pytest.raises(ValueError, match="no .*:meta hash"):
        RedisEventStore.existing(f"{redis.url}?prefix=nobody-{tmp_path.name}")
    pod.close()
    builder.close()


# -- a heavy buyer's purchases kept between Ranks (Redis) -------------------------------------


@pytest.fixture
def shop(redis, tmp_path):
    """A writing pod, and a reading pod that keeps customers with 5 or more purchases, 60 at most."""
    url = f"{redis.url}?prefix={tmp_path.name}"
    writer = RedisEventStore(url, shards=2, read_timeout_s=1.0)
    reader = RedisEventStore(url, shards=2, read_timeout_s=1.0, held_purchases=60, held_min_purchases=5)
    writer.check_meta()
    for s in (writer, reader):
        s.set_bundle(1000.0, PURCHASE)
    opened = [writer, reader]

    def fresh() -> RedisEventStore:
        """A pod that holds nothing: what reading everything gives."""
        pod = RedisEventStore(url, shards=2, read_timeout_s=1.0)
        pod.set_bundle(reader.horizon, PURCHASE)
        opened.append(pod)
        return pod

    yield writer, reader, fresh
    for s in opened:
        s.close()


def bought(n: int, start: float, user: str = "u1", tag: str = "p") -> list[Event]:
    return [Event(user, f"{tag}{k}", "purchase", start + k) for k in range(n)]


def same_events(got, fresh_store: RedisEventStore, user: str = "u1") -> None:
    want = fresh_store.held(user)
    assert [e.to_record() for e in got.purchases.events] == [e.to_record() for e in want.purchases.events]
    assert [e.to_record() for e in got.recent] == [e.to_record() for e in want.recent]


def test_a_heavy_buyer_is_read_whole_once_then_only_what_came_since(shop):
    writer, reader, fresh = shop
    writer.append(bought(20, 1001.0) + [Event("u1", "c1", "click", 1002.5)])
    first = reader.held("u1")
    assert len(first.purchases) == 20 and [e.item_id for e in first.recent] == ["c1"]
    again = reader.held("u1")
    assert again.purchases is first.purchases  # nothing new: the very snapshot, its digest with it
    # In order: a basket at one later time, and a click.
    writer.append(bought(3, 1100.0, tag="basket") + [Event("u1", "c2", "click", 1100.0)])
    writer.append([Event("u1", f"same{k}", "purchase", 1200.0) for k in range(3)])
    later = reader.held("u1")
    assert later.purchases.events[:20] == first.purchases.events
    assert all(a is b for a, b in zip(later.purchases.events, first.purchases.events))  # read only the rest
    assert later.purchases.extends is first.purchases  # whose digest the overlay extends
    assert [e.item_id for e in later.purchases.events[20:]] == [
        "basket0",
        "basket1",
        "basket2",
        "same0",
        "same1",
        "same2",
    ]
    same_events(later, fresh())
    assert reader.events("u1") == fresh().events("u1")


def test_a_purchase_before_a_held_one_or_a_new_horizon_reads_them_whole(shop):
    writer, reader, fresh = shop
    writer.append(bought(10, 1001.0))
    held = reader.held("u1").purchases
    writer.append([Event("u1", "late-arrival", "purchase", 1004.5)])  # sorts among the held ones
    got = reader.held("u1")
    assert got.purchases.events[0] is not held.events[0] and got.purchases.extends is None
    assert [e.item_id for e in got.purchases.events][3:5] == ["p3", "late-arrival"]
    same_events(got, fresh())
    held = got.purchases
    # The same time as the last held purchase, from another pod: its member may sort first.
    other = fresh()
    other.append([Event("u1", "tie", "purchase", 1010.0)])
    same_events(reader.held("u1"), fresh())
    # A new bundle's horizon: what it holds is gone, read whole.
    for s in (writer, reader):
        s.set_bundle(1005.0, PURCHASE)
    got = reader.held("u1")
    assert sorted(e.item_id for e in got.purchases.events) == ["p5", "p6", "p7", "p8", "p9", "tie"]
    same_events(got, fresh())
    # A writer on the newer horizon drops purchases at the older one's: a reader still on the
    # older horizon (a pod mid-rollout) must not keep them as held.
    reader.set_bundle(1000.0, PURCHASE)
    assert len(reader.held("u1").purchases) == 12  # nothing dropped yet: set_bundle writes nothing
    writer.set_bundle(1007.0, PURCHASE)
    writer.append(bought(10, 1300.0, tag="next"))  # more than it drops: the set is no smaller
    got = reader.held("u1")
    assert sorted(e.item_id for e in got.purchases.events) == sorted(
        ["p7", "p8", "p9", "tie"] + [f"next{k}" for k in range(10)]
    )
    same_events(got, fresh())


def test_purchases_expired_and_written_anew_are_not_taken_for_the_held_ones(redis, tmp_path):
    url = f"{redis.url}?prefix={tmp_path.name}"
    writer = RedisEventStore(url, shards=2, read_timeout_s=1.0, key_ttl_seconds=0.3)
    reader = RedisEventStore(url, shards=2, read_timeout_s=1.0, held_min_purchases=5)
    writer.check_meta()
    writer.append(bought(12, 1001.0))
    assert len(reader.held("u1").purchases) == 12
    time.sleep(0.5)
    assert len(reader.held("u1").purchases) == 0
    writer.append(bought(12, 1001.0))  # cached again below
    assert len(reader.held("u1").purchases) == 12
    time.sleep(0.5)
    writer.append(bought(2, 2000.0, tag="new"))  # the set starts anew: a new epoch
    assert [e.item_id for e in reader.held("u1").purchases.events] == ["new0", "new1"]
    # The set gone while its epoch stays (they expire in the same millisecond, or an operator
    # deleted it), then written anew with more purchases than were held: still a new epoch.
    writer.append(bought(12, 3000.0, tag="more"))
    assert len(reader.held("u1").purchases) == 14
    redis.client().delete(writer.layout.buys("u1"))
    assert len(reader.held("u1").purchases) == 0  # not the 14 held
    writer.append(bought(14, 3500.0, tag="again"))
    assert len(reader.held("u1").purchases) == 14
    redis.client().delete(writer.layout.buys("u1"))
    writer.append(bought(20, 4000.0, tag="anew"))
    assert [e.item_id for e in reader.held("u1").purchases.events] == [f"anew{k}" for k in range(20)]
    writer.close()
    reader.close()


def test_the_held_purchases_are_bounded_and_few_are_never_kept(shop, redis):
    writer, reader, _ = shop
    for user in ("a", "b", "c"):
        writer.append(bought(25, 1001.0, user=user))
    writer.append(bought(4, 1001.0, user="light"))
    a = reader.held("a").purchases
    assert reader.held("a").purchases is a
    b = reader.held("b").purchases
    reader.held("a")  # a is ranked again: b is now the least recent
    reader.held("c")  # 75 purchases > 60: b is let go
    assert list(reader._held) == ["a", "c"] and reader._held_count == 50
    assert reader.held("a").purchases is a
    assert reader.held("b").purchases is not b  # read whole again; c, the least recent, goes
    assert list(reader._held) == ["a", "b"] and reader._held_count == 50
    light = reader.held("light").purchases
    assert len(light) == 4 and reader.held("light").purchases is not light  # under 5: never kept
    assert "light" not in reader._held
    with pytest.raises(ValueError, match="held_purchases must be >= 0 and held_min_purchases >= 1, got -1 and 64"):
        RedisEventStore(redis.url, held_purchases=-1)


@pytest.mark.parametrize("old_server_does", ["the insert", "the drop"])
def test_one_purchase_dropped_and_one_inserted_before_the_end_renew_the_epoch(shop, redis, old_server_does):
    """One purchase dropped at the front (a writer on a newer bundle) and one inserted among the
    held ones (out of order): the last held purchase stays at its rank, so only the epoch tells
    the reader the set changed. One of the two is done as a server that keeps no epoch would
    (during a rolling upgrade); the other, by this one, must renew the epoch."""
    writer, reader, fresh = shop
    writer.append(bought(10, 1001.0))
    assert len(reader.held("u1").purchases) == 10
    client, buys = redis.client(), writer.layout.buys("u1")
    if old_server_does == "the insert":
        member = b"old-server.1|" + json.dumps(Event("u1", "out-of-order", "purchase", 1005.5).to_record()).encode()
        client.zadd(buys, {member: 1005.5})
        writer.set_bundle(1001.0, PURCHASE)
        writer.append([Event("u1", "click", "view", 1020.0)])  # drops p0 from the purchases
    else:
        client.zremrangebyscore(buys, "-inf", 1001.0)
        writer.append([Event("u1", "out-of-order", "purchase", 1005.5)])
    got = reader.held("u1")
    assert [e.item_id for e in got.purchases.events] == ["p1", "p2", "p3", "p4", "out-of-order"] + [
        f"p{k}" for k in range(5, 10)
    ]
    same_events(got, fresh())


def test_a_member_whose_time_disagrees_with_its_score_is_kept_without_extending(shop, redis):
    """Written by hand: sorted last by its score, its own time earlier than the held purchases'.
    The snapshot cannot continue the held one, so it is made plain, with every purchase."""
    writer, reader, _ = shop
    writer.append(bought(10, 1001.0))
    held = reader.held("u1").purchases
    member = b"by-hand.1|" + json.dumps(Event("u1", "odd", "purchase", 1002.5).to_record()).encode()
    redis.client().zadd(writer.layout.buys("u1"), {member: 1500.0})
    got = reader.held("u1").purchases
    assert got.extends is None and got.events[:10] == held.events and got.events[-1].item_id == "odd"


def test_replies_are_parsed_by_hiredis(shop):
    # A dependency (pyproject): without it redis-py parses in Python, and a heavy buyer's
    # first read of thousands of purchases takes about 30% longer (bench/README).
    _, reader, _ = shop
    reader.held("u1")
    conn = reader.reader.connection_pool.get_connection()
    try:
        assert type(conn._parser).__name__ == "_HiredisParser"
    finally:
        reader.reader.connection_pool.release(conn)
