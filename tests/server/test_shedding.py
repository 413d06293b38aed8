"""Load shedding: per-role and per-process bounds and the Rank queue, answered RESOURCE_EXHAUSTED on
arrival. The guard, the counted pools and gRPC are real; the ranking and event handlers are
replaced by ones that hold their thread until released, so a test decides exactly how many
calls are held."""

from __future__ import annotations

import threading
import time
from concurrent import futures

import grpc
import pytest

from one2one.v1 import ranking_pb2 as pb
from one2one.v1 import ranking_pb2_grpc
from server.app import call_handling
from server.config import ServerConfig
from server.shedding import CountedPool, LoadShedder


def test_counted_pool_counts_queued_and_running_and_forgets_nothing():
    executor = futures.ThreadPoolExecutor(max_workers=1)
    pool = CountedPool(executor)
    release, started = threading.Event(), threading.Event()

    def hold():
        started.set()
        release.wait(10)

    def fail():
        raise RuntimeError("handler failed")

    first = pool.submit(hold)
    started.wait(10)
    later = [pool.submit(fail), pool.submit(hold)]
    assert (pool.running, pool.queued, pool.in_flight) == (1, 2, 3)
    release.set()
    first.result(10)
    with pytest.raises(RuntimeError):
        later[0].result(10)
    later[1].result(10)
    assert (pool.running, pool.queued) == (0, 0)
    executor.shutdown()
    with pytest.raises(RuntimeError):  # a shut-down executor: the refused call does not count
        pool.submit(hold)
    assert pool.in_flight == 0


def test_shedder_reasons_in_order():
    executor = futures.ThreadPoolExecutor(max_workers=1)
    pools = {r: CountedPool(executor) for r in ("rank", "events", "admin", "other")}
    pools["rank"].queued, pools["events"].running = 3, 2
    assert LoadShedder(pools, max_total=5).refusal("admin") == "process"
    assert LoadShedder(pools, max_total=6, role_limits={"events": 2}).refusal("events") == "role"
    assert LoadShedder(pools, max_total=6, role_limits={"events": 3}).refusal("events") is None
    assert LoadShedder(pools, max_queued_ranks=3).refusal("rank") == "rank_queue"
    assert LoadShedder(pools, max_queued_ranks=4).refusal("rank") is None
    assert LoadShedder(pools).refusal("rank") is None  # 0: no limit
    executor.shutdown()


@pytest.mark.parametrize("bad", ["events", "events:0", "root:3", "rank:1,rank:2", "rank:x"])
def test_role_limits_are_checked(bad):
    with pytest.raises(ValueError, match="max_calls_per_role entry"):
        ServerConfig(artifacts="x", max_calls_per_role=bad).validate()


class HeldServer:
    """A real gRPC server behind the real guard, whose Rank and RecordEvents hold until released."""

    def __init__(self, **settings):
        self.config = ServerConfig(artifacts="unused", **settings)
        self.release = threading.Event()
        self.holding = threading.Semaphore(0)
        # The server's own pools and interceptors, as create_server assembles them.
        server_pool, interceptors = call_handling(self.config)
        self.server = grpc.server(server_pool, interceptors=interceptors)

        def held(response):
            def behavior(request, context):
                self.holding.release()
                self.release.wait(30)
                return response

            return behavior

        self.server.add_generic_rpc_handlers(
            (
                grpc.method_handlers_generic_handler(
                    "one2one.v1.RankingService",
                    {
                        "Rank": grpc.unary_unary_rpc_method_handler(
                            held(pb.RankResponse(model_version="held")),
                            pb.RankRequest.FromString,
                            pb.RankResponse.SerializeToString,
                        ),
                        "RecordEvents": grpc.unary_unary_rpc_method_handler(
                            held(pb.RecordEventsResponse(accepted_count=1)),
                            pb.RecordEventsRequest.FromString,
                            pb.RecordEventsResponse.SerializeToString,
                        ),
                    },
                ),
            )
        )
        port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self.stub = ranking_pb2_grpc.RankingServiceStub(self.channel)

    def hold(self, method: str, n: int) -> list:
        """Start ``n`` calls and wait until each holds a thread."""
        calls = [getattr(self.stub, method).future(self._request(method), timeout=30) for _ in range(n)]
        for _ in range(n):
            assert self.holding.acquire(timeout=10)
        return calls

    def call(self, method: str) -> tuple[grpc.StatusCode, float]:
        t0 = time.perf_counter()
        try:
            getattr(self.stub, method)(self._request(method), timeout=5)
            code = grpc.StatusCode.OK
        except grpc.RpcError as err:
            code = err.code()
        return code, time.perf_counter() - t0

    @staticmethod
    def _request(method: str):
        return pb.RankRequest() if method == "Rank" else pb.RecordEventsRequest()

    def close(self):
        self.release.set()
        self.channel.close()
        self.server.stop(None)


def test_event_writers_cannot_take_the_rankers_room():
    s = HeldServer(max_workers=8, rank_threads=2, max_calls_per_role="events:3", max_concurrent_calls=10)
    try:
        held = s.hold("RecordEvents", 3)
        code, seconds = s.call("RecordEvents")
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and seconds < 1.0  # at once, not queued
        ranks = s.hold("Rank", 2)  # rankers still get their threads while writers are at their ceiling
        s.release.set()
        assert [c.result().accepted_count for c in held] == [1, 1, 1]
        assert [c.result().model_version for c in ranks] == ["held", "held"]
    finally:
        s.close()


def test_the_process_bound_and_the_rank_queue():
    s = HeldServer(max_workers=8, rank_threads=1, max_queued_ranks=2, max_concurrent_calls=4)
    try:
        running = s.hold("Rank", 1)
        queued = [s.stub.Rank.future(pb.RankRequest(), timeout=30) for _ in range(2)]
        # The two queued ones are counted when each arrives; the third finds the queue full.
        code, seconds = s.call("Rank")
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and seconds < 1.0
        events = s.hold("RecordEvents", 1)  # 4 held: the worker is full
        code, _ = s.call("RecordEvents")
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        s.release.set()
        for call in running + queued + events:
            call.result(timeout=10)
    finally:
        s.close()
