"""The framework floor: a RankingService that answers a canned response of the real shape.

Same process model as the real server (forked workers sharing the port through
SO_REUSEPORT, pinned to their CPUs by the same rule, the same thread pool), so the
difference in throughput is what the ranking itself costs.
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
from concurrent import futures

from server.config import allowed_cpus
from server.workers import count_listening, pin_worker, worker_cpus, write_ready


def serve_one(port: int, max_workers: int, listening: int) -> None:
    """Serve in this (forked) process; one byte on the pipe ``listening`` once the port is open."""
    import grpc

    from one2one.v1 import ranking_pb2 as pb
    from one2one.v1 import ranking_pb2_grpc

    canned = pb.RankResponse(
        items=[pb.RankedItem(item_id=f"item{i:07d}", score=1.0 - i / 10) for i in range(10)],
        request_id="0" * 32, model_version="bare", strategy=pb.ONE_TO_ONE)

    class Bare(ranking_pb2_grpc.RankingServiceServicer):
        def Rank(self, request, context):
            return canned

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers),
                         options=[("grpc.so_reuseport", 1)])
    ranking_pb2_grpc.add_RankingServiceServicer_to_server(Bare(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    os.write(listening, b"1")
    os.close(listening)
    signal.signal(signal.SIGTERM, lambda *_: server.stop(1))
    server.wait_for_termination()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.bare_server", description=__doc__)
    p.add_argument("--workers", type=int, default=len(allowed_cpus()))
    p.add_argument("--max-workers", type=int, default=16, help="threads per process, as the real server")
    p.add_argument("--ready-file", required=True)
    a = p.parse_args(argv)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    pids = []
    cpus = worker_cpus(a.workers, allowed_cpus(), pin=True)
    readable, writable = os.pipe()
    for slot in range(a.workers):
        pid = os.fork()
        if pid == 0:
            try:
                os.close(readable)
                pin_worker(cpus, slot)
                serve_one(port, a.max_workers, writable)
            finally:
                os._exit(0)
        pids.append(pid)
    os.close(writable)

    def stop(*_):
        for pid in pids:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:  # exited already
                pass

    signal.signal(signal.SIGTERM, stop)
    started = count_listening(readable, a.workers)
    if started < a.workers:
        stop()
        raise SystemExit(f"a bare worker exited before listening ({started} of {a.workers} started)")
    write_ready(a.ready_file, {"grpc_port": port, "pid": os.getpid(), "worker_pids": pids})
    for pid in pids:
        os.waitpid(pid, 0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
