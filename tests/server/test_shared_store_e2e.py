"""Two pods sharing one real redis-server: an event recorded on one pod changes the next Rank
on the other; kill -9 of a pod or of redis-server after OK loses nothing; Redis stopped
under load: Rank still answers (degraded), RecordEvents is UNAVAILABLE, both recover."""

from __future__ import annotations

import json
import threading
import time

import grpc
import numpy as np
import pytest
from realtime_support import Server, ev, ids, sample
from redis_support import RedisServer

from one2one.v1 import ranking_pb2 as pb
from ranking import MANIFEST, RECORD_FIELD, RedisLayout, resolve_current

pytestmark = pytest.mark.slow


def store_settings(redis: RedisServer, prefix: str, extra: str = "") -> str:
    return f'event_store = "{redis.url}?prefix={prefix}"\nevent_store_retry_seconds = 0.2\n{extra}'


@pytest.fixture(scope="module")
def redis(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def pods(artifacts, redis, tmp_path_factory):
    """Two servers (one worker each, as two pods) on one store, each with its own local log dir."""
    root = tmp_path_factory.mktemp("pods")
    env = {"ONE2ONE_WORKERS": "1"}
    a = Server(artifacts, root / "a", settings=store_settings(redis, "shop"), env=env)
    b = Server(artifacts, root / "b", settings=store_settings(redis, "shop"), env=env)
    yield a, b
    a.stop()
    b.stop()


@pytest.fixture(scope="module")
def cat_of(shop):
    return {f"i{i}": int(c) for i, c in enumerate(shop.item_category)}


def stream_records(redis: RedisServer, prefix: str) -> list[dict]:
    layout = RedisLayout(prefix, 8)
    c = redis.client()
    out = []
    for key in layout.streams():
        out += [json.loads(fields[RECORD_FIELD.encode()]) for _, fields in c.xrange(key)]
    return out


def test_a_purchase_on_one_pod_is_gone_from_the_next_rank_on_the_other(pods, redis):
    a, b = pods
    before = b.stub.Rank(pb.RankRequest(user_id="u9", num_results=20), timeout=10)
    bought = before.items[0].item_id
    resp = a.stub.RecordEvents(pb.RecordEventsRequest(events=[ev("u9", bought, "purchase", value=3.0)]), timeout=10)
    assert resp.accepted_count == 1 and resp.stale_count == 0
    after = b.stub.Rank(pb.RankRequest(user_id="u9", num_results=20), timeout=10)
    assert bought not in ids(after) and after.strategy == pb.ONE_TO_ONE
    assert "realtime" not in after.degraded_stages
    assert ("u9", bought, "purchase") in [
        (r["user_id"], r["item_id"], r["event_type"]) for r in stream_records(redis, "shop") if r["kind"] == "event"
    ]
    # Nothing went to the pods' local logs: the shared store is the record.
    assert not list((a.workdir / "events").rglob("*.log")) or all(
        p.stat().st_size == 0 for p in (a.workdir / "events").rglob("*.log")
    )


def test_a_click_burst_on_one_pod_moves_its_category_up_on_the_other(pods, shop, cat_of):
    a, b = pods
    user, other = "u4", (int(shop.favourite[4]) + 2) % 5

    def positions(resp):
        return [p for p, it in enumerate(resp.items) if cat_of[it.item_id] == other]

    before = b.stub.Rank(pb.RankRequest(user_id=user, num_results=50), timeout=10)
    clicked = [f"i{i}" for i in np.flatnonzero(shop.item_category == other)[:6]]
    burst = [ev(user, item, "click") for item in clicked for _ in range(2)]
    assert a.stub.RecordEvents(pb.RecordEventsRequest(events=burst), timeout=10).accepted_count == len(burst)
    after = b.stub.Rank(pb.RankRequest(user_id=user, num_results=50, explain=True), timeout=10)
    pb_, pa = positions(before), positions(after)
    assert len(pa) >= len(pb_) + 4, (pb_, pa)
    assert any(it.contributions.get("realtime_interest", 0) > 0 for it in after.items)


def test_a_purchase_on_pod_b_is_attributed_to_the_arm_pod_a_served(pods):
    a, b = pods
    served = a.stub.Rank(pb.RankRequest(user_id="u40", num_results=5, context=pb.Context(channel="web")), timeout=10)
    assert served.experiment == "ladder"
    arm = {"experiment": "ladder", "arm": served.arm}
    before = sample(b.metrics(), "one2one_experiment_revenue_total", arm)
    b.stub.RecordEvents(
        pb.RecordEventsRequest(
            events=[ev("u40", served.items[0].item_id, "purchase", value=7.5, request_id=served.request_id)]
        ),
        timeout=10,
    )
    text = b.metrics()
    assert sample(text, "one2one_experiment_revenue_total", arm) == before + 7.5
    assert sample(text, "one2one_experiment_events_total", {**arm, "event_type": "purchase"}) >= 1


def test_stale_events_are_stored_but_not_applied(pods, redis, artifacts):
    a, b = pods
    end = json.loads((resolve_current(artifacts) / MANIFEST).read_text())["data_window"]["end_unix"]
    top = b.stub.Rank(pb.RankRequest(user_id="u62", num_results=20), timeout=10)
    bought, covered = top.items[0].item_id, top.items[1].item_id
    resp = a.stub.RecordEvents(
        pb.RecordEventsRequest(
            events=[
                ev("u62", bought, "purchase", value=1.0, when=end + 60),
                ev("u62", covered, "purchase", value=1.0, when=end - 60),
            ]
        ),
        timeout=10,
    )
    assert resp.accepted_count == 2 and resp.stale_count == 1
    after = ids(b.stub.Rank(pb.RankRequest(user_id="u62", num_results=20), timeout=10))
    assert bought not in after and covered in after
    logged = {r["item_id"] for r in stream_records(redis, "shop") if r.get("user_id") == "u62"}
    assert logged == {bought, covered}


def test_the_store_reports_itself_durable(pods):
    pods[0].stub.Rank(pb.RankRequest(user_id="u3", num_results=5), timeout=10)
    text = pods[0].metrics()
    assert sample(text, "one2one_event_store_durable", {}) == 1
    assert sample(text, "one2one_event_store_info", {"store": "redis"}) == 1
    assert sample(text, "one2one_event_store_round_trip_seconds_count", {"op": "rank_read"}) > 0


def test_kill_9_of_a_pod_and_of_redis_after_ok_loses_nothing(artifacts, tmp_path):
    redis = RedisServer(tmp_path / "redis").start()
    try:
        a = Server(artifacts, tmp_path / "a", settings=store_settings(redis, "k9"), env={"ONE2ONE_WORKERS": "1"})
        top = a.stub.Rank(pb.RankRequest(user_id="u50", num_results=20), timeout=10)
        bought = [it.item_id for it in top.items[:3]]
        for item in bought:  # one RPC each: every OK is a promise
            resp = a.stub.RecordEvents(pb.RecordEventsRequest(events=[ev("u50", item, "purchase", 2.0)]), timeout=10)
            assert resp.accepted_count == 1
        a.kill9()
        redis.kill()
        redis.start()  # same port and directory: reloads its AOF
        b = Server(artifacts, tmp_path / "b", settings=store_settings(redis, "k9"), env={"ONE2ONE_WORKERS": "1"})
        try:
            after = ids(b.stub.Rank(pb.RankRequest(user_id="u50", num_results=20), timeout=10))
            assert not set(bought) & set(after)
            logged = [(r["user_id"], r["item_id"]) for r in stream_records(redis, "k9") if r["kind"] == "event"]
            assert sorted(logged) == sorted(("u50", i) for i in bought)
        finally:
            b.stop()
    finally:
        redis.stop()


def test_redis_down_under_load_rank_degrades_record_events_unavailable_and_both_recover(artifacts, tmp_path):
    redis = RedisServer(tmp_path / "redis").start()
    pod = Server(artifacts, tmp_path / "pod", settings=store_settings(redis, "down"), env={"ONE2ONE_WORKERS": "1"})
    failures: list[str] = []
    ranks = {"ok": 0, "degraded": 0}
    stop = threading.Event()

    def load():
        while not stop.is_set():
            try:
                r = pod.stub.Rank(pb.RankRequest(user_id="u7", num_results=10), timeout=5)
            except grpc.RpcError as exc:
                failures.append(exc.code().name)
                continue
            ranks["degraded" if "realtime" in r.degraded_stages else "ok"] += 1

    threads = [threading.Thread(target=load) for _ in range(2)]
    try:
        for t in threads:
            t.start()
        time.sleep(0.5)
        redis.stop()
        time.sleep(1.0)
        with pytest.raises(grpc.RpcError) as err:
            pod.stub.RecordEvents(pb.RecordEventsRequest(events=[ev("u7", "i1", "purchase", 1.0)]), timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        degraded_while_down = ranks["degraded"]
        assert degraded_while_down > 0
        text = pod.metrics()
        assert sample(text, "one2one_event_store_available", {}) == 0
        assert sample(text, "one2one_rank_degraded_total", {"stage": "realtime"}) > 0
        redis.start()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                resp = pod.stub.RecordEvents(
                    pb.RecordEventsRequest(events=[ev("u7", "i1", "purchase", 1.0)]), timeout=10
                )
                break
            except grpc.RpcError:
                time.sleep(0.2)
        assert resp.accepted_count == 1
        ok_before = ranks["ok"]
        time.sleep(1.0)
        assert ranks["ok"] > ok_before  # Ranks read real-time state again
        assert "i1" not in ids(pod.stub.Rank(pb.RankRequest(user_id="u7", num_results=50), timeout=10))
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=10)
        pod.stop()
        redis.stop()
    assert failures == [], failures[:5]
    # The refused purchase was never acknowledged, and never stored: only the accepted one is.
    redis.start()
    try:
        assert [r["item_id"] for r in stream_records(redis, "down") if r["kind"] == "event"] == ["i1"]
    finally:
        redis.stop()


def test_a_store_that_can_lose_acknowledged_events_is_reported(artifacts, tmp_path):
    redis = RedisServer(tmp_path / "redis", appendonly="no").start()
    try:
        pod = Server(artifacts, tmp_path / "pod", settings=store_settings(redis, "lossy"), env={"ONE2ONE_WORKERS": "1"})
        try:
            assert sample(pod.metrics(), "one2one_event_store_durable", {}) == 0
        finally:
            pod.stop()
        log = "".join(p.read_text() for p in (tmp_path / "pod").rglob("server.log"))
        assert "EVENT STORE NOT DURABLE" in log and "appendonly is 'no'" in log
    finally:
        redis.stop()


def test_a_different_shard_count_refuses_to_start(artifacts, redis, tmp_path):
    redis.client().hset("shards8:meta", mapping={"format": 1, "shards": 8})
    with pytest.raises(RuntimeError, match="server exited"):
        Server(
            artifacts,
            tmp_path / "pod",
            settings=store_settings(redis, "shards8", "event_store_shards = 4\n"),
            env={"ONE2ONE_WORKERS": "1"},
        )
    log = "".join(p.read_text() for p in (tmp_path / "pod").rglob("server.log"))
    assert "event_store_shards must not change" in log


def test_a_slow_redis_costs_a_rank_its_timeout_not_its_budget(pods, redis):
    """Redis stalls (CLIENT PAUSE): the Rank gives up after event_store_timeout_ms and answers
    without real-time state, well inside its budget; once Redis answers, so does the state."""
    a, _ = pods
    a.stub.Rank(pb.RankRequest(user_id="u8", num_results=5), timeout=10)
    # A separate client: the pause holds every other client's commands for 1.5 s.
    redis.client().execute_command("CLIENT", "PAUSE", 1500, "ALL")
    t0 = time.perf_counter()
    slow = a.stub.Rank(pb.RankRequest(user_id="u8", num_results=5, budget_ms=200), timeout=10)
    took = time.perf_counter() - t0
    assert "realtime" in slow.degraded_stages and len(slow.items) == 5
    assert took < 0.2, took
    text = a.metrics()
    assert sample(text, "one2one_event_store_errors_total", {"op": "rank_read", "reason": "timeout"}) >= 1
    time.sleep(1.8)  # the pause is over and event_store_retry_seconds (0.2 s) has passed
    again = a.stub.Rank(pb.RankRequest(user_id="u8", num_results=5), timeout=10)
    assert "realtime" not in again.degraded_stages


def _series(text: str, name: str) -> dict[str, float]:
    """label text (or "") -> value of every sample of ``name`` in an exposition."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            key, value = line.rsplit(" ", 1)
            out[key[len(name) :]] = float(value)
    return out


def test_a_heavy_buyers_next_rank_on_the_other_pod_reads_only_the_new_purchase(pods, shop):
    a, b = pods
    user = "u12"
    rng = np.random.default_rng(12)
    items = [f"i{int(i)}" for i in rng.choice(len(shop.item_category), 80)]
    for half in (items[:40], items[40:]):
        resp = a.stub.RecordEvents(pb.RecordEventsRequest(events=[ev(user, i, "purchase") for i in half]), timeout=10)
        assert resp.accepted_count == 40

    def reads() -> tuple[dict[str, float], float]:
        text = b.metrics()
        return _series(text, "one2one_event_store_purchases_read_total"), _series(
            text, "one2one_event_store_held_purchases"
        )[""]

    r0, _ = reads()
    first = b.stub.Rank(pb.RankRequest(user_id=user, num_results=20), timeout=10)
    r1, held = reads()
    assert r1['{read="whole"}'] - r0['{read="whole"}'] == 80 and held >= 80
    again = b.stub.Rank(pb.RankRequest(user_id=user, num_results=20), timeout=10)
    r2, _ = reads()
    assert r2 == r1 and ids(again) == ids(first)  # nothing new: nothing read, the same answer
    bought = first.items[0].item_id
    a.stub.RecordEvents(pb.RecordEventsRequest(events=[ev(user, bought, "purchase")]), timeout=10)
    after = b.stub.Rank(pb.RankRequest(user_id=user, num_results=20), timeout=10)
    r3, held = reads()
    assert r3['{read="rest"}'] - r2['{read="rest"}'] == 1 and r3['{read="whole"}'] == r2['{read="whole"}']
    assert held >= 81 and "realtime" not in after.degraded_stages
    assert bought not in ids(after)  # the new purchase reached the Rank
