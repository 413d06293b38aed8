"""The benchmark's load generator against a real two-worker server on a real port."""

import asyncio
import signal
import subprocess
import sys

import grpc
import pytest

from bench.loadgen import run
from bench.run import measured_load
from server.demo import start_server, wait_serving


@pytest.fixture(scope="module")
def server(artifacts, tmp_path_factory):
    proc, ready = start_server(artifacts, tmp_path_factory.mktemp("loadgen"), extra=["--workers", "2"])
    with grpc.insecure_channel(f"127.0.0.1:{ready['grpc_port']}") as ch:
        wait_serving(ch)
    yield proc, ready
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=30)


@pytest.fixture
def users_file(tmp_path):
    path = tmp_path / "users.txt"
    path.write_text("".join(f"u{i}\n" for i in range(20)) + "new-visitor\n")
    return path


def test_load_run_reports_client_server_and_outside_server_times(server, users_file):
    proc, ready = server
    r = measured_load([proc.pid, *ready["worker_pids"]], ready["grpc_port"], users_file, 4, 120, 30)
    assert r["requests"] == 120 and r["errors"] == {} and r["qps"] > 0
    assert r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"] <= r["p999_ms"] <= r["max_ms"]
    srv, out = r["server"], r["outside_server"]
    # The server's time is measured inside the client's round trip, request by request,
    # so the difference is never negative and the client's median exceeds the server's.
    assert 0 < srv["p50_ms"] <= r["p50_ms"]
    assert out["p50_ms"] >= 0 and out["max_ms"] >= 0
    assert out["p50_ms"] <= r["p50_ms"] and out["max_ms"] <= r["max_ms"]
    # Every request was answered by one of the two workers, and both did some of the work.
    assert r["server_cpu_ms_per_request"] > 0
    assert len(r["worker_cpu_shares"]) == 2 and sum(r["worker_cpu_shares"]) == pytest.approx(1.0)


def test_a_budget_is_sent_and_counted(server, users_file):
    _, ready = server
    r = asyncio.run(
        run(f"127.0.0.1:{ready['grpc_port']}", 2, 40, 30, ["u1", "u2"], budget_ms=1, num_results=5, warmup=0)
    )
    assert r["requests"] == 40 and r["errors"] == {}
    # A 1 ms budget is too short for the full pipeline on every request: some degrade, none fail.
    assert r["degraded"] > 0


def test_bad_targets_and_empty_user_files_are_refused(tmp_path, users_file):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    cmd = [sys.executable, "-m", "bench.loadgen", "--target", "127.0.0.1:1", "--users", str(empty)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and f"--users {empty} holds no user ids" in out.stderr
    cmd = [sys.executable, "-m", "bench.loadgen", "--target", "10.0.0.1:50051", "--users", str(users_file)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "loopback targets only" in out.stderr
    assert out.stdout == ""  # nothing measured, nothing printed


def test_open_loop_keeps_its_arrival_rate_and_counts_overflow(server, users_file):
    from bench.loadgen import run_open_loop

    _, ready = server
    target = f"127.0.0.1:{ready['grpc_port']}"
    users = ["u1", "u2", "u3"]
    r = asyncio.run(run_open_loop(target, 50.0, 60, 30, users, budget_ms=0, num_results=5, warmup=0, seed=3))
    assert r["mode"] == "open" and r["arrivals"] == r["requests"] == 60 and r["errors"] == {} and r["overflow"] == 0
    # 60 Poisson arrivals at 50/s take about 1.2 s, whatever the answers do.
    assert 25 <= r["achieved_rate"] <= 100, r
    assert r["p50_ms"] <= r["p99_ms"] <= r["p999_ms"] <= r["max_ms"]
    # Each answer's server time (its trailer), the time from the send outside it, and how late
    # the generator sent: together at most the latency from the scheduled arrival.
    srv, out, late = r["server"], r["outside_server"], r["send_late"]
    assert 0 < srv["p50_ms"] and 0 <= late["p50_ms"] <= late["p99_ms"] == r["send_late_p99_ms"]
    assert srv["p50_ms"] + out["p50_ms"] <= r["max_ms"] and srv["max_ms"] <= r["max_ms"]
    # Far more arrivals than two outstanding requests can absorb: the rest overflow, and are
    # counted rather than sent late (a closed loop would have slowed down instead).
    flood = asyncio.run(
        run_open_loop(target, 5000.0, 400, 30, users, budget_ms=0, num_results=5, warmup=0, max_in_flight=2, seed=4)
    )
    assert flood["overflow"] > 0 and flood["arrivals"] == 400
    assert flood["requests"] + flood["overflow"] + sum(flood["errors"].values()) == 400
    with pytest.raises(SystemExit, match="rate must be > 0"):
        asyncio.run(run_open_loop(target, 0.0, 10, 5, users, budget_ms=0, num_results=5, warmup=0))
