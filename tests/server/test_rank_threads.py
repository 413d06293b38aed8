"""Rank on its own threads, in arrival order, with the wait for one counted from the call's arrival."""

from __future__ import annotations

import signal
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from ops_tools import sample, scrape, start_one_process, wait_for, write_config

from one2one.v1 import ranking_pb2 as pb
from one2one.v1 import ranking_pb2_grpc
from server.config import ServerConfig
from server.demo import wait_serving
from server.interceptors import call_arrived_ns

RANK = 'method="one2one.v1.RankingService/Rank"'
DELAY_MS = 400


def server_ms(call) -> float:
    return float(dict(call.trailing_metadata())["one2one-server-ms"])


def test_a_rank_waiting_for_the_rank_thread_is_charged_the_wait_and_health_is_not_held_up(artifacts, tmp_path):
    # One Rank thread, and every Rank held 400 ms before its pipeline (test-only setting).
    cfg = write_config(
        tmp_path / "server.toml",
        rank_threads=1,
        debug_rank_delay_ms=DELAY_MS,
        reload_interval_seconds=0,
        max_budget_ms=2000,
    )
    proc, ready = start_one_process(artifacts, tmp_path, cfg)
    channel = grpc.insecure_channel(f"127.0.0.1:{ready['grpc_port']}")
    stub = ranking_pb2_grpc.RankingServiceStub(channel)
    try:
        wait_serving(channel)
        first = stub.Rank.future(pb.RankRequest(user_id="u1", budget_ms=1000), timeout=30)
        wait_for(
            lambda: sample(scrape(ready["metrics_port"]), f"one2one_rpc_in_flight_requests{{{RANK}}}", 0) == 1,
            10,
            "the first Rank to hold the Rank thread",
            every=0.01,
        )
        second = stub.Rank.future(pb.RankRequest(user_id="u2", budget_ms=900), timeout=30)
        # Health runs on the server's other threads: answered while both Ranks are pending.
        t0 = time.perf_counter()
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status
        health_s = time.perf_counter() - t0
        assert not first.done() and not second.done(), "health must answer while the Rank thread is busy"
        first_resp, second_resp = first.result(), second.result()
        text = scrape(ready["metrics_port"])
    finally:
        channel.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    assert status == health_pb2.HealthCheckResponse.SERVING and health_s < DELAY_MS / 2000
    # The first ran at once and in its budget (the hold left more than its reserve, a fifth);
    # the second waited for the thread, its server time counts from its arrival, and the
    # wait and the hold left no more than the reserve of its 900 ms: the cheapest path.
    assert DELAY_MS <= server_ms(first) < 2 * DELAY_MS and not first_resp.degraded
    assert server_ms(second) >= 1.5 * DELAY_MS
    assert list(second_resp.degraded_stages)[:1] == ["queue"] and len(second_resp.items) == 10
    queued = sample(text, 'one2one_rank_stage_duration_seconds_sum{stage="queue"}')
    assert queued >= DELAY_MS / 2000
    assert sample(text, f"one2one_rpc_duration_seconds_sum{{{RANK}}}") >= (server_ms(first) + server_ms(second)) / 1000


def test_rank_threads_setting_is_checked_and_no_call_has_no_arrival():
    with pytest.raises(ValueError, match="rank_threads -1 must be >= 0"):
        ServerConfig(artifacts="x", rank_threads=-1).validate()
    assert call_arrived_ns() is None
