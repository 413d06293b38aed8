"""Benchmark: the scoring stage per request in one phase and phased, on a built bundle.

``python -m bench.phases --bundle DIR`` prepares real requests with the bundle's own
pipeline (``Ranker.prepare``: candidates, mask, feature rows), then times the scorer on
those rows with the full model over every candidate and with the full model over the
best N of a first phase, both in the same run, and prints the medians, their ratio and
how often the top 10 is the same. A bundle that records no ``phases`` (built before the
builder chose them) is split at ``--first-share`` of every bag's trees. Nothing here
asserts a speed.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import numpy as np

from index_builder.rerank_phases import prefix_counts
from ranking import Ranker, RankerConfig, RankingModel, RankQuery, TreePhases, resolve_current


def _median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times)) * 1e3


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, required=True, help="a bundle version directory or an artifacts root")
    ap.add_argument("--users", type=int, default=200, help="requests (users with history) to prepare")
    ap.add_argument("--n-second", type=int, nargs="+", default=[100, 50, 25], help="second-phase sizes to time")
    ap.add_argument("--first-share", type=float, default=0.125, help="the prefix share when the bundle has none")
    ap.add_argument("--repeats", type=int, default=20, help="timings per request and setting (median kept)")
    args = ap.parse_args(argv)

    path = args.bundle if (args.bundle / "manifest.json").exists() else resolve_current(args.bundle)
    model = RankingModel(path)
    ranker = Ranker(model, RankerConfig(second_phase_candidates=0))
    scorer = ranker.scorer
    if scorer.kind != "trees":
        raise SystemExit(f"{path}: the bundle scores with a {scorer.kind} model; phases need trees")
    source = "the bundle's phases"
    if scorer.phases is None:
        sizes = model.manifest["scoring"]["training"]["trees_per_bag"]
        phases = TreePhases.of(scorer.trees, sizes, prefix_counts(sizes, args.first_share))
        scorer = dataclasses.replace(scorer, phases=phases)
        source = f"a prefix of {args.first_share:g} of every bag (the bundle records no phases)"
    assert scorer.phases is not None
    users = np.flatnonzero(np.asarray(model.user_has_history))[: args.users]
    prepared = []
    for row in users:
        prep = ranker.prepare(RankQuery(user_id=str(model.users.ids[row])))
        if prep.features is not None and len(prep.rows) > 10:
            prepared.append((np.ascontiguousarray(prep.features), prep.mask))
    n_cands = [len(f) for f, _ in prepared]
    print(
        f"bundle {path.name}: {scorer.trees.n_trees} trees, first phase {scorer.phases.n_first} "
        f"({source}); {len(prepared)} requests, candidates median {int(np.median(n_cands))} "
        f"(min {min(n_cands)}, max {max(n_cands)})"
    )

    def per_request(n_second: int) -> tuple[float, list[np.ndarray]]:
        times, tops = [], []
        for feats, mask in prepared:
            call = lambda f=feats, m=mask: scorer.score_topk(f, m, 10, n_second=n_second)  # noqa: E731
            times.append(_median_ms(call, args.repeats))
            tops.append(scorer.score_topk(feats, mask, 10, n_second=n_second).indices)
        return float(np.median(times)), tops

    one_ms, one_tops = per_request(0)
    print(f"one phase (the full model over every candidate): {one_ms:.4f} ms per request (median)")
    for n_second in args.n_second:
        ms, tops = per_request(n_second)
        same = np.mean([np.array_equal(a, b) for a, b in zip(one_tops, tops)])
        print(
            f"phased, N={n_second:4d}: {ms:.4f} ms per request, {one_ms / ms:.2f}x faster than one phase; "
            f"same top 10 in {same:.1%} of requests"
        )


if __name__ == "__main__":
    main()
