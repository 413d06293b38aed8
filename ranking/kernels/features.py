"""Public API of the compiled feature kernel: one request's feature matrix in one call without the GIL.

:class:`FeatureKernel` is built once per bundle (where the bundle is loaded: before the
server forks its workers) and checks the bundle's tables once, so a request pays only
for validating its own small arrays. ``ranking.pipeline.features`` resolves the request
(time, hour block, context columns); the Ranker then merges a request's candidates,
writes their features and scores them in one call (:meth:`FeatureKernel.candidates_fill_score`),
or in two when a request's rules need more bits than the category codes have
(:meth:`FeatureKernel.candidates`, then :meth:`FeatureKernel.fill_score`); the builder's
training rows come from :meth:`FeatureKernel.fill`. Other packages import only this module.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt

from ranking.kernels import _features
from ranking.kernels.rows import CandidateIndex, ItemScratch, _int32_rows
from ranking.kernels.scoring import _NO_ROOTS, TopK, TreeCall, checked_phases, loop_ints

__all__ = ["COLUMNS", "Answer", "Demotions", "FeatureKernel", "RealtimeOffsets"]


class RealtimeOffsets(NamedTuple):
    """What a customer's events since the bundle add to their candidates' scores, for
    :meth:`FeatureKernel.candidates_fill_score` to compute after the merge
    (``ranking.pipeline.overlay.RankOverlay.offsets`` computes the same in NumPy).

    Attributes
    ----------
    skip_rows : np.ndarray
        Skipped items (int32 rows): a candidate loses ``skip_penalty`` times its largest cosine
        with them.
    interest_rows : np.ndarray
        Recent items (int32 rows): a candidate gains up to ``interest_boost`` by its largest
        cosine with them, scaled to the request's candidates.
    inv_norms : np.ndarray
        1/|factor| of every item (float32).
    skip_penalty, interest_boost : float
    """

    skip_rows: np.ndarray
    interest_rows: np.ndarray
    inv_norms: np.ndarray
    skip_penalty: float
    interest_boost: float


class Demotions(NamedTuple):
    """Rules' demotions for :meth:`FeatureKernel.candidates_fill_score` to apply after the merge
    (at most 32).

    Attributes
    ----------
    codes : np.ndarray
        uint32 per category: bit b set where demotion b applies.
    amounts : np.ndarray
        float32 per demotion: what a candidate in its categories loses.
    names : tuple of str
        Each demotion's name among the answer's offset parts.
    """

    codes: np.ndarray
    amounts: np.ndarray
    names: tuple[str, ...]


class Answer(NamedTuple):
    """What :meth:`FeatureKernel.candidates_fill_score` returns.

    Attributes
    ----------
    rows, mask : np.ndarray
        The candidates (int32 item rows) and which of them are excluded (bool).
    features : np.ndarray
        Their feature rows (float32, one per candidate; unwritten when ``top`` is None).
    top : TopK or None
        The answer; None when the deadline had passed once the candidates were merged.
    n_second : int
        Rows the second phase was to complete (0: one phase).
    second_cut : bool
        Whether the plan cut the second phase to the time left.
    merged_ns, filled_ns : int
        CLOCK_MONOTONIC nanoseconds when the candidates were merged and their rows written.
    offsets : np.ndarray or None
        The real-time score offset of every candidate (float32, scaled), None without
        :class:`RealtimeOffsets`.
    offset_parts : dict
        ``"realtime_skip"``, ``"realtime_interest"`` and each demotion's name: what each added,
        where it applied (explain).
    """

    rows: np.ndarray
    mask: np.ndarray
    features: np.ndarray
    top: TopK | None
    n_second: int
    second_cut: bool
    merged_ns: int
    filled_ns: int
    offsets: np.ndarray | None
    offset_parts: dict[str, np.ndarray]


COLUMNS: tuple[str, ...] = tuple(_features.COLUMNS)

# Every table the kernel reads, by bundle array name, with its dtype (ranking.bundle.schema).
_TABLES = {
    "item_factors": np.float32,
    "item_popularity": np.float32,
    "item_price": np.float32,
    "item_repeat_rate": np.float32,
    "item_repeat_interval": np.float32,
    "item_events_7d_at_end": np.float32,
    "item_events_30d_at_end": np.float32,
    "item_first_seen": np.int64,
    "item_event_keys": np.int64,
    "item_hour_lift": np.float32,
    "item_weekday_lift": np.float32,
    "item_cat_indptr": np.int64,
    "item_cat_ids": np.int32,
    "covis_indptr": np.int64,
    "covis_items": np.int32,
    "covis_scores": np.float32,
    "segment_pop_indptr": np.int64,
    "segment_pop_items": np.int32,
    "segment_pop_scores": np.float32,
    "ease_weights": np.float32,
    "user_has_history": np.uint8,
    "user_first_seen": np.int64,
    "user_last_seen": np.int64,
    "user_stage": np.int8,
    "user_value": np.float32,
    "user_log_price": np.float32,
    "user_repeat_share": np.float32,
    "user_baskets": np.int32,
    "user_hour_share": np.float32,
    "user_cat_indptr": np.int64,
    "user_cat_ids": np.int32,
    "user_cat_share": np.float32,
    "user_recent_indptr": np.int64,
    "user_recent_items": np.int32,
    "touched_indptr": np.int64,
    "touched_items": np.int32,
    "user_buy_indptr": np.int64,
    "user_buy_items": np.int32,
    "user_buy_baskets": np.float32,
    "user_buy_interval": np.float32,
    "user_buy_last": np.int64,
    "user_buy_in_last": np.uint8,
    "popular_items": np.int32,
    "recent_popular_items": np.int32,
    "item_reoffer": np.uint8,
    "consumed_indptr": np.int64,
    "consumed_indices": np.int32,
}
_CONTEXT_FIELDS = ("channel", "device", "region")  # the kernel's order
# The CSR structures the kernel walks: (indptr, ids, what the rows are, what the ids name).
_CSRS = (
    ("covis_indptr", "covis_items", "items", "items"),
    ("segment_pop_indptr", "segment_pop_items", None, "items"),
    ("user_recent_indptr", "user_recent_items", "users", "items"),
    ("touched_indptr", "touched_items", "users", "items"),
    ("user_buy_indptr", "user_buy_items", "users", "items"),
    ("consumed_indptr", "consumed_indices", "users", "items"),
    ("item_cat_indptr", "item_cat_ids", "items", "categories"),
    ("user_cat_indptr", "user_cat_ids", "users", "categories"),
)
_NO_PURCHASES = (np.zeros(0, np.int32), np.zeros(0, np.int64))
_NO_VECTOR = np.zeros(0, np.float32)
_NO_CONTEXT = np.full(3, -1, np.int32)  # no context field's column (the kernel only reads it)
_I32, _F64, _F32, _U8 = (np.zeros(0, t) for t in (np.int32, np.float64, np.float32, np.uint8))
_U32: npt.NDArray[np.uint32] = np.zeros(0, np.uint32)
# fill_score's scoring arguments (in TreeCall.kernel_args' order) with nothing to score into: rows only.
_NO_SCORING: tuple = (_I32, _I32, _I32, _F64, _I32, _I32, _U8, _F64, _U8, _F32, 0, 0, 1, _F64, _F32, _I32, _F32, _I32)


def _table(bundle_array, name: str, dtype) -> np.ndarray:
    arr = np.asarray(bundle_array(name))
    if arr.dtype != dtype:
        raise ValueError(f"bundle array {name} has dtype {arr.dtype}, the feature kernel reads {np.dtype(dtype)}")
    return np.ascontiguousarray(arr)


class FeatureKernel:
    """The bundle's feature tables, checked once, and the one call that writes a request's rows.

    Parameters
    ----------
    bundle_array : callable
        ``name -> array`` of the bundle (``ranking.bundle.Bundle.array``; memory-mapped).
    n_categories : int
        Entries of the bundle's category table.
    data_end : int
        Unix seconds of the bundle's last event.

    Raises
    ------
    ValueError
        A table the kernel reads has another dtype or shape, or names a row outside the
        catalog: the bundle is inconsistent and must be rebuilt.
    """

    def __init__(self, bundle_array, n_categories: int, data_end: int):
        t = {name: _table(bundle_array, name, dtype) for name, dtype in _TABLES.items()}
        for field in _CONTEXT_FIELDS:
            for kind in (f"item_{field}_lift", f"user_{field}_share"):
                # float16 in the bundle: the kernel reads the bits and widens them itself.
                t[kind] = _table(bundle_array, kind, np.float16).view(np.uint16)
        n_items, n_users = len(t["item_factors"]), len(t["user_has_history"])
        if t["ease_weights"].size == 0:
            t["ease_weights"] = np.zeros((0, 0), np.float32)
        elif t["ease_weights"].shape != (n_items, n_items):
            raise ValueError(f"ease_weights has shape {t['ease_weights'].shape}, expected ({n_items}, {n_items})")
        self._check(t, n_items, n_users, n_categories)
        for name in ("popular_items", "recent_popular_items"):
            if t[name].size and (int(t[name].min()) < 0 or int(t[name].max()) >= n_items):
                raise ValueError(f"bundle array {name} names items outside 0..{n_items - 1}: rebuild the bundle")
        if len(t["item_reoffer"]) != n_items:
            raise ValueError(f"bundle array item_reoffer has {len(t['item_reoffer'])} entries for {n_items} items")
        self.n_items, self.n_users, self.n_categories = n_items, n_users, int(n_categories)
        self.dim = t["item_factors"].shape[1]
        self.widths = tuple(t[f"item_{f}_lift"].shape[1] for f in _CONTEXT_FIELDS)
        self.hour_blocks = t["item_hour_lift"].shape[1]
        self.n_segments = len(t["segment_pop_indptr"]) - 1
        self._tables = t  # the kernel holds views of these; keep them alive with it
        self._bound_trees: tuple[Any, Any, _features.TreeArgs] | None = None  # _tree_args' last pair
        self._kernel = _features.FeatureKernel(t, int(n_categories), int(data_end))

    @staticmethod
    def _check(t: dict[str, np.ndarray], n_items: int, n_users: int, n_categories: int) -> None:
        sizes = {"items": n_items, "users": n_users, "categories": n_categories}
        for indptr, ids, rows, names in _CSRS:
            ptr, got = t[indptr], t[ids]
            if rows is not None and len(ptr) != sizes[rows] + 1:
                raise ValueError(f"bundle array {indptr} has {len(ptr)} entries for {sizes[rows]} {rows}")
            if len(ptr) == 0 or ptr[0] != 0 or ptr[-1] != len(got) or np.any(np.diff(ptr) < 0):
                raise ValueError(f"bundle array {indptr} is not a CSR row index over {ids}: rebuild the bundle")
            if got.size and (int(got.min()) < 0 or int(got.max()) >= sizes[names]):
                raise ValueError(f"bundle array {ids} names {names} outside 0..{sizes[names] - 1}: rebuild the bundle")

    def fill(self, X: np.ndarray, index: CandidateIndex, **request) -> None:
        """Write every cell of ``X`` (n_candidates, len(COLUMNS)) float32 C-contiguous.

        ``request`` holds ``rung``, ``urow``, ``seg``; ``t``, the request's unix seconds;
        ``t_pop``, the time the item windows are read at (``at_end``: the bundle's
        precomputed end windows); ``block`` and ``weekday``, its hour block and day of week;
        ``qvec`` (None: no query vector); ``session`` (item rows); ``context_columns``, the
        column of each context field's value (-1: none); ``purchases``, the (item rows,
        unix seconds) bought since the data end, or None.

        Raises
        ------
        ValueError
            An argument is out of range or of the wrong shape.
        """
        args = self._args(X, index, **request)
        if len(index.cands):
            self._raise_for(self._kernel.fill_score(*args, *_NO_SCORING)[0])

    def fill_score(self, X: np.ndarray, index: CandidateIndex, call: TreeCall, **request) -> tuple[TopK, int]:
        """:meth:`fill`, then the top-k of ``call`` (a validated tree-scoring call over these
        rows) in the same compiled call, without the GIL in between.

        Returns
        -------
        (TopK, int)
            The answer, and the CLOCK_MONOTONIC nanoseconds at which the rows were written.
        """
        args = self._args(X, index, **request)
        if not len(index.cands) or call.k == 0:
            return call.top(0, len(index.cands), 0, 0), time.monotonic_ns()
        status, n_kept, n_scored, n_done, n_planned, filled_ns = self._kernel.fill_score(*args, *call.kernel_args())
        self._raise_for(status)
        return call.top(n_kept, n_scored, n_done, n_planned), filled_ns

    def candidates_fill_score(
        self,
        scratch: ItemScratch,
        pool,
        request: dict,
        *,
        trees,
        phases,
        k: int,
        n_second: int,
        deadline_ns: int = 0,
        plan: tuple[float, float, float] | None = None,
        check_every: int = 32,
        realtime: RealtimeOffsets | None = None,
        offset_scale: float = 1.0,
        demotions: Demotions | None = None,
        **sources,
    ) -> Answer:
        """:meth:`candidates`, :meth:`fill` and the trees' top-k over the rows, in one compiled
        call without the GIL: a request's one crossing.

        ``pool`` and ``sources`` are :meth:`candidates`' arguments (``t`` its buy-again time)
        but for ``seg``, ``session`` and ``purchases``, which are ``request``'s (:meth:`fill`'s
        arguments), checked once for both; ``trees``, ``phases`` (None: one phase), ``k``,
        ``n_second`` (0: one phase), ``deadline_ns`` and ``check_every`` are a tree-scoring
        call's (``ranking.kernels.scoring.TreeCall``). With ``plan`` = (first-phase ms per row, ms per
        row of the trees the second adds, share of the time left to use) and a deadline, the
        second phase is first cut to what the time left after the merge affords, as
        ``ranking.pipeline.budget.CostModel.plan_second_phase`` does. With ``realtime``, every
        candidate's real-time offset, and with ``demotions`` the rules', times ``offset_scale``,
        is added to its score, and returned.

        Raises
        ------
        ValueError
            An argument is out of range or of the wrong shape.
        """
        weights, req = self._request_args(**request)
        rung, urow, seg, t, t_pop, at_end, block, weekday, qvec, session, ctx_cols, p_rows, p_times = req
        args = self._candidate_args(pool, session, p_rows, p_times, seg=seg, **sources)
        tree_args = self._tree_args(trees, phases)
        k, n_second, deadline_ns, check_every = loop_ints(k, n_second, deadline_ns, check_every)
        first_ms, rest_ms, safety = plan if plan is not None else (-1.0, 0.0, 1.0)
        if plan is not None and not (first_ms >= 0 and rest_ms >= 0 and 0 < safety <= 1):
            raise ValueError(f"a second-phase plan needs costs >= 0 and a share in (0, 1], got {plan}")
        offset_args = self._offset_args(realtime, offset_scale, demotions)
        with scratch.buffers() as (slot, mark):
            (rows, mask, X, out_scores, out_indices, status, expired, n_kept, n_scored, n_done, n_planned, n2, cut,
             merged_ns, filled_ns, offsets, parts) = self._kernel.candidates_fill_score(*(
                *args,
                slot,
                mark,
                weights,
                rung,
                urow,
                t,
                t_pop,
                at_end,
                block,
                weekday,
                qvec,
                ctx_cols,
                tree_args,
                k,
                n_second,
                deadline_ns,
                check_every,
                float(first_ms),
                float(rest_ms),
                float(safety),
                *offset_args,
            ))  # fmt: skip
        self._raise_for(status)
        top = None
        if not expired:
            scores, indices = out_scores[:n_kept], out_indices[:n_kept]
            top = TopK(indices, scores, n_scored, n_done, n_done < n_planned) if n2 else TopK(indices, scores, n_scored)
        named = {}
        if parts is not None:
            applied = (("realtime_skip", parts[0], offset_args[0]), ("realtime_interest", parts[1], offset_args[1]))
            named = {name: part for name, part, rows in applied if len(rows)}
            if demotions is not None:
                named.update(zip(demotions.names, parts[2:]))
        return Answer(rows, mask, X, top, n2, bool(cut), merged_ns, filled_ns, offsets, named)

    def _tree_args(self, trees, phases) -> _features.TreeArgs:
        """``trees`` and ``phases`` (None: one phase) checked and taken as the compiled call's
        typed views once, then reused while the same pair is passed (a ranker passes its own
        model's on every request)."""
        bound = self._bound_trees
        if bound is not None and bound[0] is trees and bound[1] is phases:
            return bound[2]
        checked = checked_phases(trees, phases, len(COLUMNS))
        args = _features.TreeArgs(
            trees.roots,
            checked.roots_first if checked is not None else _NO_ROOTS,
            checked.roots_second if checked is not None else _NO_ROOTS,
            checked is not None,
            trees.feature,
            trees.threshold,
            trees.left,
            trees.right,
            trees.flags,
            trees.leaf_value,
        )
        self._bound_trees = (trees, phases, args)  # one assignment: threads see the old pair or the new
        return args

    def _offset_args(
        self, realtime: RealtimeOffsets | None, scale: float, demotions: Demotions | None
    ) -> tuple[Any, ...]:
        """The compiled call's offset arguments, checked: nothing applies without ``realtime``
        and ``demotions``."""
        if not (math.isfinite(scale) and scale >= 0):
            raise ValueError(f"the offsets' scale must be finite and >= 0, got {scale}")
        demote: tuple[Any, ...] = (_U32, _F32)
        if demotions is not None:
            codes = np.ascontiguousarray(demotions.codes, np.uint32)
            amounts = np.ascontiguousarray(demotions.amounts, np.float32)
            if codes.shape != (self.n_categories,):
                raise ValueError(f"demotion codes need one entry per category ({self.n_categories}), got {codes.shape}")
            if not (amounts.ndim == 1 and len(amounts) == len(demotions.names) <= 32 and np.isfinite(amounts).all()):
                raise ValueError(f"demotions need at most 32 finite amounts, one per name, got {amounts!r}")
            demote = (codes, amounts)
        if realtime is None:
            return _I32, _I32, _F32, 0.0, 0.0, float(scale), *demote
        skips = _int32_rows("skipped items", realtime.skip_rows, self.n_items)
        interests = _int32_rows("recent items", realtime.interest_rows, self.n_items)
        inv_norms = np.ascontiguousarray(realtime.inv_norms, dtype=np.float32)
        if inv_norms.shape != (self.n_items,):
            raise ValueError(f"inverse factor norms need one entry per item ({self.n_items}), got {inv_norms.shape}")
        numbers = {"skip penalty": realtime.skip_penalty, "interest boost": realtime.interest_boost}
        bad = {k: v for k, v in numbers.items() if not (np.isfinite(v) and v >= 0)}
        if bad:
            raise ValueError(f"real-time offsets need finite values >= 0, got {bad}")
        if realtime.interest_boost == 0:
            interests = _I32  # no boost: nothing to compute
        return (
            skips,
            interests,
            inv_norms,
            float(realtime.skip_penalty),
            float(realtime.interest_boost),
            float(scale),
            *demote,
        )

    def candidates(
        self, scratch: ItemScratch, pool, *, session=_I32, purchases: tuple | None = None, **sources
    ) -> tuple[np.ndarray, np.ndarray]:
        """One request's candidates from every source, merged, and which of them to exclude, in one call.

        The sources, in the order their items are kept (each item once, where first met):
        ``pool`` (the embedding search's item rows or the caller's own; -1 = none), the first
        ``n_seg`` popular items of segment ``seg`` (-1: none), the first ``n_popular`` popular
        items; then from ``source_user``'s history (-1: nobody) and ``session``: the
        ``n_again`` re-offerable purchases most due again at ``t`` (``purchases``, the
        (item rows, unix seconds) bought since the data end, folded in), the ``n_covis``
        strongest co-visitation neighbours, the first ``n_recent_popular`` recently popular
        items and the ``n_ease`` items of highest EASE score (each 0: none).

        Excluded: what ``mask_user`` (-1: nobody) consumed, the ``exclude`` item rows (-1
        ignored), items whose categories' ``category_codes`` (uint32 per category; None: no
        category filter) OR to a value with bit 0 set or without every bit of
        ``include_bits``, and, with ``min_price``/``max_price`` (0: no bound), items outside
        the bounds or without a price.

        Returns
        -------
        (rows, mask)
            int32 distinct item rows, and a bool per row: True to exclude.

        Raises
        ------
        ValueError
            An argument is out of range or of the wrong shape.
        """
        args = self._candidate_args(
            pool, _int32_rows("session", session, self.n_items), *self._purchases(purchases), **sources
        )
        with scratch.buffers() as (slot, mark):
            return self._kernel.candidates(*(*args, slot, mark))

    def _candidate_args(
        self,
        pool,
        session: np.ndarray,
        p_rows: np.ndarray,
        p_times: np.ndarray,
        *,
        seg: int = -1,
        n_seg: int = 0,
        n_popular: int = 0,
        source_user: int = -1,
        n_again: int = 0,
        t: int = 0,
        n_covis: int = 0,
        n_recent_popular: int = 0,
        n_ease: int = 0,
        mask_user: int = -1,
        exclude=_I32,
        category_codes: np.ndarray | None = None,
        include_bits: int = 0,
        min_price: float = 0.0,
        max_price: float = 0.0,
    ) -> tuple[Any, ...]:
        """:meth:`candidates`' arguments, checked (``session`` and the purchases already are), in
        the compiled entry's order, the scratch left out."""
        self._check_rows(source_user, seg)
        self._check_rows(mask_user, -1)
        if min(n_seg, n_popular, n_again, n_covis, n_recent_popular, n_ease) < 0:
            counts = {"n_seg": n_seg, "n_popular": n_popular, "n_again": n_again, "n_covis": n_covis}
            counts |= {"n_recent_popular": n_recent_popular, "n_ease": n_ease}
            raise ValueError(f"candidate counts must be >= 0, got { {k: v for k, v in counts.items() if v < 0} }")
        if not (min_price >= 0 and max_price >= 0):  # NaN too
            raise ValueError(f"price bounds must be >= 0 (0: none), got {min_price}, {max_price}")
        codes: npt.NDArray[np.uint32]
        if category_codes is None:
            codes = _U32
        else:
            codes = np.ascontiguousarray(category_codes, np.uint32)
            if codes.shape != (self.n_categories,):
                raise ValueError(f"category codes must have one entry per category ({self.n_categories})")
        if not 0 <= include_bits < 1 << 32:
            raise ValueError(f"include bits {include_bits} do not fit the uint32 category codes")
        return (
            _int32_rows("candidate pool", pool, self.n_items, allow_missing=True),
            int(seg),
            int(n_seg),
            int(n_popular),
            int(source_user),
            session,
            int(n_again),
            int(t),
            p_rows,
            p_times,
            int(n_covis),
            int(n_recent_popular),
            int(n_ease),
            int(mask_user),
            _int32_rows("excluded items", exclude, self.n_items, allow_missing=True),
            codes,
            int(include_bits),
            float(min_price),
            float(max_price),
        )

    def _check_rows(self, urow: int, seg: int) -> None:
        if not -1 <= urow < self.n_users or not -1 <= seg < self.n_segments:
            raise ValueError(f"user row {urow} or segment {seg} outside the bundle")

    def _purchases(self, purchases: tuple[np.ndarray, np.ndarray] | None) -> tuple[np.ndarray, np.ndarray]:
        if purchases is None:
            return _NO_PURCHASES
        p_rows, p_times = purchases
        p_rows = _int32_rows("purchases", p_rows, self.n_items)
        p_times = np.ascontiguousarray(p_times, np.int64)
        if p_times.shape != p_rows.shape:
            raise ValueError("purchases need one time per item row")
        return p_rows, p_times

    @staticmethod
    def _raise_for(status: int) -> None:
        if status == _features.NO_MEMORY:
            raise MemoryError("no memory for the feature kernel's scratch")
        if status < 0:
            raise ValueError("the bundle's feature tables name a row outside the catalog: rebuild it")

    def _args(self, X: np.ndarray, index: CandidateIndex, **request) -> tuple:
        """The compiled entries' arguments up to the scoring ones, checked (``request``: :meth:`fill`'s)."""
        n = len(index.cands)
        if X.shape != (n, len(COLUMNS)) or X.dtype != np.float32 or not X.flags.c_contiguous:
            raise ValueError(f"X must be a C-contiguous float32 ({n}, {len(COLUMNS)}) array")
        weights, checked = self._request_args(**request)
        return (X, index.cands, index._slot, index.mark, np.empty(n, np.float64), weights, *checked)

    def _request_args(
        self,
        *,
        rung: int,
        urow: int,
        seg: int,
        t: int,
        t_pop: int,
        at_end: bool,
        block: int,
        weekday: int,
        qvec: np.ndarray | None,
        session: np.ndarray,
        context_columns: Sequence[int],
        purchases: tuple[np.ndarray, np.ndarray] | None,
    ) -> tuple[np.ndarray, tuple]:
        """The feature walk's scratch ``weights`` and its request arguments (``rung`` on), checked."""
        self._check_rows(urow, seg)
        if not (0 <= block < self.hour_blocks and 0 <= weekday < 7):
            raise ValueError(f"hour block {block} / weekday {weekday} out of range")
        none = type(context_columns) is tuple and context_columns == (-1, -1, -1)
        cols = _NO_CONTEXT if none else np.asarray(context_columns, np.int32)
        w0, w1, w2 = self.widths
        if cols.shape != (3,) or not (cols[0] < w0 and cols[1] < w1 and cols[2] < w2):
            raise ValueError(f"context columns {tuple(cols)} outside the bundle's {self.widths}")
        if qvec is None:
            q = _NO_VECTOR
        else:
            q = np.ascontiguousarray(qvec, np.float32)
            if q.shape != (self.dim,):
                raise ValueError(f"query vector has shape {q.shape}, expected ({self.dim},)")
        sess = _int32_rows("session", session, self.n_items)
        p_rows, p_times = self._purchases(purchases)
        recent = 0
        if urow >= 0:
            ptr = self._tables["user_recent_indptr"]
            recent = int(ptr[urow + 1] - ptr[urow])
        return np.empty(max(recent, len(sess), 1), np.float32), (
            int(rung),
            int(urow),
            int(seg),
            int(t),
            int(t_pop),
            bool(at_end),
            int(block),
            int(weekday),
            q,
            sess,
            cols,
            p_rows,
            p_times,
        )
