"""Benchmark: one Rank in process, stage by stage, on a built bundle.

``python -m bench.stages --bundle DIR`` answers real requests (customers with history,
drawn at random from the whole bundle, each asked once, so the caches are as cold as a
server's under traffic from many customers) with the bundle's own pipeline
(``Ranker.rank``, no server around it) and prints the median milliseconds of each stage
the pipeline times (resolve, retrieve, features, score) and of the whole call, plus the
process CPU per request; then the median Rank of visitors the bundle never saw, whose ids
(UUIDs) are shaped unlike its customers', and of customers with real-time events since the
bundle (their overlay built, then the Rank), and of heavy buyers: customers with thousands of
purchases since the bundle (``--heavy-purchases``), read from the real-time state as the server
reads them, on their first Rank after a purchase and on the next. Run it on two checkouts to see what a change
to the Rank path moved; nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import json
import time
import uuid
from pathlib import Path

import numpy as np

from ranking import Event, Ranker, RankingModel, RankQuery, UserStateStore, build_overlay, resolve_current


def _realtime_ranks(model, ranker, uids, rng, n_events: int, n_purchases: int = 0) -> tuple[list[list[float]], int]:
    """Customers with ``n_events`` real-time events since the bundle (views, every third a
    purchase) and ``n_purchases`` more purchases (of a tenth as many items, over a week), read
    from the real-time state, their overlay built and ranked with, as the server does, twice
    each: the milliseconds of each round, and how many got a re-solved vector. With
    ``n_purchases``, the customer is ranked once (not timed) and then buys one more item a
    minute after their last purchase, so the first round is the Rank right after a purchase."""
    t_end = float(model.manifest["data_window"]["end_unix"])
    state = UserStateStore(durable_types=tuple(model.manifest["config"].get("consumed_event_types", ["purchase"])))
    rounds: list[list[float]] = [[], []]
    folded = 0
    for uid in uids:
        items = model.items.ids[rng.integers(0, len(model.items), n_events)]
        events = [
            Event(uid, str(it), "purchase" if i % 3 == 2 else "view", t_end + 60 + i) for i, it in enumerate(items)
        ]
        if n_purchases:
            bought = model.items.ids[rng.integers(0, len(model.items), max(n_purchases // 10, 1))]
            at = t_end + 60 + np.sort(rng.integers(0, 7 * 86_400, n_purchases))
            events += [Event(uid, str(it), "purchase", float(t)) for it, t in zip(rng.choice(bought, n_purchases), at)]
        state.add(events)
        now = max(e.timestamp for e in events) + 1
        if n_purchases:
            ranker.rank(RankQuery(user_id=uid), overlay=build_overlay(model, uid, state.held(uid), now))
            state.add([Event(uid, str(rng.choice(bought)), "purchase", now + 59)])
            now += 60
        for times in rounds:
            t0 = time.perf_counter()
            overlay = build_overlay(model, uid, state.held(uid), now)
            ranker.rank(RankQuery(user_id=uid), overlay=overlay)
            times.append(time.perf_counter() - t0)
        folded += overlay.user_vector is not None
    return rounds, folded


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, required=True, help="a bundle version directory or an artifacts root")
    ap.add_argument("--users", type=int, default=2000, help="requests (customers with history, each once)")
    ap.add_argument("--warm", type=int, default=200, help="requests of other customers answered first, not timed")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--realtime-events", type=int, default=10, help="events per real-time customer")
    ap.add_argument("--heavy-purchases", type=int, default=5000, help="purchases per heavy buyer (0: none)")
    args = ap.parse_args(argv)

    path = args.bundle if (args.bundle / "manifest.json").exists() else resolve_current(args.bundle)
    model = RankingModel(path)
    ranker = Ranker(model)
    ranker.warm()
    rng = np.random.default_rng(args.seed)
    with_history = np.flatnonzero(np.asarray(model.user_has_history))
    rows = rng.choice(with_history, min(args.users + args.warm, len(with_history)), replace=False)
    queries = [RankQuery(user_id=str(model.users.ids[row])) for row in rows]
    for q in queries[: args.warm]:
        ranker.rank(q)
    stages: dict[str, list[float]] = {}
    total: list[float] = []
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for q in queries[args.warm :]:
        t0 = time.perf_counter()
        res = ranker.rank(q)
        total.append(time.perf_counter() - t0)
        for name, s in res.stage_seconds.items():
            stages.setdefault(name, []).append(s)
    n = len(total)
    cpu_ms, wall_ms = 1e3 * (time.process_time() - cpu0) / n, 1e3 * (time.perf_counter() - wall0) / n
    # Visitors the bundle has never seen, with ids of another shape than its customers' (a
    # UUID against the shop's own ids): the POPULAR rung, but the id must still be looked up.
    visitor_ms: list[float] = []
    for i in range(min(args.users, 500)):
        q = RankQuery(user_id=str(uuid.UUID(int=int(rng.integers(1 << 62)) << 64 | i)))
        t0 = time.perf_counter()
        ranker.rank(q)
        visitor_ms.append(time.perf_counter() - t0)
    # Customers with a few real-time events since the bundle (views, every third a purchase):
    # their overlay (the re-solved vector, exclusions, offsets) built and ranked with, as the
    # server does for every customer active since the last build.
    uids = [str(model.users.ids[row]) for row in rows[args.warm : args.warm + min(args.users, 500)]]
    (realtime_ms, _), folded = _realtime_ranks(model, ranker, uids, rng, args.realtime_events)
    heavy: list[list[float]] = [[], []]
    if args.heavy_purchases:
        heavy, _ = _realtime_ranks(model, ranker, uids[:50], rng, args.realtime_events, args.heavy_purchases)
    if not folded:
        raise SystemExit("no real-time customer got a re-solved vector: the fold-in was not ready (no Gram matrix?)")
    out = {
        "bundle": path.name,
        "requests": n,
        "rank_ms": 1e3 * float(np.median(total)),
        "cpu_ms_per_rank": cpu_ms,
        "wall_ms_per_rank": wall_ms,
        **{f"{name}_ms": 1e3 * float(np.median(v)) for name, v in stages.items()},
        "visitor_rank_ms": 1e3 * float(np.median(visitor_ms)),
        "realtime_rank_ms": 1e3 * float(np.median(realtime_ms)),
        **(
            {
                "heavy_buyer_purchases": args.heavy_purchases,
                "heavy_buyer_first_rank_ms": 1e3 * float(np.median(heavy[0])),
                "heavy_buyer_rank_ms": 1e3 * float(np.median(heavy[1])),
            }
            if args.heavy_purchases
            else {}
        ),
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
