"""Bad input and faults over a real server process (issue 22): Timestamps outside protobuf's
range, and the event log's disk filling up under a running server."""

from __future__ import annotations

import signal
import urllib.request

import grpc
import pytest
from disk_faults import fill, small_tmpfs
from google.protobuf.timestamp_pb2 import Timestamp
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from prometheus_client.parser import text_string_to_metric_families

from one2one.v1 import ranking_pb2 as pb
from one2one.v1 import ranking_pb2_grpc
from ranking import read_all
from server.demo import start_server, wait_serving

BAD_TIMESTAMPS = [(10**12, 0), (-(10**12), 0), (0, -1), (0, 10**9)]


class Running:
    def __init__(self, artifacts, workdir, event_log_dir=None):
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "server.toml").write_text("[server]\nworkers = 1\nreload_interval_seconds = 0\n")
        self.proc, self.ready = start_server(
            artifacts, workdir, extra=["--config", str(workdir / "server.toml")], event_log_dir=event_log_dir
        )
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.ready['grpc_port']}")
        wait_serving(self.channel)
        self.stub = ranking_pb2_grpc.RankingServiceStub(self.channel)

    def metric(self, name: str, labels: dict[str, str] | None = None) -> float:
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.ready['metrics_port']}/metrics", timeout=5).read()
        for fam in text_string_to_metric_families(text.decode()):
            for s in fam.samples:
                if s.name == name and all(s.labels.get(k) == v for k, v in (labels or {}).items()):
                    return s.value
        raise AssertionError(f"{name}{labels or ''} not exported")

    def stop(self):
        self.channel.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            assert self.proc.wait(timeout=30) == 0


def violations(exc: grpc.RpcError) -> list[tuple[str, str]]:
    status = rpc_status.from_call(exc)
    bad = error_details_pb2.BadRequest()
    assert status is not None and status.details[0].Unpack(bad)
    return [(v.field, v.description) for v in bad.field_violations]


def event(user: str, **kw) -> pb.Event:
    return pb.Event(**{"user_id": user, "item_id": "i1", "event_type": "click", **kw})


@pytest.fixture(scope="module")
def server(artifacts, tmp_path_factory):
    s = Running(artifacts, tmp_path_factory.mktemp("faults"))
    yield s
    s.stop()


@pytest.mark.parametrize("seconds,nanos", BAD_TIMESTAMPS)
def test_rank_with_an_out_of_range_event_time_is_invalid_argument_naming_it(server, seconds, nanos):
    req = pb.RankRequest(user_id="u2", context=pb.Context(event_time=Timestamp(seconds=seconds, nanos=nanos)))
    with pytest.raises(grpc.RpcError) as info:
        server.stub.Rank(req, timeout=5)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    [(field, why)] = violations(info.value)
    assert field == "context.event_time"
    assert str(seconds if not 0 <= seconds < 10**11 else nanos) in why


@pytest.mark.parametrize("seconds,nanos", BAD_TIMESTAMPS)
def test_record_events_rejects_only_the_event_with_an_out_of_range_time(server, seconds, nanos):
    bad = Timestamp(seconds=seconds, nanos=nanos)
    resp = server.stub.RecordEvents(
        pb.RecordEventsRequest(
            events=[
                event("ts-ok-1"),
                event("ts-bad-1", event_time=bad),
                event("ts-ok-2", context=pb.Context(channel="web")),
                event("ts-bad-2", context=pb.Context(event_time=bad)),
                event("ts-bad-3", event_type="teleport"),
            ]
        ),
        timeout=5,
    )
    assert resp.accepted_count == 2
    assert [(r.index, r.field) for r in resp.rejections] == [
        (1, "event_time"),
        (3, "context.event_time"),
        (4, "event_type"),
    ]
    assert "Timestamp range" in resp.rejections[0].reason or "nanos" in resp.rejections[0].reason


@pytest.mark.slow
def test_full_disk_under_the_event_log(artifacts, tmp_path):
    """RecordEvents answers UNAVAILABLE and acknowledges nothing; Rank keeps serving; the state
    is exported; writing resumes by itself when space returns; after a restart the log and the
    state hold exactly the acknowledged events (regression: refused events used to appear)."""
    with small_tmpfs(tmp_path / "disk", "512k") as disk:
        s = Running(artifacts, tmp_path / "run1", event_log_dir=disk / "events")
        try:
            acked: list[str] = []
            resp = s.stub.RecordEvents(pb.RecordEventsRequest(events=[event("before-1")]), timeout=5)
            assert resp.accepted_count == 1
            acked.append("before-1")
            assert s.metric("one2one_event_log_writable") == 1
            filler = fill(disk)
            refused: list[str] = []
            unavailable = 0
            # Small batches may still fit the segment's last page: those are acknowledged.
            for k in range(400):
                batch = [event(f"full-{k}-{j}", request_id="r" * 60) for j in range(5)]
                try:
                    resp = s.stub.RecordEvents(pb.RecordEventsRequest(events=batch), timeout=5)
                except grpc.RpcError as exc:
                    assert exc.code() == grpc.StatusCode.UNAVAILABLE
                    assert "disk is full" in exc.details() and "nothing of this request was recorded" in exc.details()
                    assert str(disk) not in exc.details()  # no server path to the caller
                    refused += [e.user_id for e in batch]
                    unavailable += 1
                    if unavailable >= 5:
                        break
                    continue
                assert resp.accepted_count == 5
                acked += [e.user_id for e in batch]
            assert unavailable == 5
            # Rank keeps serving.
            assert s.stub.Rank(pb.RankRequest(user_id="u2"), timeout=5).items
            assert s.metric("one2one_event_log_writable") == 0
            assert s.metric("one2one_event_log_write_failures_total", {"reason": "no_space"}) >= 5
            filler.unlink()
            resp = s.stub.RecordEvents(pb.RecordEventsRequest(events=[event("after-1")]), timeout=5)
            assert resp.accepted_count == 1
            acked.append("after-1")
            assert s.metric("one2one_event_log_writable") == 1
        finally:
            s.stop()
        logged = [r["user_id"] for _, r in read_all(disk / "events") if r.get("kind") == "event"]
        assert logged == acked
        # A restart replays exactly those.
        s = Running(artifacts, tmp_path / "run2", event_log_dir=disk / "events")
        try:
            assert s.metric("one2one_event_log_replayed_records_total", {"kind": "event"}) == len(acked)
        finally:
            s.stop()


def test_an_events_context_is_bounded_like_a_rank_context(server):
    """Every repeated field has a limit, also where it is unused (an Event's session items)."""
    resp = server.stub.RecordEvents(
        pb.RecordEventsRequest(
            events=[
                event("ctx-1", context=pb.Context(session_item_ids=["1"] * 101)),
                event("ctx-2", context=pb.Context(session_item_ids=["1"] * 100)),
                event("ctx-3", context=pb.Context(session_item_ids=["x" * 257])),
            ]
        ),
        timeout=5,
    )
    assert resp.accepted_count == 1
    assert [(r.index, r.field) for r in resp.rejections] == [
        (0, "context.session_item_ids"),
        (2, "context.session_item_ids"),
    ]
    assert "at most 100" in resp.rejections[0].reason
