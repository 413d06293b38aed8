"""The Rank queue bound under a burst, on the real server: the calls past the bound are answered
RESOURCE_EXHAUSTED at once, the others in time, none waits out its deadline; health and event
writers are answered meanwhile. Reflection, when configured on, lists the services."""

from __future__ import annotations

import signal
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from ops_tools import sample, scrape, start_one_process, wait_for, write_config

from one2one.v1 import ranking_pb2 as pb
from one2one.v1 import ranking_pb2_grpc
from server.demo import wait_serving

pytestmark = pytest.mark.slow

DELAY_MS = 400
RANK = "one2one.v1.RankingService/Rank"


def test_a_burst_past_the_rank_queue_is_shed_at_once(artifacts, tmp_path):
    cfg = write_config(
        tmp_path / "server.toml",
        rank_threads=1,
        max_queued_ranks=2,
        debug_rank_delay_ms=DELAY_MS,
        max_budget_ms=2000.0,
        reload_interval_seconds=0,
        reflection=True,
    )
    proc, ready = start_one_process(artifacts, tmp_path, cfg)
    channel = grpc.insecure_channel(f"127.0.0.1:{ready['grpc_port']}")
    stub = ranking_pb2_grpc.RankingServiceStub(channel)
    deadline_s = 4 * DELAY_MS / 1000 + 1.0  # one running and two queued fit well inside it
    try:
        wait_serving(channel)
        before = scrape(ready["metrics_port"])
        sent = {}
        first = stub.Rank.future(pb.RankRequest(user_id="u1", budget_ms=2000), timeout=deadline_s)
        sent[first] = time.perf_counter()
        wait_for(
            lambda: sample(scrape(ready["metrics_port"]), f'one2one_rpc_in_flight_requests{{method="{RANK}"}}', 0) == 1,
            10,
            "the first Rank to hold the Rank thread",
            every=0.01,
        )
        burst = []
        for i in range(9):
            call = stub.Rank.future(pb.RankRequest(user_id=f"u{i + 2}", budget_ms=2000), timeout=deadline_s)
            sent[call] = time.perf_counter()
            burst.append(call)
        done_at = {}
        for call in [first, *burst]:
            call.add_done_callback(lambda c: done_at.setdefault(c, time.perf_counter()))
        # Meanwhile health and an event writer are answered (they do not share Rank's thread).
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2).status
        recorded = stub.RecordEvents(
            pb.RecordEventsRequest(events=[pb.Event(user_id="u1", item_id="i3", event_type="click")]), timeout=2
        )
        codes = []
        for call in [first, *burst]:
            try:
                call.result()
                codes.append(grpc.StatusCode.OK)
            except grpc.RpcError:
                codes.append(call.code())
        refl = reflection_pb2_grpc.ServerReflectionStub(channel)
        answers = list(
            refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5)
        )
        after = scrape(ready["metrics_port"])
    finally:
        channel.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    assert health == health_pb2.HealthCheckResponse.SERVING and recorded.accepted_count == 1
    ok = [c for c, code in zip([first, *burst], codes, strict=True) if code == grpc.StatusCode.OK]
    shed = [c for c, code in zip([first, *burst], codes, strict=True) if code == grpc.StatusCode.RESOURCE_EXHAUSTED]
    # One running and two queued are served; the other seven are shed; nothing else happened.
    assert (len(ok), len(shed), len(codes)) == (3, 7, 10)
    assert first in ok
    shed_s = [done_at[c] - sent[c] for c in shed]
    ok_s = [done_at[c] - sent[c] for c in ok]
    print(f"shed answered in max {max(shed_s) * 1000:.1f} ms; served in max {max(ok_s) * 1000:.0f} ms")
    assert max(shed_s) < DELAY_MS / 1000 / 2  # answered at once, not after a wait for the thread
    assert max(ok_s) < deadline_s  # none waited out its deadline
    name = f'one2one_rpc_shed_total{{method="{RANK}",reason="rank_queue"}}'
    assert sample(after, name) - sample(before, name) == 7
    code = f'one2one_rpc_requests_total{{code="RESOURCE_EXHAUSTED",method="{RANK}"}}'
    assert sample(after, code) - sample(before, code, 0) == 7
    names = {s.name for s in answers[0].list_services_response.service}
    assert {"one2one.v1.RankingService", "one2one.v1.AdminService", "grpc.health.v1.Health"} <= names
