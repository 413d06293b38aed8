"""The portfolio run's Spark engine against its local engine on one machine: same bundle, campaign and cores.

    python -m bench.portfolio_spark --users 50000 --items 50000

1. builds (or reuses, cached as bench.run does) the synthetic shop's bundle;
2. runs ``python -m index_builder portfolios`` for every customer with history (k = 10) with the
   local engine (one worker per core), then with ``--engine spark --spark-master local[N]``
   (N = the cores), sampling the memory of each run's process tree (the Spark run's holds the
   JVM and its Python workers);
3. checks both wrote the same offers, then prints and writes ``<out>/portfolio_spark.json``:
   customers/s of each (ranking phase and end to end), the Spark run's ratio to the local run,
   its start-up (JVM, bundle loads) and the peak memory of each.

On one machine the local engine is the reference: what Spark costs on top of it is what a
cluster's extra machines must win back.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.portfolio import ROOT, MemorySampler, parse_bench_args, shop_arguments
from bench.run import build_bundle


def run_engine(art: Path, campaign: Path, out: Path, engine_args: list[str]) -> dict:
    """One portfolio run through the CLI: its manifest, wall time and peak memory."""
    cmd = [sys.executable, "-m", "index_builder", "portfolios", "--artifacts", str(art), "--campaign", str(campaign)]
    cmd += ["--out", str(out), "--quiet", *engine_args]
    env = {**os.environ, "SPARK_LOCAL_IP": "127.0.0.1"}  # local mode binds the loopback
    t0 = time.perf_counter()
    run = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sampler = MemorySampler(run.pid)
    _, stderr = run.communicate()
    wall = time.perf_counter() - t0
    peak = sampler.stop()
    if run.returncode != 0:
        raise RuntimeError(f"portfolio run {engine_args} failed: {stderr[-2000:]}")
    manifest = json.loads((out / "manifest.json").read_text())
    n = manifest["customers"]
    rank_s = manifest["timings_seconds"]["rank_and_write"]
    return {
        "engine": manifest.get("engine", "local"),
        "customers": n,
        "wall_seconds": round(wall, 2),
        "load_seconds": manifest["timings_seconds"]["load"],
        "rank_and_write_seconds": rank_s,
        "customers_per_second_ranking": round(n / rank_s, 1),
        "customers_per_second_end_to_end": round(n / wall, 1),
        "peak_memory": peak,
        "spark": manifest.get("spark"),
    }


def offers(out: Path) -> list[tuple]:
    from index_builder.portfolio import read_dataset

    t = read_dataset(out, "portfolios").select(["user_id", "rank", "item_id", "arm"])
    return sorted(zip(*(t.column(c).to_pylist() for c in t.column_names)))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.portfolio_spark",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    shop_arguments(p)
    p.add_argument("--workers", type=int, default=0, help="local workers and Spark's local[N] (0: one per core)")
    p.add_argument("--chunk-size", type=int, default=2000, help="customers per chunk (local) and per task (Spark)")
    p.add_argument("--k", type=int, default=10)
    a, workers, report = parse_bench_args(p, argv)

    art = build_bundle(a, a.work)
    tmp = Path(tempfile.mkdtemp(prefix="one2one-bench-portfolio-spark-"))
    try:
        campaign = tmp / "campaign.toml"
        campaign.write_text(f'name = "bench"\n[offers]\nk = {a.k}\n')
        chunk = ["--chunk-size", str(a.chunk_size)]
        local = run_engine(art, campaign, tmp / "local", ["--workers", str(workers), *chunk])
        print("local", json.dumps(local), flush=True)
        master = ["--engine", "spark", "--spark-master", f"local[{workers}]"]
        spark = run_engine(art, campaign, tmp / "spark", master + chunk)
        print("spark", json.dumps(spark), flush=True)
        same = offers(tmp / "local") == offers(tmp / "spark")
        if not same:
            raise RuntimeError("the engines wrote different offers")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report |= {"local": local, "spark": spark, "same_offers": same}
    report["ratio_spark_vs_local_ranking"] = round(
        spark["customers_per_second_ranking"] / local["customers_per_second_ranking"], 2
    )
    report["ratio_spark_vs_local_end_to_end"] = round(
        spark["customers_per_second_end_to_end"] / local["customers_per_second_end_to_end"], 2
    )
    print(
        f"{local['customers']} customers: local {local['customers_per_second_ranking']:.0f} customers/s ranking "
        f"({local['wall_seconds']:.1f} s end to end), spark local[{workers}] "
        f"{spark['customers_per_second_ranking']:.0f} ({spark['wall_seconds']:.1f} s): "
        f"{report['ratio_spark_vs_local_ranking']:.2f}x ranking, {report['ratio_spark_vs_local_end_to_end']:.2f}x "
        f"end to end; peak Pss local {local['peak_memory']['pss_kb'] / 1024:.0f} MiB, "
        f"spark {spark['peak_memory']['pss_kb'] / 1024:.0f} MiB",
        flush=True,
    )
    (a.out / "portfolio_spark.json").write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
