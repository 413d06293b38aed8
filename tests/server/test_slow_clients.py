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


def first_answer(call, seconds: float) -> tuple[grpc.StatusCode, float] | None:
    """Retry ``call`` (each with a 0.5 s deadline) until it answers anything but
    DEADLINE_EXCEEDED; its status code and the seconds it took, or None if never."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < seconds:
        try:
            call()
            return grpc.StatusCode.OK, time.monotonic() - t0
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
                return exc.code(), time.monotonic() - t0
    return None


@pytest.mark.slow
def test_stalled_calls_are_cancelled_on_every_pool_the_guard_picks(artifacts, tmp_path):
    """With callers and shedding configured, the guard sends calls to pools of its own: the
    counted events pool, the two refusal threads, health_port's two threads. A stalled call
    on each is cancelled like any other, and a shed call's room is given back when it is."""
    from server.security import hash_token

    token = "events-token-0123456789abcdef"
    (tmp_path / "callers.toml").write_text(
        f'[[callers]]\nname = "ingest"\nroles = ["events"]\ntoken_sha256 = "{hash_token(token)}"\n'
    )
    (tmp_path / "server.toml").write_text(
        "[server]\nworkers = 1\nmax_workers = 6\nrank_threads = 2\nreload_interval_seconds = 0\n"
        f'request_read_timeout_seconds = {TIMEOUT}\nauth_tokens_file = "{tmp_path / "callers.toml"}"\n'
        'max_calls_per_role = "events:3,admin:2"\nhealth_port = 0\n'
    )
    proc, ready = start_server(artifacts, tmp_path, extra=["--config", str(tmp_path / "server.toml")])
    bearer = (("authorization", f"Bearer {token}"),)
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{ready['grpc_port']}")
        probe_channel = grpc.insecure_channel(f"127.0.0.1:{ready['health_port']}")
        wait_serving(channel)
        stub = ranking_pb2_grpc.RankingServiceStub(channel)
        record = pb.RecordEventsRequest(events=[pb.Event(user_id="u2", item_id="i1", event_type="click")])
        stalled = [
            StalledConnection(ready["grpc_port"], EVENTS, 3, bearer),  # the events role's whole room
            StalledConnection(ready["grpc_port"], RANK, 2),  # no token: both refusal threads
            StalledConnection(ready["health_port"], HEALTH, 2),  # both of health_port's threads
        ]
        time.sleep(0.2)
        # While they hold it, the events role is full: shed on arrival, not queued.
        with pytest.raises(grpc.RpcError) as shed:
            stub.RecordEvents(record, metadata=bearer, timeout=5)
        assert shed.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        bound = 1.25 * TIMEOUT + 1.0
        refused = first_answer(lambda: stub.Rank(pb.RankRequest(user_id="u2"), timeout=0.5), 10 * TIMEOUT)
        assert refused is not None and refused[0] == grpc.StatusCode.UNAUTHENTICATED and refused[1] < bound, refused
        probed = first_answer(
            lambda: health_pb2_grpc.HealthStub(probe_channel).Check(health_pb2.HealthCheckRequest(), timeout=0.5),
            10 * TIMEOUT,
        )
        assert probed is not None and probed[0] == grpc.StatusCode.OK and probed[1] < bound, probed
        # The stalled RecordEvents were cancelled and their room given back.
        deadline = time.monotonic() + 5
        while sum(len(c.reset_streams) for c in stalled) < 7 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [len(c.reset_streams) for c in stalled] == [3, 2, 2]
        assert stub.RecordEvents(record, metadata=bearer, timeout=5).accepted_count == 1
        assert stalled_total(ready["metrics_port"]) == 7
        # The caller is judged before the request: bytes that are not a message get
        # UNAUTHENTICATED or PERMISSION_DENIED when the caller may not call, and
        # INVALID_ARGUMENT only when it may.
        garbage = b"\xff\xff\xff not a protobuf message"
        for path, metadata, code in (
            (RANK, (), grpc.StatusCode.UNAUTHENTICATED),
            (RANK, bearer, grpc.StatusCode.PERMISSION_DENIED),
            (EVENTS, bearer, grpc.StatusCode.INVALID_ARGUMENT),
        ):
            with pytest.raises(grpc.RpcError) as raw:
                channel.unary_unary(path)(garbage, metadata=metadata, timeout=5)
            assert raw.value.code() == code, (path, metadata, raw.value)
        for c in stalled:
            c.close()
        channel.close()
        probe_channel.close()
    finally:
        stop(proc)
