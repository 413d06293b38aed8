"""Candidate retrieval: exact search over the largest-norm items when it provably finds the
top k, approximate nearest neighbours over all item factors otherwise."""

from __future__ import annotations

import itertools
import math

import faiss
import numpy as np

from ranking.config import DEFAULT_EXACT_HEAD_ITEMS  # noqa: F401  (re-exported; written once there)
from ranking.kernels.search import FlatScan, norms
from ranking.realtime.user_state import row_norms

# Relative slack on the certificate, for float32 rounding in the scores and the norms
# (a sum of d float32 squares is within about d x 6e-8 of exact: 4e-6 at d = 64).
_BOUND_SLACK = 1e-4


def search_params(index: faiss.Index, k: int, effort: int) -> faiss.SearchParameters | None:
    """Per-query search parameters, so concurrent requests never mutate the shared index.

    ``effort`` is efSearch for HNSW and nprobe (lists probed) for IVF; HNSW needs efSearch >= k to
    return k results.
    """
    base = faiss.downcast_index(index)
    # faiss's bundled stubs lack SearchParametersHNSW and the keyword constructors its
    # Python layer adds to every SearchParameters class (faiss/python/class_wrappers.py).
    if isinstance(base, faiss.IndexHNSW):
        return faiss.SearchParametersHNSW(efSearch=max(effort, k))  # type: ignore[attr-defined]
    if isinstance(base, faiss.IndexIVF):
        return faiss.SearchParametersIVF(nprobe=max(1, effort))  # type: ignore[call-arg]
    return None


def ann_search(index: faiss.Index, queries: np.ndarray, k: int, effort: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` items by inner product for each query row.

    Returns
    -------
    (scores, rows) : (np.ndarray, np.ndarray)
        float32 and int64 arrays of shape (n_queries, k); rows are -1 where the index
        had fewer than k results.
    """
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    k = int(min(k, index.ntotal))
    if k <= 0:
        n = queries.shape[0]
        return np.zeros((n, 0), np.float32), np.zeros((n, 0), np.int64)
    params = search_params(index, k, effort)
    if params is None:
        return index.search(queries, k)
    return index.search(queries, k, params=params)


class ExactHead:
    """Exact inner-product search over the ``size`` items of largest norm, with a proof.

    For an item ``x`` outside the head, ``q.x <= |q| |x| <= |q| bound``, where ``bound``
    is the largest norm outside the head. When the k-th best score in the head reaches
    ``|q| bound``, no other item can beat it: the head's top k is the exact top k of the
    whole catalogue, found by a sequential scan of a few MB (``FlatScan``: half precision
    first, then exactly the rows that may belong) rather than by a graph walk over the
    whole index that mostly misses the caches. Factors trained on
    implicit feedback have norms that follow popularity: on the 1M-item bench shop the
    6 912 largest-norm items proved the top 200 of every one of 2 000 users. A query the
    head cannot prove goes to the ANN index (:class:`Retriever`); the builder reports
    the share it proves for each bundle (``evaluation.exact_head_share``).

    The head is scanned in tiers of falling norm (the first ``first_tier`` items, by
    default half the head, then the rest), each tier with its own bound: most queries are
    proven by the first tier alone and never read the second (on the bench shop the first
    7 168 items prove the top 200 of every user), and a query the first cannot prove
    gets the same answer as from one scan of the whole head. The builder learns the first
    tier per bundle (:func:`choose_first_tier`).

    Parameters
    ----------
    item_factors : np.ndarray
        (n_items, d) float32, possibly memory-mapped.
    size : int
        Items in the head; more than the catalogue means all of it (always exact).
    first_tier : int, optional
        Items in the first tier, 1..size (size: one tier); None: half the head. Cut to
        the catalogue with the head.
    """

    def __init__(self, item_factors: np.ndarray, size: int, first_tier: int | None = None):
        n = item_factors.shape[0]
        if size < 1:
            raise ValueError(f"exact head size must be >= 1, got {size}")
        if first_tier is not None and not 1 <= first_tier <= size:
            raise ValueError(f"the exact head's first tier must be 1..{size} items (its size), got {first_tier}")
        norms = row_norms(item_factors)
        size = min(size, n)
        # Head rows by norm, largest first (ties by row), and the largest norm outside them.
        if size < n:
            part = np.argpartition(-norms, size)
            top, outside = part[:size], float(norms[part[size]])
        else:
            top, outside = np.arange(n), 0.0
        rows = top[np.lexsort((top, -norms[top]))].astype(np.int64)
        self.rows = rows
        self._norms = norms[rows]  # the head's norms, falling
        self.size = size
        self.complete = size >= n
        self.bound = outside * (1.0 + _BOUND_SLACK)
        # Tiers: (first position, flat index over its items, bound on every item after it).
        self.tiers: list[tuple[int, FlatScan, float]] = []
        first = size // 2 if first_tier is None else min(first_tier, size)
        cuts = [0, first, size] if 0 < first < size else [0, size]
        self.first_tier = cuts[1]
        for lo, hi in itertools.pairwise(cuts):
            self.tiers.append((lo, FlatScan(item_factors[rows[lo:hi]]), self.bound_after(hi)))

    def bound_after(self, position: int) -> float:
        """The largest norm of any item after the head's first ``position`` (with the float32
        slack): a query whose k-th best score among them reaches |query| x this is proven."""
        return float(self._norms[position]) * (1.0 + _BOUND_SLACK) if position < self.size else self.bound

    def _proven(self, tier: int, kth, qnorm):
        """Which queries the head's tiers up to ``tier`` prove, from their k-th best scores
        (arrays, or one query's floats: then one bool)."""
        if self.complete and tier == len(self.tiers) - 1:
            return np.ones(np.shape(kth), bool)  # every item has been scanned
        return kth >= qnorm * self.tiers[tier][2]

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Top ``k <= size`` head items per query and whether each query's answer is exact.

        Returns
        -------
        (scores, rows, certified) : float32 (n, k), int64 item rows (n, k), bool (n,)
        """
        if not 0 < k <= self.size:
            raise ValueError(f"k must be in 1..{self.size} for this head, got {k}")
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        return self._search(queries, k, norms(queries), None)

    def search_one(self, query: np.ndarray, k: int) -> tuple[np.ndarray, bool]:
        """:meth:`search` for one query (float32, (d,)): its top ``k`` head rows (int64, (k,))
        and whether they are exact.

        A served request's one query: most are proven by the first tier alone, and answered
        with a scalar certificate instead of a batch's arrays (the same answer as
        :meth:`search`'s, which the rest get, the first tier's scan not repeated).
        """
        if not 0 < k <= self.size:
            raise ValueError(f"k must be in 1..{self.size} for this head, got {k}")
        q = np.ascontiguousarray(query, dtype=np.float32).reshape(1, -1)
        qnorm = norms(q)
        scan = self.tiers[0][1]
        first = None
        if k <= scan.ntotal:
            first = scan.search(q, k)
            if self._proven(0, float(first[0][0, k - 1]), float(qnorm[0])):
                return self.rows.take(first[1][0]), True
        _, rows, certified = self._search(q, k, qnorm, first)
        return rows[0], bool(certified[0])

    def _search(
        self, queries: np.ndarray, k: int, qnorm: np.ndarray, first: tuple[np.ndarray, np.ndarray] | None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """:meth:`search` of checked ``queries`` with norms ``qnorm``; ``first``: the first
        tier's answer for them, when already scanned."""
        scores = np.full((len(queries), k), -np.inf, np.float32)
        pos = np.full((len(queries), k), -1, np.int64)
        todo = np.arange(len(queries))
        certified = np.zeros(len(queries), bool)
        for i, (lo, index, _) in enumerate(self.tiers):
            s, p = first if i == 0 and first is not None else index.search(queries[todo], min(k, index.ntotal))
            p = np.where(p >= 0, p + lo, -1)
            if i == 0:
                scores[:, : s.shape[1]], pos[:, : p.shape[1]] = s, p
            else:
                # Merge with the earlier tiers' best; on a tie the earlier (larger-norm) tier first.
                s = np.concatenate([scores[todo], s], axis=1)
                p = np.concatenate([pos[todo], p], axis=1)
                best = np.argsort(-s, axis=1, kind="stable")[:, :k]
                scores[todo] = np.take_along_axis(s, best, axis=1)
                pos[todo] = np.take_along_axis(p, best, axis=1)
            proven = self._proven(i, scores[todo, k - 1], qnorm[todo])
            certified[todo] = proven
            todo = todo[~proven]
            if len(todo) == 0:
                break
        return scores, self.rows[pos], certified


def first_tier_shares(item_factors: np.ndarray, queries: np.ndarray, k: int, size: int, tiers) -> dict[int, float]:
    """For each first tier of ``tiers`` (items, each below the head's ``size``), the share of
    ``queries`` (at least one) whose exact top ``k`` that tier alone proves (:class:`ExactHead`'s
    certificate)."""
    head = ExactHead(item_factors, size)
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    qnorm = norms(queries)
    out = {}
    for m in tiers:
        m = int(m)
        if not 0 < k <= m < head.size:
            raise ValueError(f"a first tier must hold k={k} to {head.size - 1} items, got {m}")
        kth = FlatScan(item_factors[head.rows[:m]]).search(queries, k)[0][:, k - 1]
        out[m] = float(np.mean(kth >= qnorm * head.bound_after(m)))
    return out


def choose_first_tier(
    item_factors: np.ndarray, queries: np.ndarray, k: int, size: int, keep: float = 0.999
) -> tuple[int, dict[int, float]]:
    """The exact head's first tier for these queries: the smallest, in sixteenths of the
    head up to its half, that proves at least ``keep`` of the queries the half proves.

    A smaller first tier scans fewer items for every query it proves, and sends the rest
    on to the second tier, which costs them about one more search: ``keep`` is high, so
    that stays rare. The half is kept when no smaller tier proves nearly as many, and when
    the half proves none. Returns the tier (items) and the share each candidate proved.
    """
    head_size = min(size, item_factors.shape[0])
    half = max(head_size // 2, 1)  # a one-item head is its own first tier: a tier holds an item
    if len(queries) == 0 or k <= 0:
        return half, {}
    tiers = sorted({head_size * j // 16 for j in range(1, 9)} | {half})
    tiers = [m for m in tiers if k <= m < head_size]
    if not tiers:
        return half, {}
    shares = first_tier_shares(item_factors, queries, k, size, tiers)
    if half not in shares or not shares[half] > 0:
        return half, shares  # no smaller tier holds k, or even the half proves none: nothing to gain
    enough = keep * shares[half]
    return next(m for m in tiers if shares[m] >= enough), shares


def refine_search(
    index: faiss.Index, item_factors: np.ndarray, queries: np.ndarray, k: int, effort: int, refine: float
) -> np.ndarray:
    """Top-``k`` item rows per query: the ANN index's top ``ceil(k * refine)``, re-ranked by the exact inner product.

    A quantised index (SQ8, SQ4, PQ) scores items by their codes: near the k-th the approximate
    scores reorder items and no search effort puts the right ones back. Asking for more than k
    and re-scoring them with the float32 factors (what FAISS's ``IndexRefineFlat`` does, here with
    the factors the bundle already holds, so the index file does not grow) recovers them.

    Parameters
    ----------
    index : faiss.Index
        The ANN index over every row of ``item_factors``.
    item_factors : np.ndarray
        (n_items, d) float32, possibly memory-mapped: the exact scores.
    queries : np.ndarray
        (n, d) query rows.
    k : int
        Results per query (at most ``index.ntotal``).
    effort : int
        The ANN search effort (:func:`search_params`).
    refine : float
        >= 1: how many more than ``k`` the index is asked for (capped at ``index.ntotal``).

    Returns
    -------
    np.ndarray
        int64 (n, k) item rows, best first; ties by the lower row; -1 where the index had
        fewer than k results.
    """
    if refine < 1.0:
        raise ValueError(f"refine must be >= 1 (1: no re-ranking), got {refine}")
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    k = int(min(k, index.ntotal))
    wide = int(min(math.ceil(k * refine), index.ntotal))
    _, rows = ann_search(index, queries, wide, effort)
    if wide <= k or len(queries) == 0:
        return rows
    valid = rows >= 0
    # Gather each query's candidates (a few hundred rows of d floats) and score them exactly.
    vectors = np.asarray(item_factors[np.where(valid, rows, 0)], dtype=np.float32)
    scores = np.einsum("nkd,nd->nk", vectors, queries)
    scores[~valid] = -np.inf
    # Deterministic ties: candidates in row order first, then a stable sort by falling score.
    by_row = np.argsort(np.where(valid, rows, np.iinfo(np.int64).max), axis=1, kind="stable")
    rows = np.take_along_axis(rows, by_row, axis=1)
    scores = np.take_along_axis(scores, by_row, axis=1)
    best = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(rows, best, axis=1)


class Retriever:
    """Top-k item rows per query: the exact head when it can prove its answer, else the ANN index.

    Parameters
    ----------
    index : faiss.Index
        The bundle's ANN index over every item.
    head : ExactHead or None
        None searches the ANN index only.
    item_factors : np.ndarray or None
        The bundle's (n_items, d) item factors; needed when ``refine > 1``.
    refine : float
        >= 1. A query the head cannot prove asks the index for ``ceil(k * refine)`` items and
        keeps the ``k`` best by the exact inner product (:func:`refine_search`); 1: the index's
        own top ``k``.

    Raises
    ------
    ValueError
        ``refine`` below 1, or above 1 without ``item_factors``.
    """

    def __init__(
        self,
        index: faiss.Index,
        head: ExactHead | None,
        item_factors: np.ndarray | None = None,
        refine: float = 1.0,
    ):
        if not refine >= 1.0:  # also refuses NaN
            raise ValueError(f"refine must be >= 1 (1: no re-ranking), got {refine}")
        if refine > 1.0 and item_factors is None:
            raise ValueError(f"refine {refine} re-ranks by the exact inner product: it needs the item factors")
        if item_factors is not None and item_factors.shape[0] != index.ntotal:
            raise ValueError(f"{item_factors.shape[0]} item factor rows for an index of {index.ntotal} items")
        self.index = index
        self.head = head
        self.item_factors = item_factors
        self.refine = float(refine)

    def _ann(self, queries: np.ndarray, k: int, effort: int) -> np.ndarray:
        if self.refine > 1.0 and self.item_factors is not None:
            return refine_search(self.index, self.item_factors, queries, k, effort, self.refine)
        return ann_search(self.index, queries, k, effort)[1]

    def search(self, queries: np.ndarray, k: int, effort: int) -> tuple[np.ndarray, np.ndarray]:
        """Item rows (int64, (n, k), -1 padded) and, per query, whether the head answered exactly."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        n = len(queries)
        k = int(min(k, self.index.ntotal))
        head = self.head
        if head is None or k <= 0 or k > head.size:
            return self._ann(queries, k, effort), np.zeros(n, bool)
        _, rows, exact = head.search(queries, k)
        if not exact.all():
            miss = ~exact
            rows[miss] = self._ann(queries[miss], k, effort)
        return rows, exact

    def search_one(self, query: np.ndarray, k: int, effort: int) -> tuple[np.ndarray, bool]:
        """:meth:`search` for one query (float32, (d,)): its item rows (int64, (k,)) and whether
        the head answered exactly, without a batch's arrays when the head proves it."""
        head, k = self.head, int(k)
        if head is None or not 0 < k <= min(head.size, self.index.ntotal):
            rows, exact = self.search(query[None, :], k, effort)  # the index's own search, or a clamped k
            return rows[0], bool(exact[0])
        rows, proven = head.search_one(query, k)
        if not proven:
            rows = self._ann(np.ascontiguousarray(query[None, :], dtype=np.float32), k, effort)[0]
        return rows, proven
