"""The reranker's serving cost (tree nodes walked per candidate) and the cut that keeps it under a ceiling."""

from __future__ import annotations

import numpy as np

# Training rows the cost is measured on at most (a random sample beyond): the mean depth
# walked settles well before this, and ``pred_leaf`` holds one int per row and tree.
COST_ROWS = 20_000


def leaf_depths(booster) -> list[np.ndarray]:
    """Per tree of a LightGBM booster, the split nodes on the path to each leaf (by leaf index)."""
    out = []
    for info in booster.dump_model()["tree_info"]:
        depths: dict[int, int] = {}
        stack = [(info["tree_structure"], 0)]
        while stack:
            node, depth = stack.pop()
            if "split_index" in node:
                stack.append((node["left_child"], depth + 1))
                stack.append((node["right_child"], depth + 1))
            else:
                depths[int(node.get("leaf_index", 0))] = depth  # a one-leaf tree has no index
        arr = np.zeros(max(depths) + 1, np.int32)
        for leaf, depth in depths.items():
            arr[leaf] = depth
        out.append(arr)
    return out


def nodes_per_tree(booster, X: np.ndarray) -> np.ndarray:
    """Mean split nodes each tree of ``booster`` walks for a row of ``X``, float64 (n_trees,)."""
    if booster.num_trees() == 0 or len(X) == 0:
        return np.zeros(booster.num_trees())
    leaves = np.asarray(booster.predict(X, pred_leaf=True), dtype=np.int64).reshape(len(X), -1)
    depths = leaf_depths(booster)
    return np.array([depths[t][leaves[:, t]].mean() for t in range(leaves.shape[1])])


def cost_rows(X: np.ndarray, seed: int) -> np.ndarray:
    """The training rows the cost is measured on: all, or a random ``COST_ROWS`` of them."""
    if len(X) <= COST_ROWS:
        return X
    pick = np.random.default_rng(seed).choice(len(X), size=COST_ROWS, replace=False)
    return X[np.sort(pick)]


def fit_ceiling(per_tree: list[np.ndarray], ceiling: float) -> list[int]:
    """Trees to keep of each bag so the summed cost fits ``ceiling``, cut in proportion.

    Every bag keeps the same share of its trees (its first ones: a boosted model's prefix is
    itself a model, and the early trees carry most of it), the largest share whose cost fits,
    and at least one tree. ``per_tree[b]`` is the cost of each of bag ``b``'s trees in order.

    Returns
    -------
    list of int
        Trees kept per bag; the bags' own counts when they already fit (or ``ceiling <= 0``).
    """
    sizes = [len(c) for c in per_tree]
    cum = [np.r_[0.0, np.cumsum(c)] for c in per_tree]

    def kept(share: float) -> list[int]:
        return [max(1, min(n, int(np.floor(share * n)))) if n else 0 for n in sizes]

    def cost(counts: list[int]) -> float:
        return float(sum(c[n] for c, n in zip(cum, counts)))

    if ceiling <= 0 or cost(sizes) <= ceiling:
        return sizes
    lo, hi = 0.0, 1.0  # cost(kept(lo)) fits (or is the floor of one tree each), cost(kept(hi)) does not
    for _ in range(40):
        mid = (lo + hi) / 2
        if cost(kept(mid)) <= ceiling:
            lo = mid
        else:
            hi = mid
    return kept(lo)
