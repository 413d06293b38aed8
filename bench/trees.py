"""Benchmark: the compiled tree-ensemble top-k against LightGBM's predict + argpartition on the same rows.

``python -m bench.trees`` prints per-request times and their ratio, measured in
the same run; nothing here asserts a speed.
"""

from __future__ import annotations

import time

import lightgbm as lgb
import numpy as np

from ranking import score_trees_topk, trees_from_lightgbm


def _best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def main() -> None:
    rng = np.random.default_rng(0)
    f = 28
    X = rng.standard_normal((20_000, f)).astype(np.float32)
    X[rng.random(X.shape) < 0.1] = np.nan
    y = np.nan_to_num(X[:, 0]) + np.sin(np.nan_to_num(X[:, 1])) + 0.1 * rng.standard_normal(len(X))
    for n_trees, leaves in ((100, 31), (500, 31)):
        booster = lgb.train(
            {"objective": "regression", "num_leaves": leaves, "verbose": -1, "num_threads": 1},
            lgb.Dataset(X, y),
            num_boost_round=n_trees,
        )
        trees = trees_from_lightgbm(booster)
        for n in (400, 2000):
            rows = X[:n]
            ours = _best(lambda rows=rows, trees=trees: score_trees_topk(rows, trees, None, 10), 30)
            ref = _best(lambda rows=rows, b=booster: np.argpartition(-b.predict(rows, num_threads=1), 10)[:10], 30)
            print(
                f"trees={n_trees:4d} leaves={leaves} candidates={n:5d}: kernel {ours * 1e3:7.3f} ms, "
                f"lightgbm predict+argpartition {ref * 1e3:7.3f} ms, ratio {ref / ours:5.1f}x"
            )


if __name__ == "__main__":
    main()
