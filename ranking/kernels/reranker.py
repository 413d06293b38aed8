"""The bundle's scoring model: a learned tree ensemble as flat arrays (or a linear model), loaded and applied.

The builder exports a LightGBM booster with :func:`trees_from_lightgbm` and stores
the arrays under the ``rerank_*`` names; the server reads them back with
:func:`load_scorer`, which also accepts the older linear ``scoring`` section and
refuses any other model kind with a :class:`~ranking.errors.BundleError`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ranking.errors import BundleError
from ranking.kernels import scoring
from ranking.kernels.scoring import TREE_ARRAYS, TopK, TreeArrays, TreePhases

__all__ = [
    "TreeScorer",
    "LinearScorer",
    "trees_from_lightgbm",
    "load_scorer",
    "tree_arrays",
    "TREE_ARRAYS",
    "SCORING_MODELS",
]

SCORING_MODELS = ("linear", "trees")

_MISSING_TYPES = {"None": 0, "Zero": 1, "NaN": 2}


def trees_from_lightgbm(booster, scale: float = 1.0) -> TreeArrays:
    """Flatten a LightGBM booster's trees into :class:`~ranking.kernels.scoring.TreeArrays`.

    Nodes are numbered in pre-order across all trees, so every child comes after
    its parent. Numerical ``<=`` splits with any missing type are supported; the
    builder produces no categorical features, so a categorical split is refused.

    Parameters
    ----------
    booster : lightgbm.Booster
        A trained single-output model (regression or lambdarank).
    scale : float
        Multiplies every leaf and node value (``1 / n`` to average ``n`` models).

    Returns
    -------
    TreeArrays

    Raises
    ------
    ValueError
        The model has several outputs per row or a split kind this loop cannot evaluate.
    """
    dump = booster.dump_model()
    if dump.get("num_tree_per_iteration", 1) != 1:
        raise ValueError("only single-output models can be exported (one tree per iteration)")
    n_features = int(dump["max_feature_idx"]) + 1
    roots: list[int] = []
    feature: list[int] = []
    threshold: list[float] = []
    left: list[int] = []
    right: list[int] = []
    flags: list[int] = []
    node_value: list[float] = []
    leaf_value: list[float] = []

    def visit(node: dict) -> int:
        if "leaf_value" in node or "split_index" not in node:
            leaf_value.append(float(node.get("leaf_value", 0.0)) * scale)
            return ~(len(leaf_value) - 1)
        if node["decision_type"] != "<=":
            raise ValueError(f"split decision {node['decision_type']!r} is not supported (numerical '<=' only)")
        me = len(feature)
        feature.append(int(node["split_feature"]))
        threshold.append(float(node["threshold"]))
        flags.append(int(bool(node["default_left"])) | (_MISSING_TYPES[node["missing_type"]] << 1))
        node_value.append(float(node["internal_value"]) * scale)
        left.append(0)
        right.append(0)
        left[me] = visit(node["left_child"])
        right[me] = visit(node["right_child"])
        return me

    for info in dump["tree_info"]:
        roots.append(visit(info["tree_structure"]))
    return TreeArrays.checked(roots, feature, threshold, left, right, flags, node_value, leaf_value, n_features)


def concat_trees(parts: list[TreeArrays]) -> TreeArrays:
    """One ensemble whose score is the sum of the parts' scores (node and leaf numbers shifted)."""
    if not parts:
        raise ValueError("concat_trees needs at least one ensemble")
    n_features = parts[0].n_features
    if any(p.n_features != n_features for p in parts):
        raise ValueError("every ensemble must read the same number of features")
    roots, feature, threshold, left, right, flags, node_value, leaf_value = ([] for _ in range(8))
    n_nodes = n_leaves = 0

    def shift(child: np.ndarray) -> np.ndarray:
        return np.where(child >= 0, child + n_nodes, ~(~child + n_leaves)).astype(np.int32)

    for p in parts:
        roots.append(shift(p.roots))
        left.append(shift(p.left))
        right.append(shift(p.right))
        feature.append(p.feature)
        threshold.append(p.threshold)
        flags.append(p.flags)
        node_value.append(p.node_value)
        leaf_value.append(p.leaf_value)
        n_nodes += len(p.feature)
        n_leaves += len(p.leaf_value)
    cat = np.concatenate
    return TreeArrays.checked(
        cat(roots),
        cat(feature),
        cat(threshold),
        cat(left),
        cat(right),
        cat(flags),
        cat(node_value),
        cat(leaf_value),
        n_features,
    )


@dataclass(frozen=True)
class TreeScorer:
    """Scores feature rows with an exported tree ensemble, in one phase or two.

    ``phases`` (from the manifest's ``phases`` section) splits the trees into a first
    phase (a prefix of every bag) and the rest; None when the bundle records no split.
    """

    feature_names: tuple[str, ...]
    trees: TreeArrays
    kind: str = "trees"
    phases: TreePhases | None = None

    def score_topk(
        self,
        features: np.ndarray,
        mask: np.ndarray | None,
        k: int,
        *,
        offsets=None,
        deadline_ns: int = 0,
        n_second: int = 0,
    ) -> TopK:
        """Top k; ``n_second > 0`` (with phases) scores the full model over only the best
        ``n_second`` by the first phase (:func:`ranking.kernels.scoring.score_trees_phased_topk`)."""
        if n_second > 0 and self.phases is not None:
            return scoring.score_trees_phased_topk(
                features, self.trees, self.phases, mask, k, n_second, offsets=offsets, deadline_ns=deadline_ns
            )
        return scoring.score_trees_topk(features, self.trees, mask, k, offsets=offsets, deadline_ns=deadline_ns)

    def contributions(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(per-feature contributions (m, f), bias (m,)) of each row; they sum to its score."""
        return scoring.tree_contributions(rows, self.trees)

    def predict(self, features: np.ndarray) -> np.ndarray:
        """Scores of every row (float32), in row order; for evaluation and tests."""
        n = len(features)
        top = scoring.score_trees_topk(features, self.trees, None, n)
        out = np.full(n, np.nan, np.float32)
        out[top.indices] = top.scores
        return out


@dataclass(frozen=True)
class LinearScorer:
    """Scores feature rows with fixed linear weights (bundles built before the reranker)."""

    feature_names: tuple[str, ...]
    weights: np.ndarray
    bias: float
    kind: str = "linear"

    def score_topk(
        self,
        features: np.ndarray,
        mask: np.ndarray | None,
        k: int,
        *,
        offsets=None,
        deadline_ns: int = 0,
        n_second: int = 0,
    ) -> TopK:
        """Top k; a linear model has one phase, so ``n_second`` is ignored."""
        return scoring.score_topk(
            features, self.weights, mask, k, bias=self.bias, offsets=offsets, deadline_ns=deadline_ns
        )

    def contributions(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        contrib = scoring.linear_contributions(rows, self.weights).astype(np.float64)
        return contrib, np.full(len(contrib), self.bias, np.float64)


def load_scorer(bundle) -> TreeScorer | LinearScorer:
    """Read the bundle's ``scoring`` manifest section (and tree arrays).

    Parameters
    ----------
    bundle : ranking.bundle.Bundle

    Returns
    -------
    TreeScorer or LinearScorer

    Raises
    ------
    BundleError
        The section is missing, names an unknown model kind, or its arrays are inconsistent.
    """
    section: dict[str, Any] | None = bundle.manifest.get("scoring")
    where = f"{bundle.path}/manifest.json"
    if not isinstance(section, dict):
        raise BundleError(f"{where} has no 'scoring' section")
    kind = section.get("model")
    names = section.get("features")
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise BundleError(f"{where}: scoring.features must be a list of feature names")
    if kind == "linear":
        weights = np.asarray(section.get("weights", []), dtype=np.float32)
        if weights.shape != (len(names),):
            raise BundleError(f"{where}: scoring.weights has {weights.size} entries for {len(names)} features")
        return LinearScorer(tuple(names), weights, float(section.get("bias", 0.0)))
    if kind == "trees":
        roots, feature, threshold, left, right, flags, node_value, leaf_value = (
            bundle.array(f"rerank_{name}", mmap=False) for name in TREE_ARRAYS
        )
        try:
            trees = TreeArrays.checked(
                roots, feature, threshold, left, right, flags, node_value, leaf_value, n_features=len(names)
            )
        except ValueError as exc:
            raise BundleError(f"{bundle.path}: the reranker's trees are inconsistent: {exc}") from None
        return TreeScorer(tuple(names), trees, phases=_phases(bundle.manifest.get("phases"), trees, where))
    raise BundleError(
        f"{where}: scoring.model is {kind!r}; this server scores only {list(SCORING_MODELS)}: "
        "rebuild the bundle with a matching index_builder or upgrade the server"
    )


def _phases(section: Any, trees: TreeArrays, where: str) -> TreePhases | None:
    """The manifest's ``phases`` split of the trees, or None when it records none."""
    if not isinstance(section, dict) or "first_trees_per_bag" not in section:
        return None
    try:
        return TreePhases.of(trees, section.get("trees_per_bag", []), section["first_trees_per_bag"])
    except (ValueError, TypeError) as exc:
        raise BundleError(f"{where}: phases does not split the reranker's trees: {exc}") from None


def tree_arrays(trees: TreeArrays) -> dict[str, np.ndarray]:
    """An ensemble's arrays under their bundle names (``rerank_<name>``)."""
    return {f"rerank_{name}": getattr(trees, name) for name in TREE_ARRAYS}
