"""End to end over a real server process: RecordEvents changes the next Rank, nothing accepted
is lost across kill -9, invalid events are rejected with reasons, rules and arms show up."""

from __future__ import annotations

import json
import time

import grpc
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families
from realtime_support import Server, bad_request_fields, category_share, ev, ids, sample

from one2one.v1 import ranking_pb2 as pb
from one2one.v1 import ranking_pb2_grpc
from ranking import read_all
from server.demo import start_server


@pytest.fixture(scope="module")
def server(artifacts, tmp_path_factory):
    s = Server(artifacts, tmp_path_factory.mktemp("rt"))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def cat_of(shop):
    return {f"i{i}": int(c) for i, c in enumerate(shop.item_category)}


def test_purchase_disappears_from_the_next_rank(server):
    before = server.stub.Rank(pb.RankRequest(user_id="u9", num_results=20), timeout=10)
    bought = before.items[0].item_id
    resp = server.stub.RecordEvents(
        pb.RecordEventsRequest(events=[ev("u9", bought, "purchase", value=19.99, request_id=before.request_id)]),
        timeout=10,
    )
    assert resp.accepted_count == 1 and not resp.rejections
    after = server.stub.Rank(pb.RankRequest(user_id="u9", num_results=20), timeout=10)
    assert bought not in ids(after)
    assert after.strategy == pb.ONE_TO_ONE


def test_ids_are_trimmed_alike_in_rank_and_record_events(server):
    # RecordEvents stores " u77 " as u77 (as the builder reads it): Rank must find those events.
    before = server.stub.Rank(pb.RankRequest(user_id="u77", num_results=20), timeout=10)
    bought = before.items[0].item_id
    resp = server.stub.RecordEvents(
        pb.RecordEventsRequest(events=[ev(" u77 ", f" {bought}\t", "purchase")]), timeout=10
    )
    assert resp.accepted_count == 1 and not resp.rejections
    after = server.stub.Rank(pb.RankRequest(user_id="  u77", num_results=20), timeout=10)
    assert after.strategy == pb.ONE_TO_ONE and bought not in ids(after)
    # Item ids of a request too: an excluded " i3 " is i3.
    top = ids(server.stub.Rank(pb.RankRequest(user_id="u78", num_results=5), timeout=10))
    again = server.stub.Rank(pb.RankRequest(user_id="u78", num_results=5, exclude_item_ids=[f" {top[0]} "]), timeout=10)
    assert top[0] not in ids(again)


def test_an_id_with_a_nul_is_refused_not_taken_for_another(server):
    # Fixed-width id arrays drop trailing NULs: "u9\0" would be served as u9.
    with pytest.raises(grpc.RpcError) as err:
        server.stub.Rank(pb.RankRequest(user_id="u9\x00"), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "NUL" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        server.stub.Rank(pb.RankRequest(user_id="u9", exclude_item_ids=["i1", "i2\x00"]), timeout=10)
    assert "exclude_item_ids[1]" in err.value.details()
    resp = server.stub.RecordEvents(
        pb.RecordEventsRequest(
            events=[ev("u9\x00", "i1", "click"), ev("u9", "i1\x00", "click"), ev("u9", "i1", "click")]
        ),
        timeout=10,
    )
    assert resp.accepted_count == 1
    assert [(r.index, r.field) for r in resp.rejections] == [(0, "user_id"), (1, "item_id")]


def test_a_value_the_builder_would_refuse_is_refused_at_once(server):
    # The server's log is a build's input: RecordEvents takes no value the builder's reader refuses.
    resp = server.stub.RecordEvents(
        pb.RecordEventsRequest(events=[ev("u9", "i1", "rating", value=1e13), ev("u9", "i1", "rating", value=1e12)]),
        timeout=10,
    )
    assert resp.accepted_count == 1
    assert [(r.index, r.field) for r in resp.rejections] == [(0, "value")]


def test_every_bad_field_is_named_at_once(server):
    from google.protobuf.timestamp_pb2 import Timestamp

    request = pb.RankRequest(
        user_id="x" * 300,
        num_results=-1,
        budget_ms=-5,
        filter=pb.Filter(min_price=-1, include_categories=["no-such-category"]),
        context=pb.Context(event_time=Timestamp(seconds=0, nanos=-1)),
        variant="nonsense",
    )
    with pytest.raises(grpc.RpcError) as err:
        server.stub.Rank(request, timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    named = set(bad_request_fields(err.value))
    assert named == {
        "user_id",
        "num_results",
        "budget_ms",
        "filter.min_price",
        "filter.include_categories",
        "context.event_time",
        "variant",
    }
    # Without the Timestamp's problem the variant is found later, with the same company.
    request.context.ClearField("event_time")
    with pytest.raises(grpc.RpcError) as err:
        server.stub.Rank(request, timeout=10)
    assert set(bad_request_fields(err.value)) == named - {"context.event_time"}


def test_click_burst_moves_that_category_up(server, shop, cat_of):
    user = "u4"
    fav = int(shop.favourite[4])
    other = (fav + 2) % 5

    def positions(resp):
        return [p for p, it in enumerate(resp.items) if cat_of[it.item_id] == other]

    before = server.stub.Rank(pb.RankRequest(user_id=user, num_results=50), timeout=10)
    clicked = [f"i{i}" for i in np.flatnonzero(shop.item_category == other)[:6]]
    burst = [ev(user, item, "click") for item in clicked for _ in range(2)]
    assert server.stub.RecordEvents(pb.RecordEventsRequest(events=burst), timeout=10).accepted_count == len(burst)
    after = server.stub.Rank(pb.RankRequest(user_id=user, num_results=50, explain=True), timeout=10)
    assert after.strategy == pb.ONE_TO_ONE
    # The learned reranker weighs 30 past events in the favourite category heavily, so 12
    # clicks move the other category up the list rather than over the top ten.
    pb_, pa = positions(before), positions(after)
    assert len(pa) >= len(pb_) + 4, (pb_, pa)
    assert min(pa) <= (min(pb_) if pb_ else 50) - 10, (pb_, pa)
    assert any(it.contributions.get("realtime_interest", 0) > 0 for it in after.items)
    # Another user's ranking is untouched by this user's clicks.
    again = server.stub.Rank(pb.RankRequest(user_id="u5", num_results=10), timeout=10)
    assert ids(again) == ids(server.stub.Rank(pb.RankRequest(user_id="u5", num_results=10), timeout=10))


def test_anonymous_session_gets_a_vector_from_its_own_events(server, shop, cat_of):
    anon = "session-7f3a"
    cold = server.stub.Rank(pb.RankRequest(user_id=anon, num_results=10), timeout=10)
    assert cold.strategy == pb.POPULAR
    items = [f"i{i}" for i in np.flatnonzero(shop.item_category == 3)[:5]]
    server.stub.RecordEvents(pb.RecordEventsRequest(events=[ev(anon, i, "click") for i in items]), timeout=10)
    warm = server.stub.Rank(pb.RankRequest(user_id=anon, num_results=10), timeout=10)
    assert warm.strategy == pb.ONE_TO_ONE and warm.fallback_reason == ""
    assert category_share(warm, cat_of, 3) >= 0.7


def test_skip_pushes_the_item_and_its_neighbours_down(server):
    before = server.stub.Rank(pb.RankRequest(user_id="u12", num_results=10), timeout=10)
    skipped = before.items[0].item_id
    server.stub.RecordEvents(pb.RecordEventsRequest(events=[ev("u12", skipped, "skip")]), timeout=10)
    after = server.stub.Rank(pb.RankRequest(user_id="u12", num_results=10, explain=True), timeout=10)
    assert skipped not in ids(after)[:3]
    assert any(it.contributions.get("realtime_skip", 0) < 0 for it in after.items)


def test_invalid_events_are_rejected_with_reasons_and_valid_ones_kept(server):
    now = time.time()
    batch = [
        ev("u20", "i5", "view"),  # 0 ok
        ev("", "i5", "click"),  # 1 no user
        ev("u20", "i6", "teleport"),  # 2 unknown type
        ev("u20", "i7", "purchase", value=-3),  # 3 negative value
        ev("u20", "i8", "click", when=now + 86_400),  # 4 in the future
        ev("u20", "i9", "PURCHASE", value=5.0),  # 5 ok (case-insensitive)
        ev("u20", "", "click"),  # 6 no item
    ]
    resp = server.stub.RecordEvents(pb.RecordEventsRequest(events=batch), timeout=10)
    assert resp.accepted_count == 2
    got = {r.index: (r.field, r.reason) for r in resp.rejections}
    assert set(got) == {1, 2, 3, 4, 6}
    assert got[1][0] == "user_id" and got[6][0] == "item_id"
    assert got[2][0] == "event_type" and "teleport" in got[2][1]
    assert got[3][0] == "value" and "-3" in got[3][1]
    assert got[4][0] == "event_time" and "ahead" in got[4][1]
    after = server.stub.Rank(pb.RankRequest(user_id="u20", num_results=50), timeout=10)
    assert "i9" not in ids(after)  # the valid purchase of the same batch was applied
    logged = [rec for _, rec in read_all(server.workdir / "events") if rec.get("user_id") == "u20"]
    assert [(r["item_id"], r["event_type"]) for r in logged] == [("i5", "view"), ("i9", "purchase")]


def test_empty_or_oversized_batch_is_invalid_argument(server):
    with pytest.raises(grpc.RpcError) as err:
        server.stub.RecordEvents(pb.RecordEventsRequest(), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as err:
        server.stub.RecordEvents(pb.RecordEventsRequest(events=[ev("u1", "i1", "view")] * 1001), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_context_rules_restrict_the_ranking_and_are_explained(server, cat_of):
    plain = server.stub.Rank(pb.RankRequest(user_id="u30", num_results=30), timeout=10)
    assert any(cat_of[i] in (1, 2) for i in ids(plain))
    support = server.stub.Rank(
        pb.RankRequest(user_id="u30", num_results=30, context=pb.Context(attributes={"support_case_open": "True"})),
        timeout=10,
    )
    assert list(support.applied_rules) == ["no_cross_sell_during_support"]
    assert support.items and all(cat_of[i] not in (1, 2) for i in ids(support))
    email = server.stub.Rank(
        pb.RankRequest(user_id="u30", num_results=10, explain=True, context=pb.Context(channel="email")), timeout=10
    )
    assert list(email.applied_rules) == ["email_demotes_cat0"]
    for it in email.items:
        assert it.contributions.get("rule:email_demotes_cat0", 0.0) == (-5.0 if cat_of[it.item_id] == 0 else 0.0)
        assert sum(it.contributions.values()) == pytest.approx(it.score, abs=1e-4)
    assert sample(server.metrics(), "one2one_rule_applications_total", {"rule": "no_cross_sell_during_support"}) >= 1


def test_arm_in_response_and_metrics_with_variant_override(server):
    resp = server.stub.Rank(pb.RankRequest(user_id="u40", num_results=5, context=pb.Context(channel="web")), timeout=10)
    assert resp.experiment == "ladder" and resp.arm in ("popular", "one_to_one")
    assert (resp.strategy == pb.POPULAR) == (resp.arm == "popular")
    again = server.stub.Rank(
        pb.RankRequest(user_id="u40", num_results=5, context=pb.Context(channel="web")), timeout=10
    )
    assert again.arm == resp.arm  # stable
    server.stub.RecordEvents(
        pb.RecordEventsRequest(
            events=[
                ev("u40", resp.items[0].item_id, "click", request_id=resp.request_id),
                ev("u40", resp.items[0].item_id, "purchase", value=12.5, request_id=resp.request_id),
            ]
        ),
        timeout=10,
    )
    text = server.metrics()
    arm = {"experiment": "ladder", "arm": resp.arm}
    assert sample(text, "one2one_experiment_impressions_total", arm) == 2
    assert sample(text, "one2one_experiment_events_total", {**arm, "event_type": "purchase"}) == 1
    assert sample(text, "one2one_experiment_events_total", {**arm, "event_type": "click"}) == 1
    assert sample(text, "one2one_experiment_revenue_total", arm) == 12.5
    counted = _impressions(server, "ladder")
    forced = server.stub.Rank(
        pb.RankRequest(user_id="u40", variant="popular", context=pb.Context(channel="web")), timeout=10
    )
    assert forced.arm == "popular" and forced.strategy == pb.POPULAR and forced.fallback_reason == "variant"
    # Forced by hand, it is no sample of the experiment: no experiment named, no impression in any arm.
    assert forced.experiment == "" and _impressions(server, "ladder") == counted
    off = server.stub.Rank(pb.RankRequest(user_id="u40"), timeout=10)  # not on the targeted channel
    assert off.experiment == "" and off.arm == ""
    with pytest.raises(grpc.RpcError) as err:
        server.stub.Rank(pb.RankRequest(user_id="u40", variant="nonsense"), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def _impressions(server, experiment: str) -> float:
    """Impressions counted in every arm of ``experiment``."""
    return sum(
        s.value
        for family in text_string_to_metric_families(server.metrics())
        for s in family.samples
        if s.name == "one2one_experiment_impressions_total" and s.labels.get("experiment") == experiment
    )


def test_kill_9_loses_no_accepted_event(artifacts, tmp_path, shop, cat_of):
    s = Server(artifacts, tmp_path)
    try:
        top = s.stub.Rank(pb.RankRequest(user_id="u50", num_results=20), timeout=10)
        bought = [it.item_id for it in top.items[:3]]
        anon_items = [f"i{i}" for i in np.flatnonzero(shop.item_category == 2)[:5]]
        sent = [ev("u50", b, "purchase", value=10.0) for b in bought]
        sent += [ev("anon-kill", i, "click") for i in anon_items]
        accepted = 0
        for e in sent:  # one RPC each: every OK is a promise the restart must keep
            accepted += s.stub.RecordEvents(pb.RecordEventsRequest(events=[e]), timeout=10).accepted_count
        assert accepted == len(sent)
        s.kill9()
        s.start()
        after = s.stub.Rank(pb.RankRequest(user_id="u50", num_results=20), timeout=10)
        assert not set(bought) & set(ids(after))
        anon = s.stub.Rank(pb.RankRequest(user_id="anon-kill", num_results=10), timeout=10)
        assert anon.strategy == pb.ONE_TO_ONE and category_share(anon, cat_of, 2) >= 0.7
        logged = [
            (r["user_id"], r["item_id"], r["event_type"])
            for _, r in read_all(tmp_path / "events")
            if r["kind"] == "event"
        ]
        # Worker processes each write their own log, so only the order within one writer is kept.
        assert sorted(logged) == sorted((e.user_id, e.item_id, e.event_type) for e in sent)
        assert "one2one_event_log_replayed_records_total" in s.metrics()
    finally:
        s.stop()


def test_corrupt_log_stops_the_server_naming_the_segment(artifacts, tmp_path):
    from ranking.realtime.eventlog import EventLog, segments

    log = EventLog(tmp_path / "events", segment_bytes=1024)
    for i in range(40):
        log.append(
            [
                {
                    "kind": "event",
                    "user_id": "u1",
                    "item_id": f"i{i}",
                    "event_type": "view",
                    "timestamp": time.time(),
                    "value": 0.0,
                }
            ]
        )
    log.close()
    first = segments(tmp_path / "events")[0]
    data = bytearray(first.read_bytes())
    data[30] ^= 0x20
    first.write_bytes(bytes(data))
    with pytest.raises(RuntimeError, match="server exited"):
        start_server(artifacts, tmp_path, event_log_dir=tmp_path / "events", env={"ONE2ONE_WORKERS": "1"})
    text = (tmp_path / "server.log").read_text()
    assert first.name in text and "corrupt record" in text


def test_kill_9_in_the_middle_of_concurrent_writes_keeps_every_acknowledged_event(artifacts, tmp_path):
    import threading

    s = Server(artifacts, tmp_path)
    acked: list[str] = []
    lock, stop = threading.Lock(), threading.Event()

    def client(k):
        stub = ranking_pb2_grpc.RankingServiceStub(grpc.insecure_channel(f"127.0.0.1:{s.ready['grpc_port']}"))
        for j in range(2000):
            if stop.is_set():
                return
            batch = [ev(f"w{k}", f"i{(j + b) % 200}", "view", request_id=f"{k}-{j}-{b}") for b in range(3)]
            try:
                resp = stub.RecordEvents(pb.RecordEventsRequest(events=batch), timeout=10)
            except grpc.RpcError:
                return  # the server died under this call: not acknowledged, may or may not be logged
            assert resp.accepted_count == 3
            with lock:
                acked.extend(e.request_id for e in batch)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    while len(acked) < 300 and time.monotonic() < deadline:
        time.sleep(0.01)
    s.kill9()
    stop.set()
    for t in threads:
        t.join(timeout=30)
    assert len(acked) >= 300
    s.start()  # recovers a possibly torn tail, then replays
    try:
        logged = {r["request_id"] for _, r in read_all(tmp_path / "events") if r["kind"] == "event"}
        assert set(acked) <= logged
        # Still applied after the restart: the writers' real-time state came back from the log.
        resp = s.stub.Rank(pb.RankRequest(user_id="w0", num_results=5), timeout=10)
        assert resp.strategy == pb.ONE_TO_ONE
    finally:
        s.stop()


def test_a_purchase_just_after_an_old_bundles_data_end_counts_and_survives_a_restart(artifacts, tmp_path):
    """Real-time state is what came after the bundle's data end, however old by the wall clock."""
    from ranking import MANIFEST, resolve_current

    end = json.loads((resolve_current(artifacts) / MANIFEST).read_text())["data_window"]["end_unix"]
    assert end < time.time() - 30 * 86_400  # the bundle's data is old: a purchase just after it is too
    s = Server(artifacts, tmp_path)
    try:
        top = s.stub.Rank(pb.RankRequest(user_id="u61", num_results=20), timeout=10)
        bought, covered = top.items[0].item_id, top.items[1].item_id
        resp = s.stub.RecordEvents(
            pb.RecordEventsRequest(
                events=[
                    ev("u61", bought, "purchase", value=5.0, when=end + 60),
                    ev("u61", covered, "purchase", value=5.0, when=end - 60),  # inside the bundle's window
                ]
            ),
            timeout=10,
        )
        assert resp.accepted_count == 2 and resp.stale_count == 1
        after = ids(s.stub.Rank(pb.RankRequest(user_id="u61", num_results=20), timeout=10))
        assert bought not in after and covered in after
        assert sample(s.metrics(), "one2one_events_stale_total", {}) == 1
        s.stop()
        s.start()
        again = ids(s.stub.Rank(pb.RankRequest(user_id="u61", num_results=20), timeout=10))
        assert bought not in again and covered in again
    finally:
        s.stop()
