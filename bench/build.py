"""The build-time benchmark: a default build of a synthetic shop against its floor, in one run.

The floor is what any build of this shop must spend: one ALS fit of all the data (the
build's own ``fit als`` step) plus one LightGBM lambdarank fit of the served size (as many
trees as the published ensemble has, on the reranker's training rows, every core). The
figure is the build's wall time over the floor, and its time per million events.

    python -m bench.build                      # 200k customers x 200k items x 3M events
    python -m bench.build --users 20000 --items 20000 --events-per-user 15   # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _shop(args) -> dict[str, Path]:
    from index_builder.synthetic import make_shop, write_shop

    work = args.work / f"shop-{args.users}-{args.items}-{args.categories}-{args.events_per_user}-{args.seed}"
    files = {n: work / f"{n}.parquet" for n in ("events", "items", "users")}
    if not all(p.exists() for p in files.values()):
        shop = make_shop(
            n_users=args.users,
            n_items=args.items,
            n_categories=args.categories,
            events_per_user=args.events_per_user,
            seed=args.seed,
        )
        files = write_shop(shop, work, "parquet")
    return files


def _lightgbm_floor(files: dict[str, Path], cfg, n_trees: int) -> tuple[float, int]:
    """Seconds of one lambdarank fit of ``n_trees`` trees on the reranker's rows, and the row count."""
    import lightgbm as lgb
    import numpy as np

    from index_builder.fit import fit, linear_scoring, read_inputs
    from index_builder.rerank_train import attributes_of, collect_rows
    from index_builder.splits import Protocol, positive_types, split
    from ranking import FEATURE_NAMES, Ranker

    inp = read_inputs(files["events"], files["items"], files["users"], cfg)
    names = ("temporal", "last_n") if cfg.rerank_split == "both" else (cfg.rerank_split,)
    parts = []
    for name in names:
        earlier, later = split(inp.events, Protocol(name, cfg.rerank_cutoff_quantile, cfg.rerank_holdout), cfg)
        model = fit(inp.with_events(earlier), cfg).model(linear_scoring(cfg, "floor"))
        parts.append(
            collect_rows(
                Ranker(model, reranker_features=True),
                later,
                cfg,
                positive_types(later, cfg),
                attributes_of(inp.users, model),
            )
        )
    X = np.concatenate([p.X for p in parts])
    y = np.concatenate([p.y for p in parts])
    groups = np.concatenate([p.groups for p in parts])
    params = {
        "objective": "lambdarank",
        "num_leaves": cfg.rerank_leaves,
        "learning_rate": cfg.rerank_learning_rate,
        "min_data_in_leaf": cfg.rerank_min_data_in_leaf,
        "feature_fraction": 0.9,
        "lambdarank_truncation_level": 20,
        "verbose": -1,
        "seed": cfg.random_seed,
        "deterministic": True,
        "force_row_wise": True,
        "num_threads": len(os.sched_getaffinity(0)),
    }
    t0 = time.perf_counter()
    lgb.train(params, lgb.Dataset(X, y, group=groups, feature_name=list(FEATURE_NAMES)), num_boost_round=n_trees)
    return time.perf_counter() - t0, len(y)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.build", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--users", type=int, default=200_000)
    p.add_argument("--items", type=int, default=200_000)
    p.add_argument("--categories", type=int, default=50)
    p.add_argument("--events-per-user", type=int, default=15)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one build setting")
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "one2one-bench-build")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "build.json")
    args = p.parse_args(argv)

    from index_builder.__main__ import _overrides
    from index_builder.build import build
    from index_builder.config import BuildConfig
    from ranking import Bundle

    cfg = BuildConfig.load(overrides=_overrides(args.set))
    t0 = time.perf_counter()
    files = _shop(args)
    print(
        f"shop: {args.users} customers x {args.items} items, made or read in {time.perf_counter() - t0:.1f} s",
        flush=True,
    )

    t0 = time.perf_counter()
    path = build(files["events"], files["items"], files["users"], args.work / "artifacts", cfg, show_progress=True)
    build_s = time.perf_counter() - t0
    manifest = Bundle(path, verify=False).manifest
    steps = {s["name"]: s["seconds"] for s in manifest["steps"]}
    n_events = manifest["counts"]["events"]
    scoring = manifest["scoring"]
    n_trees = int(scoring.get("training", {}).get("n_trees", 0) or 0)

    als_s = steps["fit als"]
    lgb_s, n_rows = _lightgbm_floor(files, cfg, n_trees) if n_trees else (0.0, 0)
    floor = als_s + lgb_s
    report = {
        "shop": {"customers": args.users, "items": args.items, "categories": args.categories, "events": n_events},
        "cpus": len(os.sched_getaffinity(0)),
        "build_seconds": round(build_s, 1),
        "build_seconds_per_million_events": round(build_s / (n_events / 1e6), 1),
        "floor": {
            "als_seconds": als_s,
            "lightgbm_seconds": round(lgb_s, 1),
            "lightgbm_trees": n_trees,
            "lightgbm_rows": n_rows,
            "seconds": round(floor, 1),
        },
        "build_over_floor": round(build_s / floor, 2) if floor else None,
        "steps": manifest["steps"],
        "trees_per_bag": scoring.get("training", {}).get("trees_per_bag"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))
    print(
        f"\nbuild {build_s:.0f} s = {report['build_over_floor']}x its floor "
        f"(ALS {als_s:.0f} s + LightGBM {lgb_s:.0f} s for {n_trees} trees); "
        f"{report['build_seconds_per_million_events']} s per million events"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
