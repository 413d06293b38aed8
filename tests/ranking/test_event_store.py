"""The event store interface, run against both implementations: the local log with in-memory
state, and a real redis-server (two store objects on it stand for two pods)."""

from __future__ import annotations

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
