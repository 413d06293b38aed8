"""A bounded gRPC load generator for Rank, run as its own process, loopback only.

Closed loop: ``concurrency`` in-flight requests over several channels (so SO_REUSEPORT
spreads connections over the server's workers), until ``requests`` are done or
``duration`` seconds pass. Prints one JSON object: QPS, latency percentiles, errors,
degraded responses, the server's own time per request (its ``one2one-server-ms``
trailer) and, request by request, the client's latency less that server time: the
time outside the server's own measure (in the load generator, on the wire, and in the
server before the call reaches its Python code and after the handler returns), which
no server-side figure shows. The server's clock starts when the call reaches its
Python code, before the call waits for a Rank thread, so that wait is inside it.

Open loop (``--rate R``): requests arrive at R per second whatever the answers do (Poisson
arrivals, seeded), so a slow answer cannot hold back the requests behind it and hide the
queue they would have met. Each latency runs from the request's scheduled arrival, not
from when the generator got round to sending it (no coordinated omission); arrivals that
find ``--max-in-flight`` requests outstanding are counted as ``overflow``, not sent.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time

import grpc
import numpy as np

from one2one.v1 import ranking_pb2 as pb
from one2one.v1 import ranking_pb2_grpc


async def server_ms_of(call: grpc.aio.UnaryUnaryCall) -> float | None:
    """The server's own time of an answered call (its ``one2one-server-ms`` trailer), if sent."""
    for key, value in await call.trailing_metadata() or ():
        if key == "one2one-server-ms":
            return float(value)
    return None


def percentiles(lat_ms: np.ndarray) -> dict[str, float]:
    if len(lat_ms) == 0:
        return {}
    p = np.percentile(lat_ms, [50, 90, 99, 99.9])
    return {"p50_ms": p[0], "p90_ms": p[1], "p99_ms": p[2], "p999_ms": p[3], "max_ms": float(lat_ms.max())}


async def run(
    target: str,
    concurrency: int,
    requests: int,
    duration: float,
    users: list[str],
    budget_ms: int,
    num_results: int,
    warmup: int,
) -> dict:
    if not target.startswith(("127.", "localhost", "[::1]")):
        raise SystemExit(f"refusing to load {target}: loopback targets only")
    n_channels = min(concurrency, 8)
    channels = [
        grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)]) for _ in range(n_channels)
    ]
    stubs = [ranking_pb2_grpc.RankingServiceStub(c) for c in channels]
    reqs = [pb.RankRequest(user_id=u, num_results=num_results, budget_ms=budget_ms) for u in users]
    for i in range(warmup):
        await stubs[i % n_channels].Rank(reqs[i % len(reqs)], timeout=10)
    lat: list[float] = []
    server_ms: list[float] = []
    outside_ms: list[float] = []  # per request with a server time: client latency less it
    errors: dict[str, int] = {}
    degraded = 0
    counter = 0
    stop_at = time.perf_counter() + duration

    async def worker(w: int) -> None:
        nonlocal counter, degraded
        stub = stubs[w % n_channels]
        while counter < requests and time.perf_counter() < stop_at:
            i = counter
            counter += 1
            t0 = time.perf_counter()
            try:
                call = stub.Rank(reqs[i % len(reqs)], timeout=10)
                resp = await call
                ms = (time.perf_counter() - t0) * 1000
                lat.append(ms)
                degraded += resp.degraded
                srv = await server_ms_of(call)
                if srv is not None:
                    server_ms.append(srv)
                    outside_ms.append(ms - srv)
            except grpc.aio.AioRpcError as exc:
                errors[exc.code().name] = errors.get(exc.code().name, 0) + 1

    t0 = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    elapsed = time.perf_counter() - t0
    for c in channels:
        await c.close()
    arr = np.asarray(lat)
    return {
        "concurrency": concurrency,
        "requests": len(lat),
        "seconds": elapsed,
        "qps": len(lat) / elapsed if elapsed > 0 else 0.0,
        **percentiles(arr),
        "errors": errors,
        "degraded": degraded,
        "server": percentiles(np.asarray(server_ms)),
        "outside_server": percentiles(np.asarray(outside_ms)),
    }


async def run_open_loop(
    target: str,
    rate: float,
    requests: int,
    duration: float,
    users: list[str],
    budget_ms: int,
    num_results: int,
    warmup: int,
    max_in_flight: int = 1000,
    seed: int = 0,
) -> dict:
    """Requests at ``rate`` per second (Poisson arrivals) until ``requests`` have arrived or
    ``duration`` seconds pass; latency from each scheduled arrival."""
    if not target.startswith(("127.", "localhost", "[::1]")):
        raise SystemExit(f"refusing to load {target}: loopback targets only")
    if rate <= 0:
        raise SystemExit(f"--rate must be > 0, got {rate}")
    channels = [grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)]) for _ in range(8)]
    stubs = [ranking_pb2_grpc.RankingServiceStub(c) for c in channels]
    reqs = [pb.RankRequest(user_id=u, num_results=num_results, budget_ms=budget_ms) for u in users]
    for i in range(warmup):
        await stubs[i % len(stubs)].Rank(reqs[i % len(reqs)], timeout=10)
    gaps = np.random.default_rng(seed).exponential(1.0 / rate, size=requests)
    lat: list[float] = []
    errors: dict[str, int] = {}
    degraded = overflow = in_flight = 0
    late_sends: list[float] = []  # how far behind its schedule each send went out (ms)
    server_ms: list[float] = []
    outside_ms: list[float] = []  # per request with a server time: latency from the send, less it
    tasks = []

    async def one(i: int, due: float) -> None:
        nonlocal degraded, in_flight
        sent = time.perf_counter()
        late_sends.append((sent - due) * 1000)
        try:
            call = stubs[i % len(stubs)].Rank(reqs[i % len(reqs)], timeout=10)
            resp = await call
            done = time.perf_counter()
            lat.append((done - due) * 1000)
            degraded += resp.degraded
            srv = await server_ms_of(call)
            if srv is not None:
                server_ms.append(srv)
                outside_ms.append((done - sent) * 1000 - srv)
        except grpc.aio.AioRpcError as exc:
            errors[exc.code().name] = errors.get(exc.code().name, 0) + 1
        finally:
            in_flight -= 1

    t0 = time.perf_counter()
    due = t0
    for i in range(requests):
        due += gaps[i]
        if due - t0 > duration:
            break
        wait = due - time.perf_counter()
        if wait > 0:
            await asyncio.sleep(wait)
        if in_flight >= max_in_flight:
            overflow += 1
            continue
        in_flight += 1
        tasks.append(asyncio.ensure_future(one(i, due)))
    await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - t0
    for c in channels:
        await c.close()
    sent = len(tasks)
    return {
        "mode": "open",
        "rate": rate,
        "arrivals": sent + overflow,
        "requests": len(lat),
        "seconds": elapsed,
        "achieved_rate": (sent + overflow) / elapsed if elapsed > 0 else 0.0,
        **percentiles(np.asarray(lat)),
        "errors": errors,
        "degraded": degraded,
        "overflow": overflow,
        "send_late_p99_ms": float(np.percentile(late_sends, 99)) if late_sends else 0.0,
        "send_late": percentiles(np.asarray(late_sends)),
        "server": percentiles(np.asarray(server_ms)),
        "outside_server": percentiles(np.asarray(outside_ms)),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.loadgen", description=__doc__)
    p.add_argument("--target", required=True, help="127.0.0.1:PORT")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--requests", type=int, default=2000, help="upper bound on requests")
    p.add_argument("--duration", type=float, default=20.0, help="upper bound on seconds")
    p.add_argument("--users", required=True, help="file with one user id per line")
    p.add_argument("--budget-ms", type=int, default=0)
    p.add_argument("--num-results", type=int, default=10)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--rate", type=float, default=0.0, help="open loop: arrivals per second (0: closed loop)")
    p.add_argument("--max-in-flight", type=int, default=1000, help="open loop: arrivals beyond are overflow")
    a = p.parse_args(argv)
    with open(a.users, encoding="utf-8") as fh:
        users = fh.read().split()
    if not users:
        p.error(f"--users {a.users} holds no user ids (one per line)")
    if a.rate > 0:
        out = asyncio.run(
            run_open_loop(
                a.target,
                a.rate,
                a.requests,
                a.duration,
                users,
                a.budget_ms,
                a.num_results,
                a.warmup,
                a.max_in_flight,
            )
        )
    else:
        out = asyncio.run(
            run(a.target, a.concurrency, a.requests, a.duration, users, a.budget_ms, a.num_results, a.warmup)
        )
    json.dump(out, sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
