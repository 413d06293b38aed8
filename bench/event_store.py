"""The shared event store against the local one, in one run on one bundle.

    python -m bench.event_store                          # 100k customers, 50k items
    python -m bench.event_store --users 1000000 --items 1000000

1. builds (or reuses, cached as bench.run does) the synthetic shop's bundle;
2. starts a real redis-server on a loopback port (AOF on, ``appendfsync always``: the
   settings under which an OK is durable) with its data in a temporary directory;
3. for each store (``local``, then ``redis``) starts the real server (one worker per core),
   gives every bench customer real-time state (``--events-per-customer`` clicks and
   purchases through RecordEvents), then measures:
   - Rank at saturation (``bench.loadgen``, the best of the concurrency levels), with the
     server's mean and p99 round trip to the store per Rank (its metrics);
   - RecordEvents closed loop at ``--record-concurrency`` for batches of 1 and of 100 events:
     batches/s, events/s, p50 and p99 latency;
4. times, in process, a Rank's read of heavy buyers' state (``--heavy-purchases``): read
   whole on every Rank (a store that keeps none), a pod's first read, kept, and right after
   another pod wrote one more purchase;
5. prints and writes ``<out>/event_store.json``: every figure, and the ratio of Redis's Rank
   throughput to the local store's (target >= 0.8).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.loadgen import percentiles
from bench.portfolio import parse_bench_args, shop_arguments, users_with_history
from bench.redis_server import RedisServer
from bench.run import build_bundle, cpu_seconds, measured_load, metrics_text, start, stop, wait_serving

ROOT = Path(__file__).resolve().parent.parent


def item_ids(art: Path, n: int, seed: int) -> list[str]:
    from ranking import RankingModel, resolve_current

    model = RankingModel(resolve_current(art))
    rng = np.random.default_rng(seed)
    rows = rng.choice(len(model.items), size=min(n, len(model.items)), replace=False)
    return list(model.items.id_of(rows))


async def record_load(port: int, batches: list[list[tuple]], concurrency: int) -> dict:
    """RecordEvents closed loop: ``concurrency`` calls in flight until every batch is sent."""
    import grpc

    from one2one.v1 import ranking_pb2 as pb
    from one2one.v1 import ranking_pb2_grpc

    channels = [grpc.aio.insecure_channel(f"127.0.0.1:{port}") for _ in range(min(concurrency, 4))]
    stubs = [ranking_pb2_grpc.RankingServiceStub(c) for c in channels]
    reqs = [
        pb.RecordEventsRequest(events=[pb.Event(user_id=u, item_id=i, event_type=t, value=v) for u, i, t, v in batch])
        for batch in batches
    ]
    lat: list[float] = []
    errors: dict[str, int] = {}
    accepted = 0
    next_i = 0

    async def worker(w: int) -> None:
        nonlocal next_i, accepted
        stub = stubs[w % len(stubs)]
        while next_i < len(reqs):
            req = reqs[next_i]
            next_i += 1
            t0 = time.perf_counter()
            try:
                resp = await stub.RecordEvents(req, timeout=30)
            except grpc.aio.AioRpcError as exc:
                errors[exc.code().name] = errors.get(exc.code().name, 0) + 1
                continue
            lat.append((time.perf_counter() - t0) * 1000)
            accepted += resp.accepted_count

    t0 = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    elapsed = time.perf_counter() - t0
    for c in channels:
        await c.close()
    return {
        "batches": len(lat),
        "events_accepted": accepted,
        "seconds": elapsed,
        "batches_per_s": len(lat) / elapsed,
        "events_per_s": accepted / elapsed,
        **percentiles(np.asarray(lat)),
        "errors": errors,
    }


def make_batches(users: list[str], items: list[str], n_batches: int, size: int, seed: int) -> list[list[tuple]]:
    rng = random.Random(seed)
    kinds = ("view", "click", "click", "add_to_cart", "purchase")
    return [
        [(rng.choice(users), rng.choice(items), (k := rng.choice(kinds)), 9.5 if k == "purchase" else 0.0)]
        + [(rng.choice(users), rng.choice(items), rng.choice(kinds), 0.0) for _ in range(size - 1)]
        for _ in range(n_batches)
    ]


def store_round_trip(metrics_port: int) -> dict[str, float]:
    """Mean and an upper bound of p99 (the histogram bucket it falls in) of Rank's store reads, in ms."""
    text = metrics_text(metrics_port)
    buckets, total, count = [], 0.0, 0.0
    for line in text.splitlines():
        if 'op="rank_read"' not in line:
            continue
        value = float(line.rsplit(" ", 1)[1])
        if line.startswith("one2one_event_store_round_trip_seconds_bucket{"):
            le = line.split('le="')[1].split('"')[0]
            buckets.append((float("inf") if le == "+Inf" else float(le), value))
        elif line.startswith("one2one_event_store_round_trip_seconds_sum{"):
            total = value
        elif line.startswith("one2one_event_store_round_trip_seconds_count{"):
            count = value
    if not count:
        return {}
    buckets.sort()
    p99 = next(le for le, c in buckets if c >= 0.99 * count)
    return {"reads": count, "mean_ms": 1000 * total / count, "p99_at_most_ms": 1000 * p99}


def measure(
    store: str,
    a,
    art: Path,
    users_file: Path,
    users: list[str],
    items: list[str],
    tmp: Path,
    redis_pid: int,
    workers: int,
) -> dict:
    cfg = tmp / f"server-{store.split(':')[0]}.toml"
    cfg.write_text(
        f'[server]\nworkers = {workers}\nlog_level = "WARNING"\nreload_interval_seconds = 0\n'
        f'event_store = "{store}"\nevent_log_dir = "{tmp / ("events-" + store.split(":")[0])}"\n'
    )
    ready = tmp / f"ready-{store.split(':')[0]}.json"
    cmd = [sys.executable, "-m", "server", "--artifacts", str(art), "--port", "0", "--metrics-port", "0"]
    cmd += ["--config", str(cfg), "--ready-file", str(ready)]
    proc, info, _ = start(cmd, ready, tmp / f"server-{store.split(':')[0]}.log")
    out: dict = {"store": store.split("?")[0].split(":")[0]}
    try:
        port = info["grpc_port"]
        wait_serving(port)
        # Every bench customer gets real-time state, so each Rank has something to read.
        seed_batches = [
            [(u, random.Random(f"{a.seed}-{u}-{k}").choice(items), "click", 0.0) for k in range(a.events_per_customer)]
            for u in users
        ]
        out["seed"] = asyncio.run(record_load(port, seed_batches, a.record_concurrency))
        pids = [proc.pid, *info.get("worker_pids", [])]
        measured_load(pids, port, users_file, 4, 500, 10)  # warm-up
        runs = []
        keys = ("concurrency", "qps", "requests", "errors", "degraded", "p50_ms", "p99_ms")
        keys += ("server_cpu_ms_per_request", "redis_cpu_ms_per_request")
        for c in (int(x) for x in a.concurrency.split(",")):
            # CPU per Rank of the server's processes and of redis-server, which shares this
            # machine's cores with them here (in a cluster it has its own).
            redis_before = cpu_seconds([redis_pid])
            r = measured_load(pids, port, users_file, c, a.requests, a.duration)
            r["redis_cpu_ms_per_request"] = (cpu_seconds([redis_pid]) - redis_before) * 1000 / max(r["requests"], 1)
            runs.append({k: r[k] for k in keys if k in r})
            print(out["store"], "rank", json.dumps(runs[-1]), flush=True)
        out["rank_runs"] = runs
        best = max(runs, key=lambda r: r["qps"])
        out["rank_saturation_per_s"] = best["qps"]
        out["server_cpu_ms_per_rank"] = best["server_cpu_ms_per_request"]
        out["redis_cpu_ms_per_rank"] = best["redis_cpu_ms_per_request"]
        out["store_round_trip_per_rank"] = store_round_trip(info["metrics_port"])
        for size in (1, 100):
            n = a.record_batches if size == 1 else max(a.record_batches // 20, 50)
            batches = make_batches(users, items, n, size, a.seed + size)
            r = asyncio.run(record_load(port, batches, a.record_concurrency))
            out[f"record_batch_{size}"] = r
            print(out["store"], f"record batch={size}", json.dumps(r), flush=True)
    finally:
        stop(proc)
    return out


def heavy_buyers(url: str, sizes: list[int], rounds: int = 15) -> dict:
    """A Rank's read of a heavy buyer's state, in process on the bench's redis-server: median
    milliseconds of ``held`` over ``rounds`` reads each, with the customer's purchases read
    whole on every Rank (a store that keeps none: how every read went before stores kept
    them), by a pod that holds nothing yet, kept (nothing new), and right after another pod
    wrote one more purchase."""
    from ranking import Event, RedisEventStore

    def timed(store: RedisEventStore, user: str) -> float:
        t = time.perf_counter()
        store.held(user)
        return time.perf_counter() - t

    writer = RedisEventStore(url, read_timeout_s=5.0)
    writer.check_meta()
    whole_every_time = RedisEventStore(url, read_timeout_s=5.0, held_purchases=0)
    out: dict = {}
    for n in sizes:
        user = f"heavy-{n}"
        t0 = 1.7e9
        bought = [Event(user, f"item-{k % max(n // 5, 1)}", "purchase", t0 + 3600.0 * k) for k in range(n)]
        for k in range(0, n, 500):
            writer.append(bought[k : k + 500])
        times: dict[str, list[float]] = {"whole_every_rank": [], "first": [], "kept": [], "after_a_purchase": []}
        for _ in range(rounds):
            times["whole_every_rank"].append(timed(whole_every_time, user))
            first = RedisEventStore(url, read_timeout_s=5.0)
            times["first"].append(timed(first, user))
            first.close()
        pod = RedisEventStore(url, read_timeout_s=5.0)
        pod.held(user)
        times["kept"] = [timed(pod, user) for _ in range(rounds)]
        for r in range(rounds):
            writer.append([Event(user, "one-more", "purchase", t0 + 3600.0 * (n + r))])
            times["after_a_purchase"].append(timed(pod, user))
        if len(pod.held(user).purchases) != n + rounds:
            raise RuntimeError(f"{user}: read {len(pod.held(user).purchases)} purchases, wrote {n + rounds}")
        pod.close()
        out[str(n)] = {k: 1000.0 * float(np.median(v)) for k, v in times.items()}
        print("heavy buyer", n, json.dumps({k: round(v, 3) for k, v in out[str(n)].items()}), flush=True)
    writer.close()
    whole_every_time.close()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.event_store", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    shop_arguments(p)
    p.set_defaults(items=50_000, users=100_000)  # the store's cost does not grow with the catalogue
    p.add_argument("--workers", type=int, default=0, help="server workers (0: one per core)")
    p.add_argument("--customers", type=int, default=2000, help="bench customers, each given real-time state")
    p.add_argument("--events-per-customer", type=int, default=10)
    p.add_argument("--concurrency", default="8,16", help="Rank load levels; the best is the saturated throughput")
    p.add_argument("--requests", type=int, default=6000, help="per Rank load run, upper bound")
    p.add_argument("--duration", type=float, default=15.0, help="per Rank load run, upper bound (s)")
    p.add_argument("--record-batches", type=int, default=3000, help="RecordEvents batches of 1 (of 100: 1/20)")
    p.add_argument(
        "--record-concurrency", type=int, default=4, help="RecordEvents in flight (below the events role ceiling)"
    )
    p.add_argument(
        "--heavy-purchases",
        default="1000,5000",
        help="purchases of the heavy buyers whose state read is timed in process (empty: none)",
    )
    a, workers, report = parse_bench_args(p, argv)
    heavy = [int(x) for x in a.heavy_purchases.split(",") if x.strip()]
    if any(n < 1 for n in heavy):
        p.error(f"--heavy-purchases {a.heavy_purchases!r}: every count must be >= 1")

    art = build_bundle(a, a.work)
    tmp = Path(tempfile.mkdtemp(prefix="one2one-bench-store-"))
    users = users_with_history(art, a.customers, a.seed)
    users_file = tmp / "users.txt"
    users_file.write_text("\n".join(users))
    items = item_ids(art, 20_000, a.seed)
    with RedisServer(tmp / "redis") as redis:
        report["redis"] = {"version": redis.client().info("server")["redis_version"], "appendfsync": "always"}
        assert redis.proc is not None
        report["heavy_buyers"] = heavy_buyers(f"{redis.url}?prefix=heavy", heavy) if heavy else {}
        report["local"] = measure("local", a, art, users_file, users, items, tmp, redis.proc.pid, workers)
        report["shared"] = measure(
            f"{redis.url}?prefix=bench", a, art, users_file, users, items, tmp, redis.proc.pid, workers
        )
    local, shared = report["local"], report["shared"]
    report["rank_ratio_redis_to_local"] = shared["rank_saturation_per_s"] / local["rank_saturation_per_s"]
    for size in (1, 100):
        key = f"record_batch_{size}"
        report[f"record_ratio_redis_to_local_batch_{size}"] = shared[key]["events_per_s"] / local[key]["events_per_s"]
    (a.out / "event_store.json").write_text(json.dumps(report, indent=2, default=float))
    print()
    print("| figure | local | redis | redis / local |")
    print("|---|---|---|---|")
    print(
        f"| Rank at saturation (/s) | {local['rank_saturation_per_s']:.0f} | {shared['rank_saturation_per_s']:.0f} "
        f"| **{report['rank_ratio_redis_to_local']:.2f}** (target >= 0.8) |"
    )
    print(
        f"| CPU per Rank (ms): server; redis-server | {local['server_cpu_ms_per_rank']:.3f} | "
        f"{shared['server_cpu_ms_per_rank']:.3f}; {shared['redis_cpu_ms_per_rank']:.3f} | "
        f"{shared['server_cpu_ms_per_rank'] / local['server_cpu_ms_per_rank']:.2f} (server only) |"
    )
    rt = shared["store_round_trip_per_rank"]
    if rt:
        print(f"| store round trip per Rank (ms) | - | mean {rt['mean_ms']:.3f}, p99 <= {rt['p99_at_most_ms']:.3f} | |")
    for size in (1, 100):
        lo, sh = local[f"record_batch_{size}"], shared[f"record_batch_{size}"]
        print(
            f"| RecordEvents, batches of {size}: events/s | {lo['events_per_s']:.0f} | {sh['events_per_s']:.0f} "
            f"| {report[f'record_ratio_redis_to_local_batch_{size}']:.2f} |"
        )
        print(f"| RecordEvents, batches of {size}: p99 (ms) | {lo['p99_ms']:.2f} | {sh['p99_ms']:.2f} | |")
    if report["heavy_buyers"]:
        print()
        print("| heavy buyer's state read (ms) | whole on every Rank | first read | kept | after a purchase |")
        print("|---|---|---|---|---|")
        for n, f in report["heavy_buyers"].items():
            print(
                f"| {n} purchases | {f['whole_every_rank']:.2f} | {f['first']:.2f} | {f['kept']:.2f} "
                f"| {f['after_a_purchase']:.2f} ({f['whole_every_rank'] / f['after_a_purchase']:.0f}x fewer ms) |"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
