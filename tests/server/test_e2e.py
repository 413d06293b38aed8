"""End to end: a real bundle, `python -m server` as a real process on a free port, a real channel."""

from __future__ import annotations

import signal
import threading
import time
import urllib.request

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from realtime_support import bad_request_fields

from one2one.v1 import ranking_pb2 as pb
from one2one.v1 import ranking_pb2_grpc
from server.demo import start_server, wait_serving


@pytest.fixture(scope="module")
def running(artifacts, tmp_path_factory):
    proc, ready = start_server(artifacts, tmp_path_factory.mktemp("server"))
    channel = grpc.insecure_channel(f"127.0.0.1:{ready['grpc_port']}")
    wait_serving(channel)
    yield proc, ready, channel
    channel.close()
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)  # the supervisor stops its workers
        proc.wait(timeout=30)


@pytest.fixture
def stub(running):
    return ranking_pb2_grpc.RankingServiceStub(running[2])


def test_known_user_gets_their_category(stub, shop):
    cat = {f"i{i}": int(c) for i, c in enumerate(shop.item_category)}
    resp = stub.Rank(pb.RankRequest(user_id="u4", num_results=10), timeout=5)
    assert resp.strategy == pb.ONE_TO_ONE
    assert len(resp.items) == 10 and resp.model_version and len(resp.request_id) == 32
    assert not resp.degraded and resp.fallback_reason == ""
    assert np.mean([cat[it.item_id] == shop.favourite[4] for it in resp.items]) >= 0.7
    scores = [it.score for it in resp.items]
    assert scores == sorted(scores, reverse=True)


def test_session_only_and_unknown_users(stub, shop):
    session = [f"i{i}" for i in np.flatnonzero(shop.item_category == 1)[:2]]
    resp = stub.Rank(pb.RankRequest(num_results=5, context=pb.Context(session_item_ids=session)), timeout=5)
    assert resp.strategy == pb.SESSION and resp.fallback_reason == "no_user_id"
    assert len(resp.items) == 5
    resp = stub.Rank(
        pb.RankRequest(user_id="nobody", num_results=5, context=pb.Context(attributes={"region": "R0"})), timeout=5
    )
    assert resp.strategy == pb.SEGMENT and resp.fallback_reason == "unknown_user"
    resp = stub.Rank(pb.RankRequest(user_id="nobody", num_results=5), timeout=5)
    assert resp.strategy == pb.POPULAR and len(resp.items) == 5


def test_exclusions_filters_and_explain(stub, shop):
    cat = {f"i{i}": int(c) for i, c in enumerate(shop.item_category)}
    first = stub.Rank(pb.RankRequest(user_id="u9", num_results=3), timeout=5)
    excluded = [first.items[0].item_id]
    resp = stub.Rank(pb.RankRequest(user_id="u9", num_results=3, exclude_item_ids=excluded, explain=True), timeout=5)
    assert excluded[0] not in [it.item_id for it in resp.items]
    for it in resp.items:
        assert set(it.contributions) >= {"als_score", "popularity", "bias"}
        assert sum(it.contributions.values()) == pytest.approx(it.score, abs=1e-4)
    resp = stub.Rank(
        pb.RankRequest(user_id="u9", num_results=8, filter=pb.Filter(include_categories=["cat3"])), timeout=5
    )
    assert len(resp.items) == 8 and all(cat[it.item_id] == 3 for it in resp.items)
    assert not first.items[0].contributions  # only filled when explain is set


def test_bad_requests_name_the_field(stub):
    with pytest.raises(grpc.RpcError) as err:
        stub.Rank(pb.RankRequest(num_results=-3, budget_ms=-1), timeout=5)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    fields = bad_request_fields(err.value)
    assert set(fields) == {"num_results", "budget_ms"}
    assert "-3" in fields["num_results"]
    with pytest.raises(grpc.RpcError) as err:
        stub.Rank(pb.RankRequest(context=pb.Context(session_item_ids=["x"] * 101)), timeout=5)
    assert set(bad_request_fields(err.value)) == {"context.session_item_ids"}


def test_oversized_request_is_refused(stub):
    huge = pb.RankRequest(candidate_item_ids=["i" * 200] * 8000)  # ~1.6 MB > 1 MiB limit
    with pytest.raises(grpc.RpcError) as err:
        stub.Rank(huge, timeout=5)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_health_open_and_reflection_off_by_default(running):
    channel = running[2]
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "one2one.v1.RankingService"):
        assert (
            health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status
            == health_pb2.HealthCheckResponse.SERVING
        )
    # Reflection lists every service to whoever asks: a setting, off unless configured
    # (on: test_shedding_e2e).
    refl = reflection_pb2_grpc.ServerReflectionStub(channel)
    with pytest.raises(grpc.RpcError) as err:
        list(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5))
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_metrics_show_the_calls(running, stub):
    _, ready, _ = running
    stub.Rank(pb.RankRequest(user_id="u1"), timeout=5)
    with pytest.raises(grpc.RpcError):
        stub.Rank(pb.RankRequest(num_results=-1), timeout=5)
    text = urllib.request.urlopen(f"http://127.0.0.1:{ready['metrics_port']}/metrics", timeout=5).read().decode()
    ok = _sample(text, 'one2one_rpc_requests_total{code="OK",method="one2one.v1.RankingService/Rank"}')
    bad = _sample(text, 'one2one_rpc_requests_total{code="INVALID_ARGUMENT",method="one2one.v1.RankingService/Rank"}')
    assert ok >= 1 and bad >= 1
    assert _sample(text, 'one2one_rpc_duration_seconds_count{method="one2one.v1.RankingService/Rank"}') >= ok + bad
    assert _sample(text, 'one2one_rank_responses_total{strategy="ONE_TO_ONE"}') >= 1
    assert _sample(text, "one2one_serving") == 1


def _sample(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


def test_sigterm_drains_in_flight_requests_then_exits_zero(artifacts, tmp_path):
    proc, ready = start_server(artifacts, tmp_path)
    channel = grpc.insecure_channel(f"127.0.0.1:{ready['grpc_port']}")
    wait_serving(channel)
    stub = ranking_pb2_grpc.RankingServiceStub(channel)
    results, stop = [], threading.Event()

    def load():
        while not stop.is_set():
            try:
                results.append(stub.Rank(pb.RankRequest(user_id="u3"), timeout=5).strategy)
            except grpc.RpcError as exc:
                results.append(exc.code())
                return

    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    stop.set()
    for t in threads:
        t.join(timeout=10)
    channel.close()
    served = [r for r in results if r == pb.ONE_TO_ONE]
    failed = [r for r in results if r != pb.ONE_TO_ONE]
    assert len(served) > 10
    # Each client thread stops at its first failure, so at most one each: the call that
    # reached a server no longer accepting (refused or cancelled, never an internal error).
    assert len(failed) <= len(threads)
    assert set(failed) <= {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED}, failed
