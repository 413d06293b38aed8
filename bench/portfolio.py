"""The portfolio run's throughput against the server's saturated Rank throughput, in one run on one bundle.

    python -m bench.portfolio                                # the standard 1M-customer shop
    python -m bench.portfolio --users 50000 --items 50000    # a quick one

1. builds (or reuses, cached as bench.run does) the synthetic shop's bundle;
2. starts the real server (one worker per core, the default pipeline settings), drives it with
   ``bench.loadgen`` at several concurrency levels (bounded, 127.0.0.1) and keeps the best
   throughput: the saturated Rank throughput;
3. stops it and runs ``python -m index_builder portfolios`` for every customer with history
   (k = 10, the same pipeline settings, one worker per core), sampling the memory of its
   processes (Rss, and Pss, which splits shared pages between the processes mapping them);
4. prints and writes ``<out>/portfolio.json``: customers/s of the ranking phase and end to
   end, their ratio to the server's saturated Rank/s (target >= 1.5), and the peak memory.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from bench.run import build_bundle, loadgen, memory_kb, start, stop, wait_serving
from server.config import allowed_cpus

ROOT = Path(__file__).resolve().parent.parent


def _children(pid: int) -> list[int]:
    """Children of every thread of ``pid`` (a JVM starts its Python workers from other threads)."""
    out: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as fh:
                out += [int(x) for x in fh.read().split()]
        except OSError:
            continue
    return out


def _descendants(pid: int) -> list[int]:
    """Children, theirs, and so on (a Spark run: the JVM, its Python daemon and workers)."""
    out, todo = [], _children(pid)
    while todo:
        child = todo.pop()
        out.append(child)
        todo += _children(child)
    return out


class MemorySampler:
    """Samples the summed Rss and Pss of a process and its descendants until stopped; keeps the peaks."""

    def __init__(self, pid: int, every: float = 0.25):
        self.pid, self.every = pid, every
        self.peak = {"rss_kb": 0, "pss_kb": 0, "processes": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            total = {"rss_kb": 0, "pss_kb": 0}
            pids = [self.pid, *_descendants(self.pid)]
            for pid in pids:
                try:
                    m = memory_kb(pid)
                except OSError:
                    continue
                total["rss_kb"] += m.get("rss_kb", 0)
                total["pss_kb"] += m.get("pss_kb", 0)
            for k, v in total.items():
                self.peak[k] = max(self.peak[k], v)
            self.peak["processes"] = max(self.peak["processes"], len(pids))
            self._stop.wait(self.every)

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join()
        return self.peak


def users_with_history(art: Path, n: int, seed: int) -> list[str]:
    from ranking import RankingModel, resolve_current

    m = RankingModel(resolve_current(art), verify=False)
    rows = np.flatnonzero(np.asarray(m.user_has_history))
    rows = np.random.default_rng(seed).choice(rows, min(n, len(rows)), replace=False)
    return [str(u) for u in m.users.id_of(rows)]


def shop_arguments(p: argparse.ArgumentParser) -> None:
    """The shop and bundle: bench.run's parameters and cache (the same key reuses its bundle)."""
    p.add_argument("--items", type=int, default=1_000_000)
    p.add_argument("--users", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--categories", type=int, default=50)
    p.add_argument("--events-per-user", type=int, default=8)
    p.add_argument("--iterations", type=int, default=3)
    p.add_argument("--index-type", default="HNSW32,SQ8")
    p.add_argument("--ef-construction", type=int, default=40)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument(
        "--build-set", action="append", default=["rerank_max_queries=5000", 'rerank_split="temporal"'], metavar="K=V"
    )


def parse_bench_args(p: argparse.ArgumentParser, argv: list[str] | None) -> tuple[argparse.Namespace, int, dict]:
    """Add ``--work`` and ``--out``, parse, make both directories; returns the arguments, the
    workers (``--workers``, 0: one per core) and a report holding the parameters."""
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "one2one-bench")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "out")
    a = p.parse_args(argv)
    a.work.mkdir(parents=True, exist_ok=True)
    a.out.mkdir(parents=True, exist_ok=True)
    workers = a.workers or len(allowed_cpus())
    report: dict = {"params": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()}}
    report["params"]["workers_resolved"] = workers
    return a, workers, report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.portfolio", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    shop_arguments(p)
    p.add_argument("--workers", type=int, default=0, help="server workers and portfolio workers (0: one per core)")
    p.add_argument("--concurrency", default="4,8,16,32", help="load levels; the best is the saturated throughput")
    p.add_argument("--requests", type=int, default=6000, help="per load run, upper bound")
    p.add_argument("--duration", type=float, default=15.0, help="per load run, upper bound (s)")
    p.add_argument("--k", type=int, default=10)
    a, workers, report = parse_bench_args(p, argv)

    art = build_bundle(a, a.work)
    tmp = Path(tempfile.mkdtemp(prefix="one2one-bench-portfolio-"))
    users_file = tmp / "users.txt"
    users_file.write_text("\n".join(users_with_history(art, 5000, a.seed)))

    # The server: default pipeline settings (the portfolio run's), one worker per core.
    cfg = tmp / "server.toml"
    cfg.write_text(f'[server]\nworkers = {workers}\nlog_level = "WARNING"\nreload_interval_seconds = 0\n')
    ready = tmp / "ready.json"
    cmd = [sys.executable, "-m", "server", "--artifacts", str(art), "--port", "0", "--metrics-port", "-1"]
    cmd += ["--config", str(cfg), "--ready-file", str(ready)]
    proc, info, _ = start(cmd, ready, tmp / "server.log")
    try:
        wait_serving(info["grpc_port"])
        loadgen(info["grpc_port"], users_file, 4, 500, 10)  # warm-up
        runs = []
        for c in (int(x) for x in a.concurrency.split(",")):
            r = loadgen(info["grpc_port"], users_file, c, a.requests, a.duration)
            runs.append({k: r[k] for k in ("concurrency", "qps", "requests", "errors", "p50_ms", "p99_ms") if k in r})
            print("server", json.dumps(runs[-1]), flush=True)
    finally:
        stop(proc)
    best = max(runs, key=lambda r: r["qps"])
    report["server"] = {"runs": runs, "saturation_rank_per_s": best["qps"]}

    campaign = tmp / "campaign.toml"
    campaign.write_text(f'name = "bench"\n[offers]\nk = {a.k}\n')
    out = tmp / "portfolios"
    cmd = [sys.executable, "-m", "index_builder", "portfolios", "--artifacts", str(art), "--campaign", str(campaign)]
    cmd += ["--out", str(out), "--workers", str(workers), "--quiet"]
    t0 = time.perf_counter()
    run = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sampler = MemorySampler(run.pid)
    _, stderr = run.communicate()
    wall = time.perf_counter() - t0
    peak = sampler.stop()
    if run.returncode != 0:
        raise RuntimeError(f"portfolio run failed: {stderr[-2000:]}")
    manifest = json.loads((out / "manifest.json").read_text())
    n = manifest["customers"]
    rank_s = manifest["timings_seconds"]["rank_and_write"]
    size = sum(f.stat().st_size for f in out.rglob("*.parquet"))
    report["portfolio"] = {
        "customers": n,
        "rows": sum(arm["offers"] for arm in manifest["arms"].values()),
        "wall_seconds": round(wall, 2),
        "load_seconds": manifest["timings_seconds"]["load"],
        "rank_and_write_seconds": rank_s,
        "customers_per_second_ranking": round(n / rank_s, 1),
        "customers_per_second_end_to_end": round(n / wall, 1),
        "seconds_per_million_customers": round(wall / n * 1e6, 1),
        "peak_memory": peak,
        "parquet_bytes": size,
        "strategies": {arm: a_["strategies"] for arm, a_ in manifest["arms"].items()},
    }
    sat = report["server"]["saturation_rank_per_s"]
    report["ratio_ranking_vs_server"] = round(n / rank_s / sat, 2)
    report["ratio_end_to_end_vs_server"] = round(n / wall / sat, 2)
    report["target_ratio"] = 1.5
    print("portfolio", json.dumps(report["portfolio"]), flush=True)
    print(
        f"portfolio {n / rank_s:.0f} customers/s ranking ({n / wall:.0f} end to end) vs server {sat:.0f} Rank/s "
        f"saturated: {report['ratio_ranking_vs_server']:.2f}x ({report['ratio_end_to_end_vs_server']:.2f}x); "
        f"peak memory Pss {peak['pss_kb'] / 1024:.0f} MiB, Rss {peak['rss_kb'] / 1024:.0f} MiB "
        f"over {peak['processes']} processes",
        flush=True,
    )
    (a.out / "portfolio.json").write_text(json.dumps(report, indent=2) + "\n")
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
