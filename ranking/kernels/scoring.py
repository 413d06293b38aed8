"""Public scoring API: linear or tree-ensemble scores fused with masked, deadline-aware top-k selection.

This wrapper owns validation, dtype/contiguity fixing and output allocation; the
hot loop lives in the private compiled module ``ranking.kernels._scoring``. Other
packages import only this module.

Selection rule shared by :func:`score_topk` and :func:`topk`: a candidate is
excluded when its mask entry is nonzero or its score is NaN; the others are
ranked by score descending (``+inf`` first, ``-inf`` last but still returned),
ties going to the lower row index, so results are deterministic.
:func:`score_trees_phased_topk` ranks the rows its second phase completed by that
rule, and only then, to fill k, the others by their first-phase score.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from ranking.kernels import _scoring

__all__ = [
    "TopK",
    "TreeArrays",
    "TreePhases",
    "score_topk",
    "score_trees_topk",
    "score_trees_phased_topk",
    "topk",
    "linear_contributions",
    "tree_contributions",
]

_INT32_MAX = np.iinfo(np.int32).max
_INT64_MAX = np.iinfo(np.int64).max
_FLOAT32_MAX = float(np.finfo(np.float32).max)


class TopK(NamedTuple):
    """The best candidates, best first.

    Attributes
    ----------
    indices : np.ndarray
        int32 row indices into the scored array, sorted by score descending,
        ties by lower index first.
    scores : np.ndarray
        float32 scores matching ``indices``.
    n_scored : int
        Rows consumed before stopping, masked rows included; equals ``n`` unless
        the deadline cut the loop short, so ``n_scored < n`` means "partial". In
        phased scoring, the rows the first phase consumed.
    n_second : int
        Phased scoring only (``-1`` otherwise): rows the second phase gave the full
        model's score.
    second_cut : bool
        Phased scoring only: the deadline stopped the second phase before it had
        completed every row it was to complete.
    """

    indices: np.ndarray
    scores: np.ndarray
    n_scored: int
    n_second: int = -1
    second_cut: bool = False


# ---------------------------------------------------------------------------
# Validation helpers: each names the argument and says what was wrong.
# ---------------------------------------------------------------------------


def _as_float32(name: str, x, ndim: int) -> np.ndarray:
    # Real numbers of any width are accepted and cast; bool, complex and object
    # arrays are almost always a caller bug, so they are refused.
    arr = np.asarray(x)
    if arr.dtype.kind not in "fiu":
        raise ValueError(f"{name} must be a float32 array (real numbers), got dtype {arr.dtype}")
    if arr.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-dimensional, got shape {arr.shape}")
    return np.ascontiguousarray(arr, dtype=np.float32)


def _as_mask(mask, n: int) -> np.ndarray:
    if mask is None:
        return np.zeros(n, dtype=np.uint8)
    arr = np.asarray(mask)
    if arr.dtype.kind not in "biu":
        raise ValueError(f"mask must be a bool or uint8 array (nonzero = excluded), got dtype {arr.dtype}")
    if arr.ndim != 1 or arr.shape[0] != n:
        raise ValueError(f"mask must have shape ({n},), got shape {arr.shape}")
    if arr.dtype.itemsize != 1:
        arr = arr != 0
    elif not arr.flags.c_contiguous:
        arr = np.ascontiguousarray(arr)
    # bool, uint8 and int8 share a byte layout: view instead of copying.
    return arr.view(np.uint8)


def _as_int(name: str, value, minimum: int, maximum: int) -> int:
    if type(value) is not int:  # fast path first: ABC checks cost ~0.3 us each
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
            raise ValueError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
        value = int(value)
    if not minimum <= value <= maximum:
        raise ValueError(f"{name} must be in [{minimum}, {maximum}], got {value}")
    return value


def _check_n(name: str, n: int) -> None:
    if n > _INT32_MAX:
        raise ValueError(f"{name} has {n} rows; at most {_INT32_MAX} fit int32 indices")


def _loop_args(offsets, n: int, deadline_ns, check_every) -> tuple[np.ndarray, int, int]:
    """Validated (offsets, deadline_ns, check_every) shared by the scoring loops."""
    if offsets is None:
        offsets = np.zeros(n, dtype=np.float32)
    else:
        offsets = _as_float32("offsets", offsets, 1)
        if offsets.shape[0] != n:
            raise ValueError(f"offsets must have shape ({n},) to match features, got shape {offsets.shape}")
    return (offsets, *_deadline_ints(deadline_ns, check_every))


def _deadline_ints(deadline_ns, check_every) -> tuple[int, int]:
    return _as_int("deadline_ns", deadline_ns, 0, _INT64_MAX), _as_int("check_every", check_every, 1, _INT64_MAX)


_NO_ROOTS = np.zeros(0, np.int32)


def _alloc(k: int) -> tuple[np.ndarray, np.ndarray]:
    return np.empty(k, dtype=np.float32), np.empty(k, dtype=np.int32)


# ---------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------


def score_topk(
    features,
    weights,
    mask,
    k: int,
    *,
    bias: float = 0.0,
    offsets=None,
    deadline_ns: int = 0,
    check_every: int = 32,
) -> TopK:
    """Score candidates linearly and return the k best, stopping at a deadline.

    ``score_i = bias + sum_j features[i, j] * weights[j] + offsets[i]`` in float32. Rows are
    visited in order (retrieval order, best-retrieved first), so when the
    deadline stops the loop the rows already scored -- a prefix -- still
    compete for the top-k. The GIL is released for the whole loop.

    Parameters
    ----------
    features : array_like, shape (n, f)
        Feature matrix, one row per candidate. Cast to C-contiguous float32
        (no copy when it already is).
    weights : array_like, shape (f,)
        Linear weights, cast to float32.
    mask : array_like of bool or uint8, shape (n,), or None
        Nonzero = excluded: the row is skipped before it is scored and is never
        returned. ``None`` excludes nothing.
    k : int
        Number of results wanted, ``>= 0``. Fewer are returned when fewer rows
        are unmasked, non-NaN and scored.
    bias : float, default 0.0
        Added to every score; must be finite.
    offsets : array_like, shape (n,), or None
        Added to each row's score after the model: business rules and real-time
        signals that are not learned features. ``None`` adds nothing.
    deadline_ns : int, default 0
        Absolute ``CLOCK_MONOTONIC`` time in nanoseconds (the clock of
        ``time.monotonic_ns()``); ``0`` means no deadline.
    check_every : int, default 32
        The clock is read once every ``check_every`` rows, ``>= 1``. The first
        ``min(n, check_every)`` rows are always scored, so an already-expired
        deadline still yields a short answer.

    Returns
    -------
    TopK
        ``indices`` (int32 rows of ``features``) and ``scores`` (float32),
        best first, ties by lower index; ``n_scored`` rows consumed (``n``
        unless the deadline passed). Rows whose score is NaN are excluded.
        ``k == 0`` returns empty arrays without scoring, with ``n_scored = n``.

    Raises
    ------
    ValueError
        If an argument has the wrong dtype, shape or range; the message names it.
    """
    features = _as_float32("features", features, 2)
    n, f = features.shape
    _check_n("features", n)
    weights = _as_float32("weights", weights, 1)
    if weights.shape[0] != f:
        raise ValueError(
            f"weights must have shape ({f},) to match features with {f} columns, got shape {weights.shape}"
        )
    mask = _as_mask(mask, n)
    k = _as_int("k", k, 0, _INT64_MAX)
    if (
        type(bias) is not float and (isinstance(bias, (bool, np.bool_)) or not isinstance(bias, numbers.Real))
    ) or not abs(float(bias)) <= _FLOAT32_MAX:
        raise ValueError(f"bias must be a finite real number within float32 range, got {bias!r}")
    offsets, deadline_ns, check_every = _loop_args(offsets, n, deadline_ns, check_every)

    out_scores, out_indices = _alloc(min(k, n))
    if k == 0 or n == 0:
        return TopK(out_indices, out_scores, n)
    n_kept, n_scored = _scoring.score_topk(
        features,
        weights,
        mask,
        offsets,
        float(bias),
        deadline_ns,
        check_every,
        out_scores,
        out_indices,
    )
    return TopK(out_indices[:n_kept], out_scores[:n_kept], int(n_scored))


def topk(scores, mask, k: int) -> TopK:
    """Return the k best of precomputed scores (no deadline, no scoring).

    Used for the retrieval-order fallback and popularity lists; ordering,
    tie and NaN rules are those of :func:`score_topk`.

    Parameters
    ----------
    scores : array_like, shape (n,)
        Scores, cast to C-contiguous float32. NaN entries are excluded.
    mask : array_like of bool or uint8, shape (n,), or None
        Nonzero = excluded. ``None`` excludes nothing.
    k : int
        Number of results wanted, ``>= 0``.

    Returns
    -------
    TopK
        Best first, ties by lower index; ``n_scored`` is always ``n``.

    Raises
    ------
    ValueError
        If an argument has the wrong dtype, shape or range; the message names it.
    """
    scores = _as_float32("scores", scores, 1)
    n = scores.shape[0]
    _check_n("scores", n)
    mask = _as_mask(mask, n)
    k = _as_int("k", k, 0, _INT64_MAX)

    out_scores, out_indices = _alloc(min(k, n))
    if k == 0 or n == 0:
        return TopK(out_indices, out_scores, n)
    n_kept = _scoring.topk(scores, mask, out_scores, out_indices)
    return TopK(out_indices[:n_kept], out_scores[:n_kept], n)


def linear_contributions(features_rows, weights) -> np.ndarray:
    """Per-feature contributions ``features_rows * weights`` for ``explain``.

    Parameters
    ----------
    features_rows : array_like, shape (m, f)
        Feature rows of the items to explain, cast to float32.
    weights : array_like, shape (f,)
        Linear weights, cast to float32.

    Returns
    -------
    np.ndarray
        float32 array of shape (m, f); row sums plus the bias give the scores
        of :func:`score_topk` up to float32 summation order.

    Raises
    ------
    ValueError
        If an argument has the wrong dtype or shape; the message names it.
    """
    features_rows = _as_float32("features_rows", features_rows, 2)
    weights = _as_float32("weights", weights, 1)
    f = features_rows.shape[1]
    if weights.shape[0] != f:
        raise ValueError(
            f"weights must have shape ({f},) to match features_rows with {f} columns, got shape {weights.shape}"
        )
    return features_rows * weights


# ---------------------------------------------------------------------------
# Tree ensembles
# ---------------------------------------------------------------------------


# A tree ensemble's flat arrays, as TreeArrays names them (a bundle stores them as ``rerank_<name>``).
TREE_ARRAYS = ("roots", "feature", "threshold", "left", "right", "flags", "node_value", "leaf_value")


class TreeArrays(NamedTuple):
    """A tree ensemble as flat arrays, the form the compiled loop walks.

    Build it with :meth:`checked`, never directly: the kernel trusts that child
    links point forward and every index is in range (a cycle would never end).

    Attributes
    ----------
    roots : np.ndarray
        int32 (n_trees,): each tree's root, ``>= 0`` a node, ``< 0`` ``~leaf``
        (a tree that is a single leaf).
    feature : np.ndarray
        int32 (n_nodes,): the feature column a split node tests.
    threshold : np.ndarray
        float64 (n_nodes,): go left when ``value <= threshold``.
    left, right : np.ndarray
        int32 (n_nodes,): children, ``>= 0`` a node, ``< 0`` ``~leaf``.
    flags : np.ndarray
        uint8 (n_nodes,): bit 0 set = missing values go left; bits 1-2 are
        LightGBM's missing type (0 none, 1 zero, 2 NaN).
    node_value : np.ndarray
        float64 (n_nodes,): the expected output at each split node (for explain).
    leaf_value : np.ndarray
        float64 (n_leaves,): leaf outputs; a row's score is the sum of its leaves.
    n_features : int
        Number of feature columns the ensemble reads.
    """

    roots: np.ndarray
    feature: np.ndarray
    threshold: np.ndarray
    left: np.ndarray
    right: np.ndarray
    flags: np.ndarray
    node_value: np.ndarray
    leaf_value: np.ndarray
    n_features: int

    @classmethod
    def checked(
        cls, roots, feature, threshold, left, right, flags, node_value, leaf_value, n_features: int
    ) -> TreeArrays:
        """Validate and normalise the arrays of an ensemble.

        Raises
        ------
        ValueError
            Shapes disagree, an index is out of range, a flag is unknown, a value
            is not finite, or a child does not come after its parent; the message
            names the array and the first offending position.
        """
        n_features = _as_int("n_features", n_features, 0, _INT32_MAX)
        ints = {
            name: np.ascontiguousarray(a, dtype=np.int32)
            for name, a in (("roots", roots), ("feature", feature), ("left", left), ("right", right))
        }
        for name, a in ints.items():
            if a.ndim != 1:
                raise ValueError(f"tree array {name} must be 1-dimensional, got shape {a.shape}")
        flags = np.ascontiguousarray(flags, dtype=np.uint8)
        threshold = np.ascontiguousarray(threshold, dtype=np.float64)
        node_value = np.ascontiguousarray(node_value, dtype=np.float64)
        leaf_value = np.ascontiguousarray(leaf_value, dtype=np.float64)
        n_nodes = len(ints["feature"])
        for name, a in (
            ("threshold", threshold),
            ("left", ints["left"]),
            ("right", ints["right"]),
            ("flags", flags),
            ("node_value", node_value),
        ):
            if a.shape != (n_nodes,):
                raise ValueError(f"tree array {name} must have shape ({n_nodes},) like feature, got {a.shape}")
        n_leaves = len(leaf_value)

        def first_bad(bad: np.ndarray, name: str, what: str) -> None:
            if bad.any():
                pos = int(np.flatnonzero(bad)[0])
                raise ValueError(f"tree array {name}[{pos}] {what}")

        feat = ints["feature"]
        first_bad((feat < 0) | (feat >= n_features), "feature", f"is not a column in [0, {n_features})")
        first_bad(flags > 5, "flags", "is not a known flag value (0-5)")
        first_bad(np.isnan(threshold), "threshold", "is NaN")
        first_bad(~np.isfinite(node_value), "node_value", "is not finite")
        first_bad(~np.isfinite(leaf_value), "leaf_value", "is not finite")
        here = np.arange(n_nodes)
        for name in ("left", "right"):
            c = ints[name]
            first_bad(
                (c >= 0) & ((c <= here) | (c >= n_nodes)),
                name,
                "must name a later node (children come after their parent)",
            )
            first_bad((c < 0) & (~c >= n_leaves), name, f"names a leaf outside [0, {n_leaves})")
        r = ints["roots"]
        first_bad((r >= n_nodes) | ((r < 0) & (~r >= n_leaves)), "roots", "is out of range")
        return cls(r, feat, threshold, ints["left"], ints["right"], flags, node_value, leaf_value, n_features)

    @property
    def n_trees(self) -> int:
        return len(self.roots)


def _check_trees(trees, f: int) -> None:
    if not isinstance(trees, TreeArrays):
        raise ValueError(f"trees must be a TreeArrays (build it with TreeArrays.checked), got {type(trees).__name__}")
    if trees.n_features != f:
        raise ValueError(f"trees read {trees.n_features} features but features has {f} columns")


class TreePhases(NamedTuple):
    """An ensemble's trees split in two phases: a prefix of every bag first, the rest second.

    Build it with :meth:`of`. The first phase's trees are the first ``first_trees_per_bag[b]``
    of each bag ``b`` (a boosted model's prefix is itself a model); the second phase's are
    the others, so a row's first-phase sum plus its second-phase sum is the full model's.

    Attributes
    ----------
    roots_first, roots_second : np.ndarray
        int32 roots (entries of ``TreeArrays.roots``) of each phase's trees, in ensemble order.
    first_trees_per_bag : tuple of int
        The prefix length of each bag.
    """

    roots_first: np.ndarray
    roots_second: np.ndarray
    first_trees_per_bag: tuple[int, ...]

    @classmethod
    def of(cls, trees: TreeArrays, trees_per_bag, first_trees_per_bag) -> TreePhases:
        """Split ``trees`` (bags concatenated in order, ``trees_per_bag[b]`` trees each).

        Raises
        ------
        ValueError
            The bag sizes do not add up to the ensemble's trees, or a prefix is negative
            or longer than its bag; the message names the bag.
        """
        sizes = [_as_int("trees_per_bag", n, 0, _INT32_MAX) for n in trees_per_bag]
        firsts = [_as_int("first_trees_per_bag", n, 0, _INT32_MAX) for n in first_trees_per_bag]
        if sum(sizes) != trees.n_trees:
            raise ValueError(f"trees_per_bag {sizes} adds up to {sum(sizes)} trees; the ensemble has {trees.n_trees}")
        if len(firsts) != len(sizes):
            raise ValueError(f"first_trees_per_bag has {len(firsts)} entries for {len(sizes)} bags")
        first = np.zeros(trees.n_trees, dtype=bool)
        start = 0
        for b, (size, n1) in enumerate(zip(sizes, firsts)):
            if n1 > size:
                raise ValueError(f"first_trees_per_bag[{b}] = {n1} is more than the bag's {size} trees")
            first[start : start + n1] = True
            start += size
        return cls(np.ascontiguousarray(trees.roots[first]), np.ascontiguousarray(trees.roots[~first]), tuple(firsts))

    @property
    def n_first(self) -> int:
        return len(self.roots_first)


def score_trees_topk(
    features,
    trees: TreeArrays,
    mask,
    k: int,
    *,
    offsets=None,
    deadline_ns: int = 0,
    check_every: int = 32,
) -> TopK:
    """Score candidates with a tree ensemble and return the k best, stopping at a deadline.

    ``score_i = float32(sum of the leaves row i reaches) + offsets[i]``; the leaf
    sum is taken in float64 as LightGBM's ``predict`` does, so scores match it to
    float32 rounding. Ordering, ties, NaN, mask, offsets and deadline behave as in
    :func:`score_topk`. The GIL is released for the whole loop.

    Parameters
    ----------
    features : array_like, shape (n, f)
        Feature matrix, cast to C-contiguous float32; NaN means missing and
        follows each split's default direction.
    trees : TreeArrays
        The ensemble, from :meth:`TreeArrays.checked`; ``trees.n_features == f``.
    mask, k, offsets, deadline_ns, check_every
        As in :func:`score_topk`.

    Returns
    -------
    TopK

    Raises
    ------
    ValueError
        If an argument has the wrong dtype, shape or range; the message names it.
    """
    return score_trees_phased_topk(
        features, trees, None, mask, k, 0, offsets=offsets, deadline_ns=deadline_ns, check_every=check_every
    )


def tree_contributions(features_rows, trees: TreeArrays) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature contributions of a tree ensemble for ``explain`` (Saabas path attribution).

    Each split on a row's path moves the expected output from the node's value
    to its child's; the move is credited to the split's feature. The root values
    form the bias.

    Parameters
    ----------
    features_rows : array_like, shape (m, f)
        Feature rows of the items to explain, cast to float32.
    trees : TreeArrays

    Returns
    -------
    contributions : np.ndarray
        float64 (m, f).
    bias : np.ndarray
        float64 (m,); ``contributions.sum(1) + bias`` equals the leaf sum that
        :func:`score_trees_topk` rounds to float32.

    Raises
    ------
    ValueError
        If an argument has the wrong dtype or shape; the message names it.
    """
    features_rows = _as_float32("features_rows", features_rows, 2)
    m, f = features_rows.shape
    _check_trees(trees, f)
    contrib = np.zeros((m, f), dtype=np.float64)
    bias = np.zeros(m, dtype=np.float64)
    if m == 0:
        return contrib, bias
    t = trees
    _scoring.tree_contributions(
        features_rows,
        t.roots,
        t.feature,
        t.threshold,
        t.left,
        t.right,
        t.flags,
        t.node_value,
        t.leaf_value,
        contrib,
        bias,
    )
    return contrib, bias


def score_trees_phased_topk(
    features,
    trees: TreeArrays,
    phases: TreePhases | None,
    mask,
    k: int,
    n_second: int,
    *,
    offsets=None,
    deadline_ns: int = 0,
    check_every: int = 32,
) -> TopK:
    """Score in two phases: a prefix of the ensemble over every row, the full model over the best.

    The first phase scores every unmasked row with ``phases.roots_first`` (plus its
    offset) and keeps the best ``n_second``; the second phase adds the remaining trees
    to those rows, best first, so their score is the full model's (the leaf sum is taken
    in another order, so it can differ from :func:`score_trees_topk`'s in the last
    float32 bit). The top k is taken among them. Rows that did not complete the
    second phase rank below every row that did, by first-phase score, and only fill
    the answer when fewer than ``k`` rows completed (``n_second < k``, or the deadline
    stopped the second phase); their ``scores`` are first-phase scores.

    ``n_second <= 0`` or ``n_second >= n`` is one phase: exactly :func:`score_trees_topk`.

    Parameters
    ----------
    features, trees, mask, k, offsets, check_every
        As in :func:`score_trees_topk`.
    phases : TreePhases or None
        The split of ``trees``, from :meth:`TreePhases.of`; None is one phase.
    n_second : int
        Rows the second phase scores at most.
    deadline_ns : int
        As in :func:`score_topk`; both phases read the clock every ``check_every``
        rows, and the first ``check_every`` rows of each always complete.

    Returns
    -------
    TopK
        ``n_scored`` rows the first phase consumed, ``n_second`` rows the second phase
        completed and ``second_cut`` whether the deadline stopped it early.

    Raises
    ------
    ValueError
        If an argument has the wrong dtype, shape or range; the message names it.
    """
    features = _as_float32("features", features, 2)
    n, f = features.shape
    call = TreeCall.prepare(n, f, trees, phases, mask, k, n_second, offsets, deadline_ns, check_every)
    if call.k == 0 or n == 0:
        return call.top(0, n, 0, 0)
    return call.top(*_scoring.score_trees_call(features, *call.kernel_args()))


def checked_phases(trees, phases, f: int) -> TreePhases | None:
    """``phases`` (None: one phase), checked against ``trees``, which must read ``f`` features.

    Raises
    ------
    ValueError
        The trees or the phases are not what a scoring call takes; the message says how.
    """
    _check_trees(trees, f)
    if phases is None:
        return None
    if not isinstance(phases, TreePhases):
        raise ValueError(f"phases must be a TreePhases (build it with TreePhases.of), got {type(phases).__name__}")
    if len(phases.roots_first) + len(phases.roots_second) != trees.n_trees:
        raise ValueError(
            f"phases split {len(phases.roots_first) + len(phases.roots_second)} trees; the ensemble has {trees.n_trees}"
        )
    return phases


def loop_ints(k, n_second, deadline_ns, check_every) -> tuple[int, int, int, int]:
    """A scoring call's ``k``, ``n_second``, ``deadline_ns`` and ``check_every``, checked."""
    k, n_second = _as_int("k", k, 0, _INT64_MAX), _as_int("n_second", n_second, -_INT64_MAX, _INT64_MAX)
    return (k, n_second, *_deadline_ints(deadline_ns, check_every))


@dataclass(slots=True)
class TreeCall:
    """One tree-scoring call, validated, with its output buffers: what the compiled loops take.

    Built by :meth:`prepare`; :func:`score_trees_phased_topk` hands it to the scoring kernel
    and ``ranking.kernels.features`` to the feature kernel, which scores the rows it has
    just written in the same call without the GIL. ``n_second`` is 0 for one phase (the
    whole ensemble in ``roots_first``).
    """

    k: int
    n_second: int
    roots_first: np.ndarray
    roots_second: np.ndarray
    trees: TreeArrays
    mask: np.ndarray
    offsets: np.ndarray
    deadline_ns: int
    check_every: int
    first_acc: np.ndarray
    first_scores: np.ndarray
    first_indices: np.ndarray
    out_scores: np.ndarray
    out_indices: np.ndarray

    @classmethod
    def prepare(
        cls,
        n: int,
        f: int,
        trees: TreeArrays,
        phases: TreePhases | None,
        mask,
        k: int,
        n_second: int,
        offsets=None,
        deadline_ns: int = 0,
        check_every: int = 32,
    ) -> TreeCall:
        """Validate the arguments of a call over ``n`` rows of ``f`` features (see :func:`score_trees_phased_topk`).

        Raises
        ------
        ValueError
            An argument has the wrong dtype, shape or range; the message names it.
        """
        _check_n("features", n)
        n_second = _as_int("n_second", n_second, -_INT64_MAX, _INT64_MAX)
        phases = checked_phases(trees, phases if 0 < n_second < n else None, f)
        if phases is None:
            n_second, roots_first, roots_second = 0, trees.roots, _NO_ROOTS
        else:
            roots_first, roots_second = phases.roots_first, phases.roots_second
        mask = _as_mask(mask, n)
        k = min(_as_int("k", k, 0, _INT64_MAX), n)
        offsets, deadline_ns, check_every = _loop_args(offsets, n, deadline_ns, check_every)
        # The first phase keeps its best m rows (one phase: the top k, which are the answer).
        return cls(
            k,
            n_second,
            roots_first,
            roots_second,
            trees,
            mask,
            offsets,
            deadline_ns,
            check_every,
            np.empty(n, dtype=np.float64),
            *_alloc(min(n, max(n_second, k))),
            *_alloc(k),
        )

    def kernel_args(self) -> tuple:
        """The arguments after the feature matrix, in the compiled entries' order."""
        t = self.trees
        return (
            self.roots_first,
            self.roots_second,
            t.feature,
            t.threshold,
            t.left,
            t.right,
            t.flags,
            t.leaf_value,
            self.mask,
            self.offsets,
            self.n_second,
            self.deadline_ns,
            self.check_every,
            self.first_acc,
            self.first_scores,
            self.first_indices,
            self.out_scores,
            self.out_indices,
        )

    def top(self, n_kept: int, n_scored: int, n_done: int, n_planned: int) -> TopK:
        """The answer from the compiled loop's counts."""
        if not self.n_second:
            return TopK(self.out_indices[:n_kept], self.out_scores[:n_kept], int(n_scored))
        return TopK(
            self.out_indices[:n_kept], self.out_scores[:n_kept], int(n_scored), int(n_done), bool(n_done < n_planned)
        )
