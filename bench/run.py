"""The serving benchmark: synthetic shops of two shapes at scale, the real builder, the real
server under load (closed loop, then open loop at fixed arrival rates), against the
bare-gRPC floor, three work floors (bench.bare_server) and raw FAISS, in one run.

The server and the four floors serve side by side and take turns: at each concurrency,
``--rounds`` rounds of one closed-loop run each, the order turned every round, and each
figure is a server's median round. On a shared machine whose speed drifts by a third
within minutes, a ratio of runs taken one after another would read the drift; runs
interleaved read the servers.

Each shop (``SHOPS``) is built once per parameter set and served with its bundle's own
tuned settings (the builder's search effort and phased scoring) unless flags override
them. Prints every figure and writes ``<out>/report.json`` and ``<out>/report.md``: one
section and one targets table per shop. All traffic stays on 127.0.0.1; every load run
is bounded in requests and seconds.

    python -m bench.run                    # both shops at full size (SHOPS)
    python -m bench.run --items 20000 --users 20000 --requests 500   # a quick one: both shops that size
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from server.config import ServerConfig, allowed_cpus

ROOT = Path(__file__).resolve().parent.parent
# The work floors (bench.bare_server --work), each doing more of a Rank's work than the one before.
WORK_FLOORS = ("floor_search", "floor_score", "floor_features")


@dataclass(frozen=True)
class Shop:
    """The shape of one synthetic shop (``index_builder.synthetic.make_shop``'s parameters)."""

    users: int
    items: int
    categories: int
    events_per_user: int
    zipf: float  # power-law exponent of item popularity within a category
    about: str


STANDARD_ZIPF = 1.1  # make_shop's default; a bundle's cache key names any other exponent
SHOPS = {
    "standard": Shop(1_000_000, 1_000_000, 50, 8, STANDARD_ZIPF, "8 events per customer, 50 categories, zipf 1.1"),
    # Fewer events per customer (sparser histories, weaker factors), ten times the categories
    # and a flatter popularity (a longer tail: the exact head proves fewer searches, the
    # index must find more of the candidates).
    "flat": Shop(1_000_000, 1_000_000, 500, 3, 0.65, "3 events per customer, 500 categories, zipf 0.65"),
}


def memory_kb(pid: int) -> dict[str, int]:
    """Rss and Pss (shared pages split between the processes mapping them) of one process."""
    out = {}
    with open(f"/proc/{pid}/smaps_rollup") as fh:
        for line in fh:
            key, _, rest = line.partition(":")
            if key in ("Rss", "Pss"):
                out[key.lower() + "_kb"] = int(rest.split()[0])
    return out


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU the processes have used so far (threads included)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    return total / tick


def measured_load(pids: list[int], *args, **kwargs) -> dict:
    """One load run plus the server CPU it cost per request: machine cost, not wall time,
    so it holds up on a shared machine better than queries per second do.

    ``pids`` are the supervisor, then the workers. Each worker's share of the workers' CPU
    is recorded too: the kernel spreads connections, not requests, over the workers, so
    a few long-lived connections can load one worker more than another.
    """
    before = [cpu_seconds([pid]) for pid in pids]
    r = loadgen(*args, **kwargs)
    used = [cpu_seconds([pid]) - b for pid, b in zip(pids, before)]
    r["server_cpu_ms_per_request"] = sum(used) * 1000.0 / max(r["requests"], 1)
    workers = used[1:]
    r["worker_cpu_shares"] = [w / sum(workers) for w in workers] if len(workers) > 1 and sum(workers) > 0 else []
    return r


def start(cmd: list[str], ready: Path, log: Path, timeout: float = 300.0) -> tuple[subprocess.Popen, dict, float]:
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stderr=open(log, "w"), cwd=ROOT)
    while not ready.exists():
        if proc.poll() is not None:
            raise RuntimeError(f"{cmd[:4]} exited {proc.returncode}; see {log}")
        if time.perf_counter() - t0 > timeout:
            proc.kill()
            raise RuntimeError(f"{cmd[:4]} not ready after {timeout}s; see {log}")
        time.sleep(0.01)
    return proc, json.loads(ready.read_text()), time.perf_counter() - t0


def wait_serving(port: int, timeout: float = 120.0) -> float:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    t0 = time.perf_counter()
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while time.perf_counter() - t0 < timeout:
            try:
                if (
                    stub.Check(health_pb2.HealthCheckRequest(), timeout=2).status
                    == health_pb2.HealthCheckResponse.SERVING
                ):
                    return time.perf_counter() - t0
            except grpc.RpcError:
                pass
            time.sleep(0.01)
    raise RuntimeError("server never became SERVING")


def stop(proc: subprocess.Popen) -> int:
    proc.send_signal(signal.SIGTERM)
    return proc.wait(timeout=60)


def loadgen(
    port: int,
    users_file: Path,
    concurrency: int,
    requests: int,
    duration: float,
    budget_ms: int = 0,
    rate: float = 0.0,
    nice: int = 0,
) -> dict:
    """One bounded ``bench.loadgen`` run: closed loop at ``concurrency``, or open loop at
    ``rate`` arrivals per second when it is > 0 (``requests`` then bounds the arrivals);
    ``nice`` > 0 runs the generator at that lower scheduling priority."""
    cmd = [
        sys.executable,
        "-m",
        "bench.loadgen",
        "--target",
        f"127.0.0.1:{port}",
        "--users",
        str(users_file),
        "--concurrency",
        str(concurrency),
        "--requests",
        str(requests),
        "--duration",
        str(duration),
        "--budget-ms",
        str(budget_ms),
    ]
    if rate > 0:
        cmd += ["--rate", str(rate)]
    if nice > 0:
        cmd = ["nice", "-n", str(nice), *cmd]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=duration + 120)
    if done.returncode != 0:
        raise RuntimeError(f"loadgen failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def metrics_text(metrics_port: int) -> str:
    """The server's /metrics page."""
    return urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()


def scrape_stages(metrics_port: int) -> dict[str, float]:
    text = metrics_text(metrics_port)
    sums, counts = {}, {}
    for line in text.splitlines():
        if line.startswith("one2one_rank_stage_duration_seconds_sum{"):
            stage = line.split('stage="')[1].split('"')[0]
            sums[stage] = float(line.rsplit(" ", 1)[1])
        elif line.startswith("one2one_rank_stage_duration_seconds_count{"):
            stage = line.split('stage="')[1].split('"')[0]
            counts[stage] = float(line.rsplit(" ", 1)[1])
    return {s: 1000 * sums[s] / counts[s] for s in sums if counts.get(s)}


def scrape_gauge(metrics_port: int, name: str) -> float:
    """One unlabelled series of the server's metrics (NaN when absent)."""
    text = metrics_text(metrics_port)
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return float("nan")


def scrape_series(metrics_port: int, name: str) -> dict[str, float]:
    """Every series of one metric, by its label text ("" when unlabelled), e.g.
    ``{'source="bundle"': 16.0}``."""
    out = {}
    for line in metrics_text(metrics_port).splitlines():
        head, _, value = line.rpartition(" ")
        if head == name:
            out[""] = float(value)
        elif head.startswith(name + "{"):
            out[head[len(name) + 1 : -1]] = float(value)
    return out


def scrape_counters(metrics_port: int) -> dict[str, float]:
    """The server's own counts: late responses, responses, responses by retrieval path, and
    garbage-collector pauses by generation (``gc_count_<g>``, ``gc_seconds_<g>``)."""
    text = metrics_text(metrics_port)
    out = {"late": 0.0, "responses": 0.0}
    for line in text.splitlines():
        value = line.rsplit(" ", 1)[-1]
        if line.startswith("one2one_rank_late_total "):
            out["late"] = float(value)
        elif line.startswith("one2one_rank_responses_total{"):
            out["responses"] += float(value)
        elif line.startswith("one2one_rank_retrieval_total{"):
            out["retrieval_" + line.split('path="')[1].split('"')[0]] = float(value)
        elif line.startswith(("one2one_gc_pause_seconds_count{", "one2one_gc_pause_seconds_sum{")):
            kind = "count" if "_count{" in line else "seconds"
            out[f"gc_{kind}_" + line.split('generation="')[1].split('"')[0]] = float(value)
    return out


def _unservable(art: Path) -> str:
    """Why the current code cannot serve the cached bundle (built by older code), or ""."""
    from ranking import BundleError, Ranker, RankingModel

    try:
        Ranker(RankingModel(art / (art / "CURRENT").read_text().strip(), verify=False))
    except BundleError as exc:
        return str(exc)
    return ""


def build_bundle(a, work: Path) -> Path:
    """Generate the shop and run the real builder, once per parameter set (cached)."""
    from index_builder.synthetic import make_shop, write_shop

    zipf = getattr(a, "zipf", STANDARD_ZIPF)
    key = (
        (
            f"u{a.users}-i{a.items}-c{a.categories}-e{a.events_per_user}-d{a.dim}-{a.index_type}"
            f"-efc{a.ef_construction}-" + "-".join(a.build_set) + (f"-z{zipf:g}" if zipf != STANDARD_ZIPF else "")
        )
        .replace(",", "_")
        .replace('"', "")
        .replace("=", "")
    )
    data = work / key
    art = data / "artifacts"
    if (art / "CURRENT").exists():
        stale = _unservable(art)
        if getattr(a, "rebuild", False):
            # A bundle the current builder would make differently (new manifest sections) still
            # serves; only a fresh build shows what this code ships. The shop's files are kept.
            print(f"rebuilding (--rebuild): a new version under {art}", flush=True)
        elif not stale:
            print(f"reusing bundle {art}", flush=True)
            return art
        else:
            print(f"rebuilding: the cached bundle cannot be served by this code ({stale})", flush=True)
    paths = {name: data / f"{name}.parquet" for name in ("events", "items", "users")}
    if not all(p.exists() for p in paths.values()):
        t0 = time.perf_counter()
        shop = make_shop(
            n_users=a.users,
            n_items=a.items,
            n_categories=a.categories,
            events_per_user=a.events_per_user,
            zipf=zipf,
            seed=a.seed,
        )
        paths = write_shop(shop, data, "parquet")
        print(f"generated {shop.events.num_rows} events in {time.perf_counter() - t0:.1f}s", flush=True)
    t0 = time.perf_counter()
    cmd = [
        sys.executable,
        "-m",
        "index_builder",
        "build",
        "--quiet",
        "--events",
        str(paths["events"]),
        "--items",
        str(paths["items"]),
        "--users",
        str(paths["users"]),
        "--out",
        str(art),
        "--set",
        f"factors={a.dim}",
        "--set",
        f"iterations={a.iterations}",
        "--set",
        f'index_type="{a.index_type}"',
        "--set",
        "eval_users=500",
        "--set",
        f"hnsw_ef_construction={a.ef_construction}",
        "--set",
        "ladder_report=false",
    ]
    for extra in a.build_set:
        cmd += ["--set", extra]
    subprocess.run(cmd, check=True, cwd=ROOT)
    print(f"built bundle in {time.perf_counter() - t0:.1f}s", flush=True)
    return art


def _timed_ms(search, q: np.ndarray, batch: int) -> float:
    """Mean ms per query of ``search`` over ``q`` in batches of ``batch``, caches evicted before
    each call (in the server, other requests and processes run between two of one worker's)."""
    junk = np.zeros(32 << 20, np.uint8)  # larger than the last-level cache
    total = 0.0
    for i in range(0, len(q), batch):
        junk[::64] += 1
        t0 = time.perf_counter()
        search(q[i : i + batch])
        total += time.perf_counter() - t0
    return 1000 * total / len(q)


def load_times(art: Path, head_items: int):
    """Seconds to load the served bundle in process, piece by piece, its files already in
    the page cache (the build or the last run just read them): what a server's start-up
    and a hot reload spend before warm-up. Returns them with the model loaded and made ready
    to serve, exact head built, for :func:`raw_faiss`."""
    from ranking import Bundle, RankingModel, ServingModel, resolve_current

    path = resolve_current(art)
    index_file = path / "index.faiss"
    t0 = time.perf_counter()
    bundle = Bundle(path, verify=False)
    bundle.load_index()
    t1 = time.perf_counter()
    bundle.verify()
    t2 = time.perf_counter()
    model = ServingModel(RankingModel(path, verify=False))
    t3 = time.perf_counter()
    if head_items > 0:
        model.exact_head(head_items)
    t4 = time.perf_counter()
    return {
        "index_mb": index_file.stat().st_size / 2**20,
        "index_read_s": t1 - t0,
        "checksums_s": t2 - t1,
        "model_open_s": t3 - t2,
        "exact_head_s": t4 - t3,
    }, model


def raw_faiss(
    serving, n_queries: int, k: int, effort: int, head_items: int, refine: float = 1.0
) -> tuple[dict, list[str]]:
    """In-process retrieval for the same kind of queries: the ANN index alone and the server's
    retriever (exact head first), single and batched, and recall against exact search, on
    ``serving``, the ServingModel :func:`load_times` loaded. Both search as the server's ANN
    path does: at ``effort``, asking for ``ceil(k * refine)`` items re-ranked by the exact inner
    product (``refine``: the factor the server uses, ``ranking.effective_ann_refine``)."""
    import faiss

    from index_builder.ann_tuning import exact_top
    from index_builder.ann_tuning import recall as ann_recall
    from ranking import Retriever

    m = serving.model

    faiss.omp_set_num_threads(1)
    rng = np.random.default_rng(0)
    users = rng.choice(np.flatnonzero(np.asarray(m.user_has_history)), n_queries, replace=False)
    q = np.ascontiguousarray(m.user_factors[users], dtype=np.float32)
    out: dict = {
        "k": k,
        "effort": effort,
        "refine": refine,
        "index": type(faiss.downcast_index(m.index)).__name__,
        "exact_head_items": head_items,
    }
    # The ANN index alone is the server's retriever without the head: the same refining.
    alone = Retriever(m.index, None, m.item_factors, refine)
    retriever = Retriever(m.index, serving.exact_head(head_items) if head_items > 0 else None, m.item_factors, refine)
    paths = {"": lambda x: alone.search(x, k, effort)[0], "served_": lambda x: retriever.search(x, k, effort)[0]}
    for prefix, search in paths.items():
        search(q[:20])  # fault in
        out[f"{prefix}single_query_ms"] = _timed_ms(search, q, 1)
        for b in (8, 16):
            out[f"{prefix}batch{b}_per_query_ms"] = _timed_ms(search, q, b)
    exact = faiss.IndexFlatIP(m.item_factors.shape[1])
    exact.add(np.ascontiguousarray(m.item_factors))
    faiss.omp_set_num_threads(os.cpu_count() or 1)
    _, truth = exact.search(q, k)
    faiss.omp_set_num_threads(1)
    served, proven = retriever.search(q, k, effort)
    out["served_exact_share"] = float(proven.mean())
    # The builder's reading, by its own functions (index_builder.ann_tuning, what it chose the
    # effort for): the share of the exact top-k the served path finds.
    out["served_recall"] = ann_recall(exact_top(m.item_factors, q, k), served)
    # Two readings: the overlap of the whole candidate set with the exact top-k, and
    # how many of the exact top-10 (what a response shows) the candidate set holds.
    for prefix, got in (("", alone.search(q, k, effort)[0]), ("served_", served)):
        out[f"{prefix}recall_at_k"] = float(np.mean([len(np.intersect1d(t, g)) / k for t, g in zip(truth, got)]))
        out[f"{prefix}top10_in_candidates"] = float(
            np.mean([len(np.intersect1d(t[:10], g)) / 10 for t, g in zip(truth, got)])
        )
    users_ids = [str(m.users.ids[u]) for u in rng.choice(np.flatnonzero(np.asarray(m.user_has_history)), 5000)]
    return out, users_ids


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.run", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--shops",
        default=",".join(SHOPS),
        help=f"comma-separated shops to run, of {', '.join(SHOPS)} (their shapes: SHOPS in bench/run.py)",
    )
    p.add_argument("--items", type=int, help="items of every shop run (default: each shop's own)")
    p.add_argument("--users", type=int, help="users of every shop run (default: each shop's own)")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--iterations", type=int, default=3, help="ALS iterations (serving speed does not depend on them)")
    p.add_argument(
        "--index-type",
        default="HNSW32,SQ8",
        help="FAISS factory string; SQ8 codes make the graph walk 1.5x faster than Flat here, "
        "at 0.997 vs 1.000 exact top-10 within 200",
    )
    p.add_argument("--ef-construction", type=int, default=40)
    p.add_argument(
        "--effort",
        type=int,
        default=0,
        help="server ann_effort: efSearch / nprobe on the request path (0: each bundle's tuned effort)",
    )
    p.add_argument(
        "--second-phase",
        type=int,
        default=-1,
        help="server second_phase_candidates (-1: each bundle's own; 0: one phase)",
    )
    p.add_argument("--candidates", type=int, default=200)
    p.add_argument(
        "--exact-head-items",
        type=int,
        default=ServerConfig.exact_head_items,
        help="server exact_head_items: the largest-norm items searched exactly first (0: ANN only)",
    )
    p.add_argument("--ann-batch-size", type=int, default=8, help="server ann_batch_size (1: no micro-batching)")
    p.add_argument("--ann-batch-wait-us", type=float, default=300.0)
    p.add_argument("--workers", type=int, default=0, help="0: one per core")
    p.add_argument("--max-concurrent-ranks", type=int, default=1, help="server max_concurrent_ranks (0: no limit)")
    p.add_argument("--concurrency", default="1,4,8,16,32")
    p.add_argument("--requests", type=int, default=3000, help="per closed-loop run, upper bound")
    p.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="closed-loop runs per server and concurrency, the servers taking turns; each figure is the median",
    )
    p.add_argument("--duration", type=float, default=15.0, help="per load run, upper bound (s)")
    p.add_argument(
        "--open-loop",
        default="0.5,0.8",
        help="open-loop arrival rates, as shares of the server's measured saturation (closed-loop best qps)",
    )
    p.add_argument("--budget-ms", type=int, default=10, help="budget of the budgeted run")
    p.add_argument(
        "--budget-requests",
        type=int,
        default=10_000,
        help="upper bound of the budgeted run: its p99.9 needs thousands of requests "
        "(of 2000, it is the second slowest)",
    )
    p.add_argument(
        "--budget-nice",
        type=int,
        default=10,
        help="the generator's niceness in the budgeted run the targets read (1-19; the run is repeated at 0)",
    )
    p.add_argument("--seed", type=int, default=1)
    p.add_argument(
        "--build-set",
        action="append",
        default=["rerank_max_queries=5000", 'rerank_split="temporal"'],
        metavar="KEY=VALUE",
        help="extra build settings for every shop (the ladder report is always off here)",
    )
    p.add_argument(
        "--rebuild",
        action="store_true",
        help="build every shop's bundle anew (a new version in the cache) even when a cached one serves",
    )
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "one2one-bench")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "out")
    a = p.parse_args(argv)
    names = [n.strip() for n in a.shops.split(",") if n.strip()]
    unknown = [n for n in names if n not in SHOPS]
    if unknown or not names:
        p.error(f"--shops {a.shops!r}: unknown {unknown or 'none given'}; choose from {', '.join(SHOPS)}")
    shares = [float(x) for x in a.open_loop.split(",") if x.strip()]
    if any(not 0 < x for x in shares):
        p.error(f"--open-loop {a.open_loop!r}: every share must be > 0")
    if a.rounds < 1:
        p.error(f"--rounds {a.rounds}: at least one run per server and concurrency")
    if not 0 <= a.budget_nice <= 19:
        p.error(f"--budget-nice {a.budget_nice}: a niceness from 0 (the generator as an equal) to 19")
    a.work.mkdir(parents=True, exist_ok=True)
    a.out.mkdir(parents=True, exist_ok=True)
    report: dict = {"params": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()}, "shops": {}}
    for name in names:
        shape = SHOPS[name]
        shop_args = argparse.Namespace(
            **{
                **vars(a),
                "users": a.users or shape.users,
                "items": a.items or shape.items,
                "categories": shape.categories,
                "events_per_user": shape.events_per_user,
                "zipf": shape.zipf,
                "open_loop_shares": shares,
            }
        )
        print(f"== shop {name}: {shop_args.users} users x {shop_args.items} items, {shape.about}", flush=True)
        report["shops"][name] = run_shop(shop_args, name, shape)
        # Written after each shop, so a later shop's failure keeps the earlier one's figures.
        (a.out / "report.json").write_text(json.dumps(report, indent=1, default=float))
        (a.out / "report.md").write_text(markdown(report))
    print(markdown(report))
    return 0


def run_shop(a: argparse.Namespace, name: str, shape: Shop) -> dict:
    """Build (or reuse) one shop's bundle, serve it with its own settings and measure it.

    ``a`` carries the run's flags with this shop's parameters in place. Returns the
    shop's section of the report.
    """
    from ranking import RankerConfig, effective_ann_effort, effective_ann_refine, effective_second_phase

    report: dict = {
        "shape": {
            "users": a.users,
            "items": a.items,
            "categories": a.categories,
            "events_per_user": a.events_per_user,
            "zipf": a.zipf,
            "about": shape.about,
        }
    }
    art = build_bundle(a, a.work)
    manifest = json.loads(((art / (art / "CURRENT").read_text().strip()) / "manifest.json").read_text())
    report["build_seconds"] = manifest.get("build_seconds")
    report["events"] = (manifest.get("counts") or {}).get("events")
    report["bundle_retrieval"] = manifest.get("retrieval")
    report["bundle_phases"] = manifest.get("phases")
    # The effort the server will search with (the bench's --effort, else the bundle's tuned one).
    effort, effort_source = effective_ann_effort(RankerConfig(ann_effort=a.effort), manifest)
    # The refine factor likewise: the server is left at ann_refine = 0, the bundle's.
    refine, _ = effective_ann_refine(RankerConfig(ann_effort=a.effort), manifest)
    report["load"], model = load_times(art, a.exact_head_items)
    print("load:", json.dumps(report["load"]), flush=True)
    report["raw_faiss"], users = raw_faiss(model, 500, a.candidates, effort, a.exact_head_items, refine)
    print("raw faiss:", json.dumps(report["raw_faiss"]), flush=True)
    del model
    users_file = a.work / f"users-{name}.txt"
    users_file.write_text("\n".join(users))

    tmp = Path(tempfile.mkdtemp(prefix=f"one2one-bench-{name}-"))
    cfg = tmp / "server.toml"
    cfg.write_text(
        f"[server]\nworkers = {a.workers}\nann_effort = {a.effort}\nn_candidates = {a.candidates}\n"
        f"second_phase_candidates = {a.second_phase}\n"
        f"ann_batch_size = {a.ann_batch_size}\nann_batch_wait_us = {a.ann_batch_wait_us}\n"
        f"max_concurrent_ranks = {a.max_concurrent_ranks}\nexact_head_items = {a.exact_head_items}\n"
        f'log_level = "WARNING"\nreload_interval_seconds = 0\n'
    )

    def server(workers: int, tag: str):
        ready = tmp / f"ready-{tag}.json"
        cmd = [
            sys.executable,
            "-m",
            "server",
            "--artifacts",
            str(art),
            "--port",
            "0",
            "--metrics-port",
            "0",
            "--config",
            str(cfg),
            "--workers",
            str(workers),
            "--ready-file",
            str(ready),
        ]
        t0 = time.perf_counter()
        proc, info, _ = start(cmd, ready, tmp / f"server-{tag}.log")
        wait_serving(info["grpc_port"])
        return proc, info, time.perf_counter() - t0

    # Memory: one worker alone, then N workers (Pss splits shared pages fairly).
    proc1, info1, startup1 = server(1, "one")
    loadgen(info1["grpc_port"], users_file, 4, 200, 10)
    mem_one = memory_kb(proc1.pid)
    # The lone worker loaded the bundle itself: open, checksums and warm-up (with workers, the
    # supervisor loads it before forking and each worker only warms up).
    report["load"]["server_bundle_load_s"] = scrape_gauge(info1["metrics_port"], "one2one_bundle_load_duration_seconds")
    stop(proc1)
    proc, info, startup = server(a.workers, "n")
    loadgen(info["grpc_port"], users_file, 4, 400, 10)
    pids = info.get("worker_pids", [])
    mem_workers = [memory_kb(pid) for pid in pids]
    # Each worker's CPUs as the kernel has them (pin_workers: one CPU each with one worker per CPU).
    report["worker_cpus"] = [sorted(os.sched_getaffinity(pid)) for pid in pids]
    mem_sup = memory_kb(proc.pid)
    report["startup_to_serving_s"] = {"one_worker": startup1, "n_workers": startup}
    report["memory"] = {
        "one_worker": mem_one,
        "workers": mem_workers,
        "supervisor": mem_sup,
        "n_workers_pss_over_one_rss": (sum(m["pss_kb"] for m in mem_workers) + mem_sup["pss_kb"]) / mem_one["rss_kb"],
        "n_workers_rss_over_one_rss": sum(m["rss_kb"] for m in mem_workers) / mem_one["rss_kb"],
    }
    # What the server searches and scores with, as it reports it (after warm-up, which may cut
    # the second phase to fit its budget): the floors are given the same.
    port = info["metrics_port"]
    served_effort = scrape_series(port, "one2one_ann_effort")
    second = scrape_series(port, "one2one_second_phase_candidates").get("", float("nan"))
    report["serving"] = {
        "ann_effort": int(max(served_effort.values())) if served_effort else effort,
        "ann_effort_source": (
            max(served_effort, key=served_effort.__getitem__).split('"')[1] if served_effort else effort_source
        ),
        "bench_expected_ann_effort": effort,
        "second_phase_candidates": int(second) if second == second else 0,
        "second_phase_source": effective_second_phase(RankerConfig(second_phase_candidates=a.second_phase), manifest)[
            1
        ],
        "second_phase_cut": scrape_series(port, "one2one_second_phase_cut").get("", float("nan")),
        "first_phase_trees": scrape_series(port, "one2one_first_phase_trees").get("", float("nan")),
        "scoring_trees": scrape_series(port, "one2one_scoring_trees").get("", float("nan")),
        "scoring_candidate_us": 1e6 * scrape_series(port, "one2one_scoring_candidate_seconds").get("", float("nan")),
    }
    print(
        "startup:",
        report["startup_to_serving_s"],
        "memory:",
        {k: v for k, v in report["memory"].items() if k.startswith("n_")},
        "serving:",
        report["serving"],
        flush=True,
    )
    levels = [int(c) for c in a.concurrency.split(",")]
    server_pids = [proc.pid, *pids]
    loads_start = scrape_counters(port)

    # The floors, in the same process model: the framework alone, then with the request's
    # candidate search, then with the scorer too, then with the server's whole compiled call
    # (features written and scored) instead (bench.bare_server), searching and scoring with
    # the settings the server reported. They serve beside the server, idle but for their
    # own runs, so every ratio is read between runs minutes apart at most (module docstring).
    work = ["--artifacts", str(art), "--second-phase", str(report["serving"]["second_phase_candidates"])]
    floors = {
        "bare": [],
        "floor_search": [*work, "--work", "search"],
        "floor_score": [*work, "--work", "score"],
        "floor_features": [*work, "--work", "features"],
    }
    served = {"real": (server_pids, info["grpc_port"])}
    floor_procs = []
    for floor, extra in floors.items():
        fready = tmp / f"ready-{floor}.json"
        cmd = [
            sys.executable,
            "-m",
            "bench.bare_server",
            "--workers",
            str(a.workers or len(allowed_cpus())),
            "--ready-file",
            str(fready),
            "--candidates",
            str(a.candidates),
            "--effort",
            str(report["serving"]["ann_effort"]),
            "--exact-head-items",
            str(a.exact_head_items),
            "--ann-batch-size",
            str(a.ann_batch_size),
            "--ann-batch-wait-us",
            str(a.ann_batch_wait_us),
            *extra,
        ]
        fproc, finfo, _ = start(cmd, fready, tmp / f"{floor}.log")
        floor_procs.append(fproc)
        served[floor] = ([fproc.pid, *finfo.get("worker_pids", [])], finfo["grpc_port"])
    for _, grpc_port in served.values():  # every process warm before the first measured run
        loadgen(grpc_port, users_file, 4, 200, 10)

    # Closed loop: at each concurrency, rounds of one run per server, the order turned each
    # round; each server's figure at that level is its median round (by throughput).
    report["rounds_qps"] = {name: {} for name in served}
    for c in levels:
        runs: dict[str, list[dict]] = {name: [] for name in served}
        for i in range(a.rounds):
            order = list(served) if i % 2 == 0 else list(served)[::-1]
            for name in order:
                r = measured_load(served[name][0], served[name][1], users_file, c, a.requests, a.duration)
                runs[name].append(r)
                print(name, f"round {i}", json.dumps(r), flush=True)
        for name, rs in runs.items():
            report.setdefault(name, []).append(sorted(rs, key=lambda r: r["qps"])[len(rs) // 2])
            report["rounds_qps"][name][str(c)] = [r["qps"] for r in rs]

    # Open loop at fixed shares of the saturation just measured: requests arrive whatever the
    # answers do, so a slow answer cannot hide the queue behind it. Each rate then goes to the
    # empty server too: what the generator, the wire and gRPC alone make of the same arrivals.
    saturation = max(r["qps"] for r in report["real"])
    report["open_loop"], report["bare_open_loop"] = [], []
    for share in a.open_loop_shares:
        rate = share * saturation
        for name, key in (("real", "open_loop"), ("bare", "bare_open_loop")):
            r = measured_load(
                served[name][0], served[name][1], users_file, 0, max(int(rate * a.duration), 1), a.duration, rate=rate
            )
            r["share_of_saturation"] = share
            report[key].append(r)
            print(key, json.dumps(r), flush=True)
    # The budgeted run twice: the generator at a lower priority (the target's reading: on its
    # own machine nothing preempts the server for its client), then sharing the cores as an
    # equal (reported: what this box does to a budget when the client wins a core).
    for key, nice in (("budgeted", a.budget_nice), ("budgeted_shared", 0)):
        before = scrape_counters(port)
        budgeted = loadgen(
            info["grpc_port"], users_file, 8, a.budget_requests, a.duration, budget_ms=a.budget_ms, nice=nice
        )
        after = scrape_counters(port)
        # The server's own count over the same run (its warm-up requests included).
        budgeted["late_ratio"] = (after["late"] - before["late"]) / max(after["responses"] - before["responses"], 1.0)
        budgeted["generator_nice"] = nice
        report[key] = budgeted
        print(key, json.dumps(budgeted), flush=True)
    searches = after.get("retrieval_exact_head", 0.0) + after.get("retrieval_ann", 0.0)
    report["served_exact_share"] = after.get("retrieval_exact_head", 0.0) / max(searches, 1.0)
    # Garbage-collector pauses over every load run: the collector holds the GIL, so a pause
    # stalls every request in flight on its worker (server.gc_policy).
    report["gc_during_loads"] = {
        key: after.get(key, 0.0) - loads_start.get(key, 0.0) for key in after if key.startswith("gc_")
    }
    print("gc during loads", json.dumps(report["gc_during_loads"]), flush=True)
    report["stage_mean_ms"] = scrape_stages(port)
    # Stopped only now: a process exiting with a bundle mapped frees gigabytes, which is
    # no background to measure a tail against.
    for fproc in floor_procs:
        stop(fproc)
    stop(proc)

    report["summary"] = summarize(report, a.budget_ms, startup)
    report["targets"] = targets(report["summary"])
    return report


def _at_concurrency(runs: list[dict], c: int) -> dict:
    return next((r for r in runs if r["concurrency"] == c), runs[-1])


def summarize(report: dict, budget_ms: int, startup: float) -> dict:
    """The figures the targets and the report's first table read, from one shop's runs."""
    best_real = max(r["qps"] for r in report["real"])
    best_bare = max(r["qps"] for r in report["bare"])
    best_floor = {name: max(r["qps"] for r in report[name]) for name in WORK_FLOORS}
    c8 = _at_concurrency(report["real"], 8)
    floor_c8 = _at_concurrency(report["floor_score"], 8)
    budgeted, shared = report["budgeted"], report["budgeted_shared"]
    nan = float("nan")
    return {
        "saturation_qps": best_real,
        "bare_saturation_qps": best_bare,
        "throughput_ratio_vs_bare": best_real / best_bare,
        "throughput_ratio_vs_floor_score": best_real / best_floor["floor_score"],
        "throughput_ratio_vs_floor_features": best_real / best_floor["floor_features"],
        "floor_features_ratio_vs_floor_score": best_floor["floor_features"] / best_floor["floor_score"],
        **{f"{name}_saturation_qps": qps for name, qps in best_floor.items()},
        **{f"{name}_ratio_vs_bare": qps / best_bare for name, qps in best_floor.items()},
        "p99_ms_at_c8": c8["p99_ms"],
        "floor_score_p99_ms_at_c8": floor_c8["p99_ms"],
        "p99_at_c8_vs_floor_score": c8["p99_ms"] / floor_c8["p99_ms"],
        "server_p99_ms_at_c8": c8["server"].get("p99_ms", nan),
        "outside_server_p50_ms_at_c8": c8["outside_server"].get("p50_ms", nan),
        "open_loop": [
            {
                "share": r["share_of_saturation"],
                "rate": r["rate"],
                "requests": r["requests"],
                "p50_ms": r.get("p50_ms", nan),
                "p99_ms": r.get("p99_ms", nan),
                "p999_ms": r.get("p999_ms", nan),
                "degraded_ratio": r["degraded"] / max(r["requests"], 1),
                "overflow": r["overflow"],
                "errors": sum(r["errors"].values()),
                "send_late_p99_ms": r.get("send_late_p99_ms", nan),
                "server_p99_ms": r["server"].get("p99_ms", nan),
                "outside_server_p99_ms": r["outside_server"].get("p99_ms", nan),
                "bare_p50_ms": bare.get("p50_ms", nan),
                "bare_p99_ms": bare.get("p99_ms", nan),
                "bare_p999_ms": bare.get("p999_ms", nan),
                "p99_vs_bare": r.get("p99_ms", nan) / bare.get("p99_ms", nan),
            }
            for r, bare in zip(report["open_loop"], report["bare_open_loop"])
        ],
        "budgeted_p999_ms": budgeted["p999_ms"],
        "budget_ms": budget_ms,
        "budgeted_requests": budgeted["requests"],
        "budgeted_server_p999_ms": budgeted["server"].get("p999_ms", nan),
        "budgeted_degraded_ratio": budgeted["degraded"] / max(budgeted["requests"], 1),
        "budgeted_late_ratio": budgeted["late_ratio"],
        "budgeted_generator_nice": budgeted["generator_nice"],
        "shared_budgeted_server_p999_ms": shared["server"].get("p999_ms", nan),
        "shared_budgeted_degraded_ratio": shared["degraded"] / max(shared["requests"], 1),
        "shared_budgeted_late_ratio": shared["late_ratio"],
        "served_recall": report["raw_faiss"]["served_recall"],
        "ann_recall": report["raw_faiss"]["served_recall_at_k"],
        "ann_top10_in_candidates": report["raw_faiss"]["served_top10_in_candidates"],
        "served_exact_share": report["served_exact_share"],
        "startup_s": startup,
        "memory_ratio_pss": report["memory"]["n_workers_pss_over_one_rss"],
        "index_read_s": report["load"]["index_read_s"],
        "server_cpu_ms_per_request": statistics.median(r["server_cpu_ms_per_request"] for r in report["real"]),
        **{
            f"{name}_cpu_ms_per_request": statistics.median(r["server_cpu_ms_per_request"] for r in report[name])
            for name in ("bare", *WORK_FLOORS)
        },
    }


def targets(s: dict) -> list[dict]:
    """Issue 24's targets for one shop, each beside its figure: ``met`` is None for a figure
    that is only reported (no bound)."""
    rows: list[tuple[str, str, float, str, float | None]] = [
        (
            "saturation_vs_score_floor",
            "server saturation throughput / the score floor's",
            s["throughput_ratio_vs_floor_score"],
            ">=",
            0.8,
        ),
        ("saturation_vs_bare", "server saturation throughput / bare gRPC's", s["throughput_ratio_vs_bare"], ">=", 0.35),
        (
            "score_floor_vs_bare",
            "score floor saturation throughput / bare gRPC's",
            s["floor_score_ratio_vs_bare"],
            ">=",
            0.45,
        ),
        ("p99_c8_vs_score_floor", "p99 at concurrency 8 / the score floor's", s["p99_at_c8_vs_floor_score"], "<=", 1.3),
        (
            "features_floor_vs_score_floor",
            "features floor saturation throughput / the score floor's (the features' cost, with no service around)",
            s["floor_features_ratio_vs_floor_score"],
            "",
            None,
        ),
        (
            "saturation_vs_features_floor",
            "server saturation throughput / the features floor's (the service around the work)",
            s["throughput_ratio_vs_floor_features"],
            "",
            None,
        ),
    ]
    for o in s["open_loop"]:
        pct = f"{100 * o['share']:g}"
        bound = 5.0 if abs(o["share"] - 0.5) < 1e-9 else None
        rows.append(
            (f"open_loop_{pct}_p99_ms", f"open loop at {pct}% of saturation: p99 (ms)", o["p99_ms"], "<=", bound)
        )
        rows.append(
            (f"open_loop_{pct}_p999_ms", f"open loop at {pct}% of saturation: p99.9 (ms)", o["p999_ms"], "", None)
        )
        rows.append(
            (
                f"open_loop_{pct}_p99_vs_bare",
                f"open loop at {pct}% of saturation: p99 / the empty server's (bare gRPC) at the same rate",
                o["p99_vs_bare"],
                "",
                None,
            )
        )
    rows += [
        (
            "served_recall",
            "candidate recall of the served path (exact top-n_candidates)",
            s["served_recall"],
            ">=",
            0.95,
        ),
        (
            "budgeted_server_p999_ms",
            f"budgeted p99.9 server time (budget {s['budget_ms']} ms; "
            f"generator at nice {s['budgeted_generator_nice']})",
            s["budgeted_server_p999_ms"],
            "<=",
            s["budget_ms"] + 1.0,
        ),
        (
            "late_share",
            f"share of responses over budget + 1 ms (generator at nice {s['budgeted_generator_nice']})",
            s["budgeted_late_ratio"],
            "<=",
            0.001,
        ),
        (
            "shared_budgeted_server_p999_ms",
            "the same p99.9, the generator sharing the cores as an equal",
            s["shared_budgeted_server_p999_ms"],
            "",
            None,
        ),
        (
            "shared_late_share",
            "the same late share, the generator as an equal",
            s["shared_budgeted_late_ratio"],
            "",
            None,
        ),
        ("startup_s", "startup to SERVING (s)", s["startup_s"], "<=", 3.0),
        ("memory_ratio", "memory of N workers (sum Pss) / one worker (Rss)", s["memory_ratio_pss"], "<=", 1.3),
    ]
    out = []
    for key, what, figure, op, bound in rows:
        met = None
        if bound is not None:
            met = bool(figure >= bound) if op == ">=" else bool(figure <= bound)
        out.append({"target": key, "what": what, "figure": figure, "op": op, "bound": bound, "met": met})
    return out


def markdown(report: dict) -> str:
    """The whole report: the run's settings, then one section per shop."""
    params = report["params"]
    lines = [
        "# one2one serving benchmark",
        "",
        f"Shops: {', '.join(report['shops'])}; {params['dim']} dims, index {params['index_type']}, "
        f"{params['candidates']} candidates, num_results 10, workers {params['workers'] or len(allowed_cpus())}; "
        f"search effort {'each bundle' + chr(39) + 's own' if params['effort'] == 0 else params['effort']}, "
        f"second phase {'each bundle' + chr(39) + 's own' if params['second_phase'] < 0 else params['second_phase']}.",
        "",
    ]
    for name, r in report["shops"].items():
        lines += shop_markdown(name, r, params)
    return "\n".join(lines) + "\n"


def _figure(value: float) -> str:
    if value != value:
        return "nan"
    return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"


def shop_markdown(name: str, r: dict, params: dict) -> list[str]:
    """One shop's section: its targets, its figures, the load table and the details."""
    s, sh, sv = r["summary"], r["shape"], r["serving"]
    lines = [
        f"## Shop `{name}`: {sh['users']} users x {sh['items']} items, {sh['categories']} categories, "
        f"{sh['events_per_user']} events per user, zipf {sh['zipf']:g}",
        "",
        f"{r['events']} events; built in {r['build_seconds']} s. Served with search effort {sv['ann_effort']} "
        f"({sv['ann_effort_source']}) and second phase {sv['second_phase_candidates']} "
        f"({sv['second_phase_source']}; 0: one phase; cut to fit the budget: {sv['second_phase_cut']:g}; "
        f"trees {sv['scoring_trees']:g}, first phase {sv['first_phase_trees']:g}, "
        f"{sv['scoring_candidate_us']:.2f} us per candidate scored); the floors search and score the same. "
        f"Workers' CPUs: {r.get('worker_cpus')}.",
        "",
        "### Targets",
        "",
        "| target | figure | bound | met |",
        "|---|---|---|---|",
    ]
    for t in r["targets"]:
        met = "reported" if t["met"] is None else ("met" if t["met"] else "**not met**")
        bound = "" if t["bound"] is None else f"{t['op']} {t['bound']:g}"
        lines.append(f"| {t['what']} | **{_figure(t['figure'])}** | {bound} | {met} |")
    lines += [
        "",
        "### Figures",
        "",
        "| figure | value |",
        "|---|---|",
        f"| saturation throughput: server / score floor / bare gRPC | {s['saturation_qps']:.0f} / "
        f"{s['floor_score_saturation_qps']:.0f} / {s['bare_saturation_qps']:.0f} qps |",
        f"| p99 at concurrency 8: server / score floor (the server's own p99 {s['server_p99_ms_at_c8']:.2f} ms; "
        f"outside it, p50 {s['outside_server_p50_ms_at_c8']:.2f} ms) | {s['p99_ms_at_c8']:.2f} / "
        f"{s['floor_score_p99_ms_at_c8']:.2f} ms |",
        f"| p99.9 server time with budget {s['budget_ms']} ms, c=8, {s['budgeted_requests']} requests, "
        f"the generator at nice {s['budgeted_generator_nice']} "
        f"(client: {s['budgeted_p999_ms']:.2f} ms; {100 * s['budgeted_degraded_ratio']:.1f}% degraded) "
        f"| {s['budgeted_server_p999_ms']:.2f} ms |",
        f"| responses over budget + 1 ms in that run (`one2one_rank_late_total`) | "
        f"{100 * s['budgeted_late_ratio']:.2f}% |",
        f"| the same run with the generator at normal priority: p99.9 server time; degraded; over budget + 1 ms | "
        f"{s['shared_budgeted_server_p999_ms']:.2f} ms; {100 * s['shared_budgeted_degraded_ratio']:.1f}%; "
        f"{100 * s['shared_budgeted_late_ratio']:.2f}% |",
        f"| served path's recall of the exact top-{r['raw_faiss']['k']} (the builder's reading; "
        f"the builder measured {_built_recall(r)}) | {s['served_recall']:.3f} |",
        f"| exact top-10 within the {r['raw_faiss']['k']} served candidates | {s['ann_top10_in_candidates']:.3f} |",
        f"| embedding searches the exact head proved exact, in the server (in process) | "
        f"{s['served_exact_share']:.3f} ({r['raw_faiss']['served_exact_share']:.3f}) |",
        f"| startup to SERVING | {s['startup_s']:.2f} s |",
        f"| index load (read into memory, {r['load']['index_mb']:.0f} MB, files in the page cache) | "
        f"{s['index_read_s']:.3f} s |",
        f"| memory of N workers (sum Pss) / one worker (Rss) | {s['memory_ratio_pss']:.2f} |",
        f"| server CPU per request (median over the closed-loop runs): one2one / bare gRPC | "
        f"{s['server_cpu_ms_per_request']:.3f} / {s['bare_cpu_ms_per_request']:.3f} ms |",
        f"| work floor: bare gRPC + the request's candidate search only | "
        f"{s['floor_search_saturation_qps']:.0f} qps = {s['floor_search_ratio_vs_bare']:.2f} of bare; "
        f"{s['floor_search_cpu_ms_per_request']:.3f} ms CPU per request |",
        f"| work floor: + the scorer over a served-size feature matrix | "
        f"{s['floor_score_saturation_qps']:.0f} qps = {s['floor_score_ratio_vs_bare']:.2f} of bare; "
        f"{s['floor_score_cpu_ms_per_request']:.3f} ms CPU per request |",
        f"| work floor: the search + the server's compiled call (merge, features, scoring) on prepared requests | "
        f"{s['floor_features_saturation_qps']:.0f} qps = {s['floor_features_ratio_vs_bare']:.2f} of bare; "
        f"{s['floor_features_cpu_ms_per_request']:.3f} ms CPU per request |",
        "",
        "### Closed loop",
        "",
        "Client latency, the server's own time (its trailer) and, request by request, the difference: "
        "time outside the server's measure (load generator, wire, and the worker before the call reaches "
        "its Python code, whose clock starts before the call waits for a Rank thread, and after the "
        "handler returns). Worker CPU split: each worker's share of the workers' CPU in the run. "
        f"Each row is a server's median of {params['rounds']} rounds, the servers taking turns "
        "(`rounds_qps` in report.json has every round).",
        "",
        "| concurrency | real qps | p50 | p90 | p99 | p99.9 | server p50 / p99 | outside server p50 / p99 "
        "| CPU ms/req | worker CPU split | bare qps | bare p99 | bare CPU ms/req "
        "| search floor qps / p99 / CPU ms/req | score floor qps / p99 / CPU ms/req "
        "| features floor qps / p99 / CPU ms/req |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for real, bare, *floors in zip(r["real"], r["bare"], *(r[name] for name in WORK_FLOORS)):
        srv, out = real.get("server", {}), real.get("outside_server", {})
        split = " / ".join(f"{100 * v:.0f}%" for v in real.get("worker_cpu_shares", [])) or "-"
        lines.append(
            f"| {real['concurrency']} | {real['qps']:.0f} | {real['p50_ms']:.2f} | {real['p90_ms']:.2f} | "
            f"{real['p99_ms']:.2f} | {real['p999_ms']:.2f} | "
            f"{srv.get('p50_ms', float('nan')):.2f} / {srv.get('p99_ms', float('nan')):.2f} | "
            f"{out.get('p50_ms', float('nan')):.2f} / {out.get('p99_ms', float('nan')):.2f} | "
            f"{real['server_cpu_ms_per_request']:.3f} | {split} | "
            f"{bare['qps']:.0f} | {bare['p99_ms']:.2f} | {bare['server_cpu_ms_per_request']:.3f} | "
            + " | ".join(f"{f['qps']:.0f} / {f['p99_ms']:.2f} / {f['server_cpu_ms_per_request']:.3f}" for f in floors)
            + " |"
        )
    lines += [
        "",
        "### Open loop",
        "",
        "Poisson arrivals at a fixed share of the saturation above (`bench.loadgen --rate`); latency "
        "from each scheduled arrival. Overflow: arrivals that found the generator's in-flight limit full. "
        "Send lateness: how far behind its schedule the generator itself sent (p99), the machine's share "
        "of the tail. Server p99: the server's own time (its trailer); outside: latency from the send "
        "less it. Bare: the empty server (the framework floor) at the same rate, the same generator.",
        "",
        "| share of saturation | rate (/s) | requests | p50 | p99 | p99.9 | server p99 | outside server p99 "
        "| degraded | overflow | errors | send lateness p99 | CPU ms/req | bare p50 / p99 / p99.9 |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for o, run in zip(s["open_loop"], r["open_loop"]):
        lines.append(
            f"| {100 * o['share']:.0f}% | {o['rate']:.0f} | {o['requests']} | {o['p50_ms']:.2f} | {o['p99_ms']:.2f} | "
            f"{o['p999_ms']:.2f} | {o['server_p99_ms']:.2f} | "
            f"{o['outside_server_p99_ms']:.2f} | {100 * o['degraded_ratio']:.1f}% | "
            f"{o['overflow']} | {o['errors']} | {o['send_late_p99_ms']:.2f} ms | "
            f"{run['server_cpu_ms_per_request']:.3f} | {o['bare_p50_ms']:.2f} / "
            f"{o['bare_p99_ms']:.2f} / {o['bare_p999_ms']:.2f} |"
        )
    rf = r["raw_faiss"]
    pauses = r.get("gc_during_loads", {})
    ld = r["load"]
    lines += [
        "",
        "### In-process retrieval (same queries, caches evicted before each search)",
        "",
        f"{rf['index']} alone at effort {rf['effort']}, refine {rf['refine']:g}: single query "
        f"{rf['single_query_ms']:.3f} ms; batched per query: 8 -> {rf['batch8_per_query_ms']:.3f} ms, "
        f"16 -> {rf['batch16_per_query_ms']:.3f} ms; "
        f"top-10 within the candidates {rf['top10_in_candidates']:.3f}, set recall {rf['recall_at_k']:.3f}.",
        "",
        f"As served (exact head of {rf['exact_head_items']} items first): single query "
        f"{rf['served_single_query_ms']:.3f} ms; batched per query: 8 -> {rf['served_batch8_per_query_ms']:.3f} ms, "
        f"16 -> {rf['served_batch16_per_query_ms']:.3f} ms; {rf['served_exact_share']:.3f} proven exact.",
        "",
        "### Server stages (mean ms)",
        "",
        ", ".join(f"{k} {v:.3f}" for k, v in r["stage_mean_ms"].items()),
        "",
        "### Loading the bundle (files in the page cache)",
        "",
        f"In process: the index read {ld['index_read_s']:.3f} s ({ld['index_mb']:.0f} MB); "
        f"checksums of every file {ld['checksums_s']:.3f} s; the model opened without them "
        f"{ld['model_open_s']:.3f} s (index included); the exact head built {ld['exact_head_s']:.3f} s. "
        f"In a one-worker server (`one2one_bundle_load_duration_seconds`: open, checksums and "
        f"warm-up) {ld.get('server_bundle_load_s', float('nan')):.3f} s.",
        "",
        "### Garbage-collector pauses during the load runs (all workers)",
        "",
        "; ".join(
            f"generation {g}: {pauses.get(f'gc_count_{g}', 0.0):.0f} collections, "
            f"{1000 * pauses.get(f'gc_seconds_{g}', 0.0):.1f} ms in all"
            for g in "012"
        ),
        "",
        "### Memory (kB)",
        "",
        "```",
        json.dumps(r["memory"], indent=1),
        "```",
        "",
    ]
    return lines


def _built_recall(r: dict) -> str:
    """The recall the builder measured at the effort it chose, from the manifest."""
    section = r.get("bundle_retrieval") or {}
    chosen = [e for e in section.get("efforts", []) if e.get("effort") == section.get("ann_effort")]
    if not chosen:
        return "nothing (the bundle records no tuning)"
    return f"{chosen[0]['served_recall']:.3f} at effort {section['ann_effort']} on {section.get('users')} users"


if __name__ == "__main__":
    raise SystemExit(main())
