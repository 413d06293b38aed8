"""The bench's framework floor: real forked workers on a real port, as the bench starts them."""
import signal
import sys

from bench.run import measured_load, start


def test_bare_floor_is_ready_only_when_every_worker_listens_and_answers_the_real_shape(tmp_path):
    users = tmp_path / "users.txt"
    users.write_text("u1\nu2\n")
    ready = tmp_path / "ready.json"
    proc, info, _ = start([sys.executable, "-m", "bench.bare_server", "--workers", "2", "--ready-file", str(ready)],
                          ready, tmp_path / "bare.log", timeout=60)
    try:
        assert len(info["worker_pids"]) == 2 and info["pid"] == proc.pid
        # The load generator's first (warm-up) requests go out right after the ready file.
        r = measured_load([proc.pid, *info["worker_pids"]], info["grpc_port"], users, 4, 200, 30)
        assert r["requests"] == 200 and r["errors"] == {} and r["degraded"] == 0
        assert len(r["worker_cpu_shares"]) == 2
        # The canned answer carries no server-time trailer, so no per-request pairing.
        assert r["server"] == {} and r["outside_server"] == {}
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    assert not (tmp_path / "ready.json.tmp").exists()
