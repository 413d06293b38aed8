"""Several worker processes behind one port: shared traffic, metrics that add up, self-healing."""

import os
import signal
import time
import urllib.request

import grpc
import pytest

from one2one.v1 import ranking_pb2 as pb
from one2one.v1 import ranking_pb2_grpc
from server.config import ServerConfig, allowed_cpus
from server.demo import start_server, wait_serving
from server.workers import count_listening, worker_cpus


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
    rss = {
        pid: int(open(f"/proc/{pid}/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        for pid in [proc.pid, *ready["worker_pids"]]
    }
    assert sample(text, "process_resident_memory_bytes") > max(rss.values()) * 1.5


def test_workers_are_pinned_one_per_cpu(two_workers):
    proc, ready = two_workers
    got = sorted(sorted(os.sched_getaffinity(pid)) for pid in ready["worker_pids"])
    cpus = worker_cpus(2, allowed_cpus(), pin=True)
    assert got == ([allowed_cpus()] * 2 if cpus is None else [[c] for c in cpus])
    if len(allowed_cpus()) == 2:  # CI's machine: two workers, two CPUs, one each
        assert got == [[c] for c in allowed_cpus()]
    assert os.sched_getaffinity(proc.pid) == set(allowed_cpus())  # the supervisor stays free


def test_which_workers_are_pinned():
    assert worker_cpus(2, [0, 1], pin=True) == [0, 1]
    assert worker_cpus(2, [3, 7], pin=True) == [3, 7]  # a cpuset: the CPUs it allows
    assert worker_cpus(2, [0, 1], pin=False) is None
    assert worker_cpus(2, [0, 1, 2, 3], pin=True) is None  # fewer workers than CPUs
    assert worker_cpus(4, [0, 1], pin=True) is None  # more: two would share a core
    assert worker_cpus(1, [0], pin=True) is None  # one process: no supervisor, nothing to pin


def test_pinning_can_be_turned_off_and_a_misspelt_switch_is_refused(artifacts, tmp_path):
    proc, ready = start_server(artifacts, tmp_path, extra=["--workers", "2"], env={"ONE2ONE_PIN_WORKERS": "off"})
    try:
        assert [os.sched_getaffinity(pid) for pid in ready["worker_pids"]] == [set(allowed_cpus())] * 2
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    with pytest.raises(ValueError, match="'pin_workers' from environment must be bool, got 'maybe'"):
        ServerConfig.load(env={"ONE2ONE_PIN_WORKERS": "maybe", "ONE2ONE_ARTIFACTS": "x"})


def test_a_killed_worker_is_replaced_and_service_continues(two_workers):
    proc, ready = two_workers
    victim = ready["worker_pids"][0]
    victim_cpus = os.sched_getaffinity(victim)
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
    # The replacement takes the dead worker's slot, and with it its CPU.
    (replacement,) = set(children) - set(ready["worker_pids"])
    assert os.sched_getaffinity(replacement) == victim_cpus
    # Counted (issue 22): one replacement, summed over the workers' metric files (the new
    # worker counts itself once it has imported the server, a moment after the fork).
    while time.monotonic() < deadline:
        if sample(scrape(ready["metrics_port"]), "one2one_worker_replacements_total") >= 1:
            break
        time.sleep(0.1)
    assert sample(scrape(ready["metrics_port"]), "one2one_worker_replacements_total") == 1
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


def test_count_listening_stops_at_the_first_worker_that_never_listened():
    r, w = os.pipe()
    os.write(w, b"r")  # one worker listened; the other died: its end of the pipe closed unwritten
    os.close(w)
    assert count_listening(r, 2) == 1
    r, w = os.pipe()
    os.write(w, b"rr")
    assert count_listening(r, 2) == 2
    os.close(w)


def _cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


@pytest.mark.parametrize("age", ["0.3", "0"])
def test_one_channel_moves_between_workers_only_with_a_connection_age(artifacts, tmp_path, age):
    # A channel keeps one connection, and the kernel gave that connection to one worker.
    # With max_connection_age_seconds the server has the client reconnect (GOAWAY) every
    # ~0.3 s, and each new connection is assigned again: over some 25 of them, one
    # channel's calls reach both workers, and calls in flight at a GOAWAY still succeed.
    proc, ready = start_server(
        artifacts, tmp_path, extra=["--workers", "2"], env={"ONE2ONE_MAX_CONNECTION_AGE_SECONDS": age}
    )
    try:
        workers = ready["worker_pids"]
        with grpc.insecure_channel(f"127.0.0.1:{ready['grpc_port']}") as ch:
            wait_serving(ch)
            stub = ranking_pb2_grpc.RankingServiceStub(ch)
            before = {pid: _cpu_seconds(pid) for pid in workers}
            calls, deadline = 0, time.monotonic() + 8.0
            while time.monotonic() < deadline:
                assert stub.Rank(pb.RankRequest(user_id="u2"), timeout=5).items
                calls += 1
            used = {pid: _cpu_seconds(pid) - before[pid] for pid in workers}
        share = min(used.values()) / max(sum(used.values()), 1e-9)
        print(
            f"\nmax_connection_age_seconds={age}: {calls} calls on one channel, "
            f"CPU seconds per worker {sorted(round(v, 2) for v in used.values())}"
        )
        if age == "0":
            assert share < 0.05  # one worker served the channel; the other only ticked
        else:
            assert share > 0.1
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


def test_a_negative_connection_age_is_refused():
    with pytest.raises(ValueError, match="max_connection_age_seconds -1.0 must be >= 0"):
        ServerConfig(artifacts="x", max_connection_age_seconds=-1.0).validate()


def test_a_worker_serves_the_model_its_supervisor_readied_before_the_fork(artifacts):
    """The scorer, exact head and scratch the supervisor built (ranking.ServingModel) are
    what the worker's ranker uses, not copies rebuilt after the fork."""
    from ranking import RankerConfig, RankingModel, ServingModel, resolve_current
    from server.model_manager import ModelManager

    serving = ServingModel(RankingModel(resolve_current(artifacts)))
    head = serving.exact_head(RankerConfig().exact_head_items)
    models = ModelManager(artifacts, RankerConfig(), preloaded=serving)
    assert models.load_current("startup")
    ranker = models.current()
    assert ranker.serving is serving and ranker.scorer is serving.scorer and ranker.scratch is serving.scratch
    assert ranker.ann.retriever.head is head
