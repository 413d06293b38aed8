"""Several worker processes behind one port: shared traffic, metrics that add up, self-healing."""
import os
import signal
import time
import urllib.request

import grpc
import pytest

from one2one.v1 import ranking_pb2 as pb
from one2one.v1 import ranking_pb2_grpc
from server.demo import start_server, wait_serving


def scrape(port: int) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()


def sample(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


RANK_OK = 'one2one_rpc_requests_total{code="OK",method="one2one.v1.RankingService/Rank"}'


@pytest.fixture
def two_workers(artifacts, tmp_path):
    proc, ready = start_server(artifacts, tmp_path, extra=["--workers", "2"])
    yield proc, ready
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


def test_workers_share_the_port_and_the_metrics_add_up(two_workers):
    proc, ready = two_workers
    assert len(ready["worker_pids"]) == 2 and proc.pid not in ready["worker_pids"]
    sent = 0
    # Fresh connections are spread over the workers by the kernel (SO_REUSEPORT).
    for _ in range(12):
        with grpc.insecure_channel(f"127.0.0.1:{ready['grpc_port']}") as ch:
            wait_serving(ch)
            stub = ranking_pb2_grpc.RankingServiceStub(ch)
            for _ in range(5):
                assert stub.Rank(pb.RankRequest(user_id="u2"), timeout=5).strategy == pb.ONE_TO_ONE
                sent += 1
    text = scrape(ready["metrics_port"])
    assert sample(text, RANK_OK) == sent
    assert sample(text, "one2one_serving") == 1
    # process_* cover the supervisor and both workers: more than any one of them.
    rss = {pid: int(open(f"/proc/{pid}/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
           for pid in [proc.pid, *ready["worker_pids"]]}
    assert sample(text, "process_resident_memory_bytes") > max(rss.values()) * 1.5


def test_a_killed_worker_is_replaced_and_service_continues(two_workers):
    proc, ready = two_workers
    victim = ready["worker_pids"][0]
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 30
    ok = 0
    while time.monotonic() < deadline and ok < 20:
        try:
            with grpc.insecure_channel(f"127.0.0.1:{ready['grpc_port']}") as ch:
                stub = ranking_pb2_grpc.RankingServiceStub(ch)
                if stub.Rank(pb.RankRequest(user_id="u2"), timeout=5).items:
                    ok += 1
        except grpc.RpcError:
            time.sleep(0.1)
    assert ok == 20
    assert proc.poll() is None  # the supervisor lives on
    children: list[int] = []
    while time.monotonic() < deadline:
        children = [int(p) for p in os.popen(f"pgrep -P {proc.pid}").read().split()]
        if len(children) == 2 and victim not in children:
            break
        time.sleep(0.1)
    assert len(children) == 2 and victim not in children
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0


def test_workers_stop_when_the_supervisor_is_killed(two_workers):
    proc, ready = two_workers
    workers = ready["worker_pids"]
    proc.kill()  # SIGKILL: the supervisor gets no chance to stop them itself
    proc.wait(timeout=10)
    deadline = time.monotonic() + 30
    alive = workers
    while time.monotonic() < deadline and alive:
        alive = [pid for pid in workers if _running(pid)]
        time.sleep(0.1)
    assert alive == [], f"workers {alive} outlived their supervisor"
    with pytest.raises(grpc.RpcError):  # nobody serves the port any more
        with grpc.insecure_channel(f"127.0.0.1:{ready['grpc_port']}") as ch:
            ranking_pb2_grpc.RankingServiceStub(ch).Rank(pb.RankRequest(user_id="u2"), timeout=2)


def _running(pid: int) -> bool:
    """Alive and not a zombie (an orphaned worker is reaped by init, not by us)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
