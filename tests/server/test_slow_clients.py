"""Regression (issue 22): a few connections holding calls whose request body never finishes
arriving tied up every handler thread; new Rank calls and health checks went unanswered
until those connections closed. Reproduced with a raw HTTP/2 client (tests/h2_raw.py)
against a real server process."""

from __future__ import annotations

import signal
import time
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from h2_raw import StalledConnection

from one2one.v1 import ranking_pb2 as pb
from one2one.v1 import ranking_pb2_grpc
from server.demo import start_server, wait_serving

HEALTH = "/grpc.health.v1.Health/Check"
RANK = "/one2one.v1.RankingService/Rank"
EVENTS = "/one2one.v1.RankingService/RecordEvents"
TIMEOUT = 1.0  # request_read_timeout_seconds of the guarded server


def start(artifacts, tmp_path, read_timeout: float):
    # One process and small pools: 6 threads for everything but Rank, 2 for Rank.
    (tmp_path / "server.toml").write_text(
        "[server]\nworkers = 1\nmax_workers = 6\nrank_threads = 2\nreload_interval_seconds = 0\n"
        f"request_read_timeout_seconds = {read_timeout}\n"
    )
    proc, ready = start_server(artifacts, tmp_path, extra=["--config", str(tmp_path / "server.toml")])
    return proc, ready


def stop(proc):
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


def hold_every_thread(port: int) -> list[StalledConnection]:
    """Three connections: 2 x 4 stalled health checks and RecordEvents (8 > 6 threads), and
    3 stalled Ranks (> 2 Rank threads)."""
    return [
        StalledConnection(port, HEALTH, 4),
        StalledConnection(port, EVENTS, 4),
        StalledConnection(port, RANK, 3),
    ]


def answered_within(channel: grpc.Channel, seconds: float) -> dict[str, float | None]:
    """Seconds until health and Rank each answered (retrying calls of 0.5 s), None if never."""
    health = health_pb2_grpc.HealthStub(channel)
    rank = ranking_pb2_grpc.RankingServiceStub(channel)
    calls = {
        "health": lambda: health.Check(health_pb2.HealthCheckRequest(service=""), timeout=0.5),
        "rank": lambda: rank.Rank(pb.RankRequest(user_id="u2"), timeout=0.5),
    }
    out: dict[str, float | None] = {}
    for name, call in calls.items():
        t0 = time.monotonic()
        out[name] = None
        while time.monotonic() - t0 < seconds:
            try:
                call()
                out[name] = time.monotonic() - t0
                break
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED, exc
    return out


def stalled_total(metrics_port: int) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
    line = next(s for s in text.splitlines() if s.startswith("one2one_rpc_stalled_requests_total "))
    return float(line.split()[1])


@pytest.mark.slow
def test_stalled_request_bodies_do_not_stop_health_or_rank(artifacts, tmp_path):
    proc, ready = start(artifacts, tmp_path, TIMEOUT)
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{ready['grpc_port']}")
        wait_serving(channel)
        stalled = hold_every_thread(ready["grpc_port"])
        time.sleep(0.2)  # every stalled call has its thread
        waited = answered_within(channel, 10 * TIMEOUT)
        # Answered once the guard cancels the stalled calls: within 1.25 timeouts, plus slack.
        assert waited["health"] is not None and waited["health"] < 1.25 * TIMEOUT + 1.0, waited
        assert waited["rank"] is not None and waited["rank"] < 1.25 * TIMEOUT + 1.0, waited
        # Each stalled call was cancelled (RST_STREAM to the client) and counted.
        deadline = time.monotonic() + 5
        while sum(len(c.reset_streams) for c in stalled) < 11 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [len(c.reset_streams) for c in stalled] == [4, 4, 3]
        assert stalled_total(ready["metrics_port"]) == 11
        # A second wave is cleared the same way: the guard keeps working.
        again = hold_every_thread(ready["grpc_port"])
        time.sleep(0.2)
        waited = answered_within(channel, 10 * TIMEOUT)
        assert all(v is not None and v < 1.25 * TIMEOUT + 1.0 for v in waited.values()), waited
        for c in stalled + again:
            c.close()
        channel.close()
    finally:
        stop(proc)


@pytest.mark.slow
def test_without_the_guard_stalled_bodies_hold_every_thread(artifacts, tmp_path):
    """The failure the guard fixes, shown on the same server with the guard off (timeout 0)."""
    proc, ready = start(artifacts, tmp_path, 0)
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{ready['grpc_port']}")
        wait_serving(channel)
        stalled = hold_every_thread(ready["grpc_port"])
        time.sleep(0.2)
        assert answered_within(channel, 3.0) == {"health": None, "rank": None}
        for c in stalled:
            c.close()
        # Closing the connections frees the threads.
        assert all(v is not None for v in answered_within(channel, 10.0).values())
        channel.close()
    finally:
        stop(proc)
