"""Private compiled kernel: one request's reranker feature rows, in one pass without the GIL.

Do not import this module outside ``ranking/``; ``ranking.kernels.features`` checks the
bundle's tables once when it builds a :class:`FeatureKernel`, validates each request's
small arrays and lends the scratch. Compiler directives come from ``setup.py``.

What each feature means is documented once, beside its name in
``ranking.pipeline.features.FEATURE_NAMES``; ``COLUMNS`` below lists the same names in the
same order (checked at import). The NumPy version the serving path used before is kept
as the test oracle (``tests/feature_oracle.py``): every feature agrees within
float32 rounding on randomized requests.

Layers (as in sklearn's ``_loss``):

1. ``_half``, ``_rank_key``, ``_count_before``, ``_linspace_at``: scalars, ``cdef inline``.
2. ``FeatureKernel._fill`` and the ``_fill_*`` helpers: loops over the bundle's typed
   memoryviews, nogil; inputs are trusted (checked by the wrapper), and the one walk that
   can meet a bad id (``_sum_rows_loop``) reports it by a negative return value.
3. ``FeatureKernel.candidates``, ``fill_score`` and ``candidates_fill_score``: the
   Python-visible entries; each sizes its buffers, then releases the GIL around the
   merge of the candidate sources (``_merge``), ``_fill`` and the tree scoring that
   follows it. The last does all three: one crossing for a request's candidates,
   features, scores and top-k.
4. ``ranking.kernels.features``: the public wrapper.
"""
from libc.math cimport NAN, exp, fabs, fabsf, log, logf, log1pf, sqrtf, ldexpf, INFINITY
from libc.stdlib cimport malloc, free, qsort
from libc.string cimport memcpy, memset

import numpy as np

from ranking.kernels._common cimport _dot, _row_max
from ranking.kernels._rows cimport _sum_rows_loop
from ranking.kernels._scoring cimport _score_trees_call
from posix.time cimport clock_gettime, timespec, CLOCK_MONOTONIC
from ranking.kernels._typedefs cimport float32_t, float64_t, int32_t, int64_t, uint8_t

cdef extern from *:
    """
    static inline void one2one_prefetch(const void *p) { __builtin_prefetch(p, 0, 1); }
    """
    void _prefetch "one2one_prefetch"(const void* p) noexcept nogil

ctypedef unsigned short uint16_t
ctypedef unsigned int uint32_t
ctypedef unsigned long long uint64_t
ctypedef signed char int8_t

cdef enum:
    DAY = 86400

# Columns of FeatureKernel.item_rows before the hour blocks (then 7 weekdays, then each
# context field's values).
cdef enum:
    R_POP = 0
    R_END_POP_7D  # the three popularity-window features at the data end (_pop_windows)
    R_END_POP_30D
    R_END_TREND
    R_AGE_AT_END
    R_PRICE
    R_LOG_PRICE  # logf of the price, for the price fit
    R_REPEAT_RATE
    R_REPEAT_INTERVAL
    R_HOUR

# _fill's return value when scratch memory could not be had (any other negative value:
# a bundle table names a row outside the catalog).
NO_MEMORY = -(1 << 62)
cdef Py_ssize_t _NO_MEMORY = NO_MEMORY

COLUMNS = (
    "als_score", "covis_user", "covis_session", "session_similarity", "ease_score",
    "popularity", "popularity_7d", "popularity_30d", "trend", "item_age_days", "price",
    "segment_popularity", "category_affinity", "price_fit", "touched_not_consumed",
    "buy_count", "buy_share", "days_since_bought", "buy_interval_days", "buy_due",
    "in_last_basket", "item_repeat_rate", "user_repeat_share", "user_stage", "user_value",
    "user_recency_days", "user_tenure_days", "hour_item_lift", "weekday_item_lift",
    "hour_user_share", "rung", "days_after_data_end", "als_rank", "ease_rank",
    "covis_user_rank", "popularity_30d_rank", "channel_item_lift", "device_item_lift",
    "region_item_lift", "channel_user_share", "device_user_share", "region_user_share",
)

cdef enum:
    ALS = 0
    COVIS_USER
    COVIS_SESSION
    SESSION_SIM
    EASE
    POP
    POP_7D
    POP_30D
    TREND
    ITEM_AGE
    PRICE
    SEG_POP
    CAT_AFFINITY
    PRICE_FIT
    TOUCHED_NOT_CONSUMED
    BUY_COUNT
    BUY_SHARE
    DAYS_SINCE_BOUGHT
    BUY_INTERVAL
    BUY_DUE
    IN_LAST_BASKET
    ITEM_REPEAT_RATE
    USER_REPEAT_SHARE
    USER_STAGE
    USER_VALUE
    USER_RECENCY
    USER_TENURE
    HOUR_ITEM_LIFT
    WEEKDAY_ITEM_LIFT
    HOUR_USER_SHARE
    RUNG
    DAYS_AFTER_END
    ALS_RANK
    EASE_RANK
    COVIS_USER_RANK
    POP_30D_RANK
    CTX_ITEM_LIFT  # channel, device, region: CTX_ITEM_LIFT + field
    CTX_USER_SHARE = CTX_ITEM_LIFT + 3
    N_COLUMNS = CTX_USER_SHARE + 3

assert len(COLUMNS) == N_COLUMNS

# Scratch of no rows, for a request without offsets (written by nobody).
_NO_ROWS_2D = np.zeros((0, 0), np.float32)
# The co-visitation sources' weights, all 1 and read only: cut to each request's sources,
# replaced by a longer one when a request has more (a request holding the old keeps it).
cdef const float32_t[::1] _ONES = np.ones(256, np.float32)


# ---------------------------------------------------------------------------
# Layer 1: scalars
# ---------------------------------------------------------------------------

cdef inline float32_t _half(uint16_t h) noexcept nogil:
    """An IEEE half (the bundle's context tables are float16) as float32."""
    cdef int exponent = (h >> 10) & 0x1F
    cdef int mantissa = h & 0x3FF
    cdef float32_t v
    if exponent == 0:
        v = ldexpf(<float32_t>mantissa, -24)
    elif exponent == 31:
        v = NAN if mantissa else INFINITY
    else:
        v = ldexpf(<float32_t>(mantissa + 1024), exponent - 25)
    return -v if h & 0x8000 else v


cdef inline uint64_t _rank_key(float32_t v, Py_ssize_t i) noexcept nogil:
    """A key whose ascending order is: larger ``v`` first, NaN last, ties by ``i`` (as a
    stable argsort of ``-v``)."""
    cdef float32_t w = -v
    cdef uint32_t sign = (<uint32_t>1) << 31
    cdef uint32_t bits
    if v != v:
        bits = ~(<uint32_t>0)
    else:
        if w == 0:
            w = 0.0  # -0.0 and 0.0 tie, as they compare equal
        bits = (<uint32_t*>&w)[0]
        bits = ~bits if bits & sign else bits | sign
    return (<uint64_t>bits << 32) | <uint64_t>i


cdef int _cmp_i64(const void* a, const void* b) noexcept nogil:
    cdef int64_t x = (<const int64_t*>a)[0], y = (<const int64_t*>b)[0]
    return (x > y) - (x < y)


cdef inline Py_ssize_t _count_before(const int64_t* keys, Py_ssize_t n, int64_t value) noexcept nogil:
    """Entries of the sorted ``keys`` below ``value`` (np.searchsorted, side left)."""
    cdef Py_ssize_t lo = 0, hi = n, mid
    while lo < hi:
        mid = (lo + hi) >> 1
        if keys[mid] < value:
            lo = mid + 1
        else:
            hi = mid
    return lo


cdef inline void _pop_windows(float32_t c7, float32_t c30, float32_t* out) noexcept nogil:
    """The features of an item's events in the last 7 and 30 days: log1p of each and their
    trend, into ``out[0:3]``. Packed once per item for the data end, computed per request
    otherwise: one expression for both, so both give the same bits."""
    out[0] = log1pf(c7)
    out[1] = log1pf(c30)
    out[2] = logf((c7 + 1.0) / (c30 * <float32_t>(7.0 / 30.0) + 1.0))


cdef inline float32_t _linspace_at(Py_ssize_t i, Py_ssize_t n) noexcept nogil:
    """np.linspace(0.5, 1.0, n, dtype=float32)[i]: later sources weigh more."""
    if n <= 1 or i == n - 1:
        return 1.0 if n > 1 else 0.5
    return <float32_t>(0.5 + i * (0.5 / (n - 1)))


# ---------------------------------------------------------------------------
# Layers 2 and 3: the kernel over one bundle's tables
# ---------------------------------------------------------------------------

cdef class _Merge:
    """One request's candidate sources and the merge's scratch, sized before the GIL is let go."""
    cdef const int32_t[::1] pool, seg_v, pop_v, recent_v
    cdef int32_t[::1] again, covis, ease, own, sources, items, out
    cdef float32_t[:, ::1] own_X
    cdef int64_t[::1] own_last
    cdef const float32_t[::1] ones
    cdef float64_t[::1] sums, ease_total
    cdef uint8_t[::1] excluded
    cdef object rows, mask  # the arrays behind out and excluded


cdef class TreeArgs:
    """A tree ensemble's arrays (``ranking.kernels.scoring.TreeArrays``) and its phases as typed
    views, for :meth:`FeatureKernel.candidates_fill_score`: taken once per model and reused,
    where ten arrays were converted on every call. ``ranking.kernels.features`` builds it from
    checked arrays; ``roots_first``/``roots_second`` are read when ``phased``."""
    cdef const int32_t[::1] roots, roots_first, roots_second, feature, left, right
    cdef const float64_t[::1] threshold, leaf_value
    cdef const uint8_t[::1] flags
    cdef readonly bint phased

    def __init__(self, const int32_t[::1] roots, const int32_t[::1] roots_first, const int32_t[::1] roots_second,
                 bint phased, const int32_t[::1] feature, const float64_t[::1] threshold,
                 const int32_t[::1] left, const int32_t[::1] right, const uint8_t[::1] flags,
                 const float64_t[::1] leaf_value):
        self.roots, self.roots_first, self.roots_second, self.phased = roots, roots_first, roots_second, phased
        self.feature, self.threshold, self.left, self.right = feature, threshold, left, right
        self.flags, self.leaf_value = flags, leaf_value

cdef class FeatureKernel:
    """The bundle's feature tables as typed views, built once per bundle (before the fork)."""

    cdef const float32_t[:, ::1] item_factors
    # Every per-item value a request reads, one row per item (see _pack_items): a candidate
    # costs one or two cache lines here instead of a miss in each of a dozen tables.
    cdef readonly object item_table
    cdef const float32_t[:, ::1] item_rows
    cdef Py_ssize_t r_weekday, r_context[3]
    cdef const int64_t[::1] item_event_keys
    cdef const int64_t[::1] item_cat_indptr
    cdef const int32_t[::1] item_cat_ids
    cdef const int64_t[::1] covis_indptr
    cdef const int32_t[::1] covis_items
    cdef const float32_t[::1] covis_scores
    cdef const int64_t[::1] seg_indptr
    cdef const int32_t[::1] seg_items
    cdef const float32_t[::1] seg_scores
    cdef const float32_t[:, ::1] ease
    cdef const uint8_t[::1] user_has_history
    cdef const int64_t[::1] user_first_seen, user_last_seen
    cdef const int8_t[::1] user_stage
    cdef const float32_t[::1] user_value, user_log_price, user_repeat_share
    cdef const int32_t[::1] user_baskets
    cdef const float32_t[:, ::1] user_hour_share
    cdef const int64_t[::1] user_cat_indptr
    cdef const int32_t[::1] user_cat_ids
    cdef const float32_t[::1] user_cat_share
    cdef const int64_t[::1] recent_indptr
    cdef const int32_t[::1] recent_items
    cdef const int64_t[::1] touched_indptr
    cdef const int32_t[::1] touched_items
    cdef const int64_t[::1] buy_indptr
    cdef const int32_t[::1] buy_items
    cdef const float32_t[::1] buy_baskets, buy_interval
    cdef const int64_t[::1] buy_last
    cdef const uint8_t[::1] buy_in_last
    cdef const uint16_t[:, ::1] ctx_user_0, ctx_user_1, ctx_user_2
    # The candidate sources and exclusions only (candidates()).
    cdef const int32_t[::1] popular_items, recent_popular_items
    cdef const uint8_t[::1] item_reoffer
    cdef const int64_t[::1] consumed_indptr
    cdef const int32_t[::1] consumed_items
    cdef readonly Py_ssize_t n_items, n_users, n_categories, n_segments
    cdef readonly int64_t data_end
    cdef readonly bint has_ease

    def __init__(self, dict t, Py_ssize_t n_categories, int64_t data_end):
        self.item_factors = t["item_factors"]
        self.item_event_keys = t["item_event_keys"]
        self.item_cat_indptr = t["item_cat_indptr"]
        self.item_cat_ids = t["item_cat_ids"]
        self.covis_indptr = t["covis_indptr"]
        self.covis_items = t["covis_items"]
        self.covis_scores = t["covis_scores"]
        self.seg_indptr = t["segment_pop_indptr"]
        self.seg_items = t["segment_pop_items"]
        self.seg_scores = t["segment_pop_scores"]
        self.ease = t["ease_weights"]
        self.user_has_history = t["user_has_history"]
        self.user_first_seen = t["user_first_seen"]
        self.user_last_seen = t["user_last_seen"]
        self.user_stage = t["user_stage"]
        self.user_value = t["user_value"]
        self.user_log_price = t["user_log_price"]
        self.user_repeat_share = t["user_repeat_share"]
        self.user_baskets = t["user_baskets"]
        self.user_hour_share = t["user_hour_share"]
        self.user_cat_indptr = t["user_cat_indptr"]
        self.user_cat_ids = t["user_cat_ids"]
        self.user_cat_share = t["user_cat_share"]
        self.recent_indptr = t["user_recent_indptr"]
        self.recent_items = t["user_recent_items"]
        self.touched_indptr = t["touched_indptr"]
        self.touched_items = t["touched_items"]
        self.buy_indptr = t["user_buy_indptr"]
        self.buy_items = t["user_buy_items"]
        self.buy_baskets = t["user_buy_baskets"]
        self.buy_interval = t["user_buy_interval"]
        self.buy_last = t["user_buy_last"]
        self.buy_in_last = t["user_buy_in_last"]
        self.ctx_user_0 = t["user_channel_share"]
        self.ctx_user_1 = t["user_device_share"]
        self.ctx_user_2 = t["user_region_share"]
        self.popular_items = t["popular_items"]
        self.recent_popular_items = t["recent_popular_items"]
        self.item_reoffer = t["item_reoffer"]
        self.consumed_indptr = t["consumed_indptr"]
        self.consumed_items = t["consumed_indices"]
        self.n_items = self.item_factors.shape[0]
        self._pack_items(t, data_end)
        self.n_users = self.user_has_history.shape[0]
        self.n_categories = n_categories
        self.n_segments = self.seg_indptr.shape[0] - 1
        self.data_end = data_end
        self.has_ease = self.ease.shape[0] > 0

    def _pack_items(self, dict t, int64_t data_end):
        """Gather the per-item tables into ``item_rows`` (n_items, width) float32, once."""
        cdef Py_ssize_t hour_blocks = t["item_hour_lift"].shape[1]
        widths = [t[f"item_{f}_lift"].shape[1] for f in ("channel", "device", "region")]
        self.r_weekday = R_HOUR + hour_blocks
        at = self.r_weekday + 7
        for f in range(3):
            self.r_context[f] = at
            at += widths[f]
        first = np.asarray(t["item_first_seen"])
        # Days from the item's first event to the data end; NaN when it was never seen.
        age = np.where(first >= 0, (data_end - first) / DAY, np.nan)
        # The data end's window features and the log price are computed below, by the functions
        # a request uses (the same bits): the window counts go in first, the rest is unset.
        unset = np.broadcast_to(np.float32(np.nan), (self.n_items,))
        columns = [
            t["item_popularity"], t["item_events_7d_at_end"], t["item_events_30d_at_end"], unset, age,
            t["item_price"], unset, t["item_repeat_rate"], t["item_repeat_interval"], t["item_hour_lift"],
            t["item_weekday_lift"],
            *[np.asarray(t[f"item_{f}_lift"]).view(np.float16) for f in ("channel", "device", "region")],
        ]
        table = np.empty((self.n_items, at), np.float32)
        j = 0
        for col in columns:
            col = np.asarray(col)
            w = 1 if col.ndim == 1 else col.shape[1]
            table[:, j : j + w] = col.reshape(self.n_items, w)
            j += w
        cdef float32_t[:, ::1] rows = table
        cdef Py_ssize_t i
        with nogil:
            for i in range(rows.shape[0]):
                _pop_windows(rows[i, R_END_POP_7D], rows[i, R_END_POP_30D], &rows[i, R_END_POP_7D])
                rows[i, R_LOG_PRICE] = logf(rows[i, R_PRICE])
        self.item_table = table
        self.item_rows = table

    def candidates(
        self,
        const int32_t[::1] pool,
        Py_ssize_t seg,
        Py_ssize_t n_seg,
        Py_ssize_t n_popular,
        Py_ssize_t source_user,
        const int32_t[::1] session,
        Py_ssize_t n_again,
        int64_t t,
        const int32_t[::1] p_rows,
        const int64_t[::1] p_times,
        Py_ssize_t n_covis,
        Py_ssize_t n_recent_popular,
        Py_ssize_t n_ease,
        Py_ssize_t mask_user,
        const int32_t[::1] exclude,
        const uint32_t[::1] category_codes,
        uint32_t include_bits,
        float32_t min_price,
        float32_t max_price,
        int32_t[::1] slot,
        uint8_t[::1] mark,
    ):
        """One request's candidates, merged from every source, and which of them to exclude.

        The sources, in the order their items are kept (each item once, where first met):
        ``pool`` (the embedding search's rows, or the caller's own candidates; -1 = none),
        the first ``n_seg`` of segment ``seg``'s popular items (-1: none), the first
        ``n_popular`` popular items, then the extra sources of ``source_user``'s history
        (-1: none) and the ``session``: the ``n_again`` re-offerable purchases most due
        again at ``t`` (the bundle's with ``p_rows``/``p_times``, the purchases since its
        data end, folded in), the ``n_covis`` co-visitation neighbours of the user's recent
        items and the session best first, the first ``n_recent_popular`` recently popular
        items and the ``n_ease`` items of highest EASE score over the user's touched items
        and the session (each 0: none).

        Excluded (the mask): what ``mask_user`` (-1: nobody) consumed, ``exclude`` (item
        rows, -1 skipped), and by category and price: ``category_codes`` (per category,
        empty: no category filter) has bit 0 set for an excluded category, and an item must
        carry each bit of ``include_bits`` (the OR of its categories' codes) to stay; an item
        outside ``min_price``..``max_price`` (each 0: no bound), or without a price when
        either is set, is excluded.

        Inputs are trusted (``ranking.kernels.features`` checks the request's arrays;
        the bundle's tables were checked at load). ``slot`` (-1 everywhere) and ``mark``
        (all zero) are scratch over every item row, handed back as they came. The buffers
        are sized and allocated first; the walks then run without the GIL.

        Returns ``(rows, mask)``: int32 item rows and a bool mask, one per candidate.
        """
        cdef _Merge b = self._sized(pool, seg, n_seg, n_popular, source_user, session, n_again, p_rows, n_covis,
                                    n_recent_popular, n_ease)
        cdef Py_ssize_t n
        with nogil:
            n = self._merge(b, source_user, session, t, p_rows, p_times, mask_user, exclude, category_codes,
                            include_bits, min_price, max_price, slot, mark, False)
        if n < 0:
            raise MemoryError("no memory for the candidate sources' scratch")
        return b.rows[:n], b.mask[:n].view(np.bool_)

    cdef _Merge _sized(self, const int32_t[::1] pool, Py_ssize_t seg, Py_ssize_t n_seg, Py_ssize_t n_popular,
                       Py_ssize_t source_user, const int32_t[::1] session, Py_ssize_t n_again,
                       const int32_t[::1] p_rows, Py_ssize_t n_covis, Py_ssize_t n_recent_popular,
                       Py_ssize_t n_ease):
        """The merge's sources and scratch, sized and allocated (with the GIL)."""
        cdef _Merge b = _Merge()
        cdef Py_ssize_t lo = 0, hi = 0, n_src = 0, n_entries = 0, n_own = 0
        b.pool = pool
        b.seg_v = self.seg_items[:0]
        if seg >= 0:
            lo, hi = self.seg_indptr[seg], self.seg_indptr[seg + 1]
            b.seg_v = self.seg_items[lo:min(hi, lo + n_seg)]
        b.pop_v = self.popular_items[:min(n_popular, self.popular_items.shape[0])]
        b.recent_v = self.recent_popular_items[:min(n_recent_popular, self.recent_popular_items.shape[0])]
        # Sizes: the co-visitation entries of the sources, the purchases, the catalog (EASE).
        if n_covis > 0:
            if source_user >= 0:
                n_src = self.recent_indptr[source_user + 1] - self.recent_indptr[source_user]
            n_src += session.shape[0]
            n_entries = self._covis_entries(source_user, session)
        if n_again > 0 and (source_user >= 0 or p_rows.shape[0]):
            if source_user >= 0:
                n_own = self.buy_indptr[source_user + 1] - self.buy_indptr[source_user]
            n_own += p_rows.shape[0]
        if not self.has_ease:
            n_ease = 0
        n_again, n_covis, n_ease = min(n_again, n_own), min(n_covis, n_entries), min(n_ease, self.n_items)
        # One array per type, cut in views: each allocation and view costs more than its size.
        cdef int32_t[::1] ints = np.empty(n_again + n_covis + n_ease + n_own + n_src + n_entries, np.int32)
        cdef float64_t[::1] sums = np.zeros(n_entries + (self.n_items if n_ease else 0), np.float64)
        cdef Py_ssize_t at = 0
        b.again = ints[at:at + n_again]
        at += n_again
        b.covis = ints[at:at + n_covis]
        at += n_covis
        b.ease = ints[at:at + n_ease]
        at += n_ease
        b.own = ints[at:at + n_own]
        at += n_own
        b.sources = ints[at:at + n_src]
        at += n_src
        b.items = ints[at:at + n_entries]
        b.own_X = np.empty((n_own, N_COLUMNS), np.float32)
        b.own_last = np.empty(n_own, np.int64)
        global _ONES
        if n_src > _ONES.shape[0]:
            _ONES = np.ones(2 * n_src, np.float32)
        b.ones = _ONES[:n_src]
        b.sums = sums[:n_entries]
        b.ease_total = sums[n_entries:]
        bound = (pool.shape[0] + b.seg_v.shape[0] + b.pop_v.shape[0] + n_again + n_covis
                 + b.recent_v.shape[0] + n_ease)
        b.rows = np.empty(bound, np.int32)
        b.mask = np.zeros(bound, np.uint8)
        b.out = b.rows
        b.excluded = b.mask
        return b

    cdef Py_ssize_t _merge(
        self,
        _Merge b,
        Py_ssize_t source_user,
        const int32_t[::1] session,
        int64_t t,
        const int32_t[::1] p_rows,
        const int64_t[::1] p_times,
        Py_ssize_t mask_user,
        const int32_t[::1] exclude,
        const uint32_t[::1] category_codes,
        uint32_t include_bits,
        float32_t min_price,
        float32_t max_price,
        int32_t[::1] slot,
        uint8_t[::1] mark,
        bint keep_slots,
    ) noexcept nogil:
        """Merge the sources into ``b.out`` and mark the exclusions; the candidates (-1: no
        memory). With ``keep_slots`` each candidate's position is left in ``slot`` (the
        feature walk's index), for the caller to clear; otherwise ``slot`` is handed back
        as it came."""
        cdef Py_ssize_t n = 0, i, j, got_again = 0, got_covis = 0, got_ease = 0
        cdef uint32_t bits
        cdef float32_t price
        cdef int32_t[::1] out = b.out
        cdef uint8_t[::1] excluded = b.excluded
        # The extra sources, each ranked best first.
        if b.again.shape[0]:
            got_again = self._buy_again(source_user, t, p_rows, p_times, slot, b.own, b.own_X, b.own_last, b.again)
        if b.covis.shape[0] and got_again >= 0:
            got_covis = self._covis_neighbours(source_user, session, slot, b.sources, b.ones, b.items, b.sums,
                                               b.covis)
        if b.ease.shape[0] and got_again >= 0 and got_covis >= 0:
            got_ease = self._ease_top(source_user, session, mark, b.ease_total, b.ease)
        if got_again < 0 or got_covis < 0 or got_ease < 0:
            return -1
        n = _keep_new(b.pool, slot, out, n)
        n = _keep_new(b.seg_v, slot, out, n)
        n = _keep_new(b.pop_v, slot, out, n)
        n = _keep_new(b.again[:got_again], slot, out, n)
        n = _keep_new(b.covis[:got_covis], slot, out, n)
        n = _keep_new(b.recent_v, slot, out, n)
        n = _keep_new(b.ease[:got_ease], slot, out, n)
        if not keep_slots:
            for i in range(n):
                slot[out[i]] = -1
        self._exclusions(out[:n], excluded, mask_user, exclude, mark)
        # By category and price.
        if category_codes.shape[0]:
            for i in range(n):
                bits = 0
                for j in range(self.item_cat_indptr[out[i]], self.item_cat_indptr[out[i] + 1]):
                    bits |= category_codes[self.item_cat_ids[j]]
                if bits & 1 or (bits & include_bits) != include_bits:
                    excluded[i] = 1
        if min_price > 0 or max_price > 0:
            for i in range(n):
                price = self.item_rows[out[i], R_PRICE]
                if (price != price or price == INFINITY or price == -INFINITY
                        or (min_price > 0 and price < min_price) or (max_price > 0 and price > max_price)):
                    excluded[i] = 1
        return n

    cdef Py_ssize_t _covis_entries(self, Py_ssize_t urow, const int32_t[::1] session) noexcept nogil:
        """Co-visitation entries in the rows of the user's recent items and the session's."""
        cdef Py_ssize_t j, total = 0
        cdef int32_t src
        if urow >= 0:
            for j in range(self.recent_indptr[urow], self.recent_indptr[urow + 1]):
                src = self.recent_items[j]
                total += self.covis_indptr[src + 1] - self.covis_indptr[src]
        for j in range(session.shape[0]):
            total += self.covis_indptr[session[j] + 1] - self.covis_indptr[session[j]]
        return total

    cdef void _exclusions(self, const int32_t[::1] cands, uint8_t[::1] excluded, Py_ssize_t urow,
                          const int32_t[::1] exclude, uint8_t[::1] mark) noexcept nogil:
        """Mark what ``urow`` consumed and the ``exclude`` rows, read the marks, clear them."""
        cdef Py_ssize_t i, j, lo = 0, hi = 0
        if urow >= 0:
            lo, hi = self.consumed_indptr[urow], self.consumed_indptr[urow + 1]
        for j in range(lo, hi):
            mark[self.consumed_items[j]] = 1
        for j in range(exclude.shape[0]):
            if exclude[j] >= 0:
                mark[exclude[j]] = 1
        for i in range(cands.shape[0]):
            excluded[i] = mark[cands[i]]
        for j in range(lo, hi):
            mark[self.consumed_items[j]] = 0
        for j in range(exclude.shape[0]):
            if exclude[j] >= 0:
                mark[exclude[j]] = 0

    cdef Py_ssize_t _buy_again(
        self,
        Py_ssize_t urow,
        int64_t t,
        const int32_t[::1] p_rows,
        const int64_t[::1] p_times,
        int32_t[::1] slot,
        int32_t[::1] own,  # scratch (bought + purchases,)
        float32_t[:, ::1] X,  # scratch (own, N_COLUMNS)
        int64_t[::1] last,  # scratch (own,)
        int32_t[::1] best,  # OUT the best rows, as many as it holds
    ) noexcept nogil:
        """The user's own re-offerable purchases, best first by a cheap due-ness; how many
        were written to ``best`` (-1: no memory).

        An item scores its baskets times how close it is to due (days since its last purchase
        over its interval, 1 best, on a log scale; 0.5 when either is unknown), so a staple just
        bought waits for its turn; ties go to the more recent purchase, then the lower item row.
        """
        cdef Py_ssize_t i, j, n = 0, lo = 0, hi = 0
        cdef float64_t due, closeness
        cdef _Ranked* ranked
        if urow >= 0:
            lo, hi = self.buy_indptr[urow], self.buy_indptr[urow + 1]
        # The bought items and the newer purchases, each re-offerable one once, by item row.
        for j in range(lo, hi):
            if self.item_reoffer[self.buy_items[j]]:
                own[n] = self.buy_items[j]
                n += 1
        for j in range(p_rows.shape[0]):
            if self.item_reoffer[p_rows[j]]:
                own[n] = p_rows[j]
                n += 1
        if n == 0:
            return 0
        qsort(&own[0], n, sizeof(int32_t), _cmp_i32)
        j = 0
        for i in range(n):
            if i == 0 or own[i] != own[i - 1]:
                own[j] = own[i]
                j += 1
        n = j
        # Their purchase history, as the re-purchase features see it.
        for i in range(n):
            slot[own[i]] = <int32_t>i
        j = self._repeat(X[:n], own[:n], slot, urow, t, p_rows, p_times, &last[0])
        for i in range(n):
            slot[own[i]] = -1
        ranked = <_Ranked*>malloc(n * sizeof(_Ranked))
        if j < 0 or ranked == NULL:
            free(ranked)
            return -1
        for i in range(n):
            # BUY_INTERVAL: the user's own interval, else the item's typical one.
            due = (t - last[i]) / <float64_t>DAY / X[i, BUY_INTERVAL]
            closeness = exp(-fabs(log(due if due > 1e-3 or due != due else 1e-3)))
            ranked[i].score = X[i, BUY_COUNT] * (closeness if closeness == closeness else 0.5)
            ranked[i].tie = last[i]
            ranked[i].row = own[i]
        return _best(ranked, n, best)

    cdef Py_ssize_t _covis_neighbours(
        self,
        Py_ssize_t urow,
        const int32_t[::1] session,
        int32_t[::1] slot,
        int32_t[::1] sources,  # scratch (recent + session,)
        const float32_t[::1] ones,  # (recent + session,) all 1
        int32_t[::1] items,  # scratch (entries,)
        float64_t[::1] sums,  # scratch (entries,) zero
        int32_t[::1] best,  # OUT the best rows, as many as it holds
    ) noexcept nogil:
        """The co-visitation neighbours of the user's recent items and the session's, by summed
        similarity (each source once per mention), best first; how many were written to
        ``best`` (-1: no memory)."""
        cdef Py_ssize_t s, n, i, n_recent = 0
        cdef _Ranked* ranked
        if urow >= 0:
            n_recent = self.recent_indptr[urow + 1] - self.recent_indptr[urow]
        for s in range(sources.shape[0]):
            sources[s] = self.recent_items[self.recent_indptr[urow] + s] if s < n_recent else session[s - n_recent]
        # The tables were checked at load: the walk meets no row outside the catalog.
        n = _sum_rows_loop(self.covis_indptr, self.covis_items, self.covis_scores, sources, ones, slot, True,
                           sums, items, 0)
        for i in range(n):
            slot[items[i]] = -1
        ranked = <_Ranked*>malloc((n if n > 0 else 1) * sizeof(_Ranked))
        if ranked == NULL:
            return -1
        for i in range(n):
            ranked[i].score = sums[i]
            ranked[i].tie = 0
            ranked[i].row = items[i]
        return _best(ranked, n, best)

    cdef Py_ssize_t _ease_top(
        self,
        Py_ssize_t urow,
        const int32_t[::1] session,
        uint8_t[::1] mark,
        float64_t[::1] total,  # scratch (n_items,) zero
        int32_t[::1] best,  # OUT the best rows, as many as it holds
    ) noexcept nogil:
        """The items of highest EASE score (the weights summed over the user's touched items and
        the session's, each once), best first; how many were written to ``best`` (0 without
        history, -1: no memory)."""
        cdef Py_ssize_t lo = 0, hi = 0, j, i, h = 0, n_items = self.n_items
        cdef int32_t r
        cdef const float32_t* row
        cdef _Ranked* ranked
        if urow >= 0:
            lo, hi = self.touched_indptr[urow], self.touched_indptr[urow + 1]
        for j in range(lo, hi + session.shape[0]):
            r = self.touched_items[j] if j < hi else session[j - hi]
            if mark[r]:
                continue
            mark[r] = 1
            h += 1
            row = &self.ease[r, 0]
            for i in range(n_items):
                total[i] += row[i]
        for j in range(lo, hi + session.shape[0]):
            mark[self.touched_items[j] if j < hi else session[j - hi]] = 0
        if h == 0:
            return 0
        ranked = <_Ranked*>malloc(n_items * sizeof(_Ranked))
        if ranked == NULL:
            return -1
        for i in range(n_items):
            ranked[i].score = total[i]
            ranked[i].tie = 0
            ranked[i].row = <int32_t>i
        return _best(ranked, n_items, best)

    def fill_score(
        self,
        float32_t[:, ::1] X,
        const int32_t[::1] cands,
        int32_t[::1] slot,
        uint8_t[::1] mark,
        float64_t[::1] work,
        float32_t[::1] weights,
        int rung,
        Py_ssize_t urow,
        Py_ssize_t seg,
        int64_t t,
        int64_t t_pop,
        bint at_end,
        int block,
        int weekday,
        const float32_t[::1] qvec,
        const int32_t[::1] session,
        const int32_t[::1] ctx_cols,
        const int32_t[::1] p_rows,
        const int64_t[::1] p_times,
        const int32_t[::1] roots_first,
        const int32_t[::1] roots_second,
        const int32_t[::1] feature,
        const float64_t[::1] threshold,
        const int32_t[::1] left,
        const int32_t[::1] right,
        const uint8_t[::1] flags,
        const float64_t[::1] leaf_value,
        const uint8_t[::1] mask,
        const float32_t[::1] offsets,
        Py_ssize_t n_second,
        int64_t deadline_ns,
        Py_ssize_t check_every,
        float64_t[::1] first_acc,
        float32_t[::1] first_scores,
        int32_t[::1] first_indices,
        float32_t[::1] out_scores,
        int32_t[::1] out_indices,
    ):
        """Write every cell of ``X`` (n_candidates, N_COLUMNS), then the tree ensemble's
        top-k over the rows just written (``_scoring._score_trees_call``), in one call
        without the GIL. Empty ``out_scores`` write the rows only.

        ``slot`` holds each candidate's position (the wrapper set it; -1 elsewhere) and
        ``mark`` is all zero, in and out. ``work`` (n,) and ``weights`` (at least the
        longer of the user's recent items and the session) are scratch. ``qvec`` is
        empty without a query vector, ``ctx_cols`` the request's column per context
        field (-1: none). The scoring arguments are ``ranking.kernels.scoring.TreeCall``'s.

        Returns ``(status, n_kept, n_scored, n_second_done, n_second_planned, filled_ns)``:
        ``status`` 0, or negative when a bundle table named a row outside the catalog
        (``NO_MEMORY``: no scratch memory), in which case nothing is scored; ``filled_ns``
        the CLOCK_MONOTONIC time the rows were written, so the caller can tell the two
        stages apart.
        """
        cdef Py_ssize_t status, n_kept = 0, n_scored = 0, n_done = 0, n_planned = 0
        cdef timespec ts
        with nogil:
            status = self._fill(X, cands, slot, mark, work, weights, rung, urow, seg, t, t_pop, at_end,
                                block, weekday, qvec, session, ctx_cols, p_rows, p_times)
            clock_gettime(CLOCK_MONOTONIC, &ts)
            if status == 0:
                n_scored = _score_trees_call(X, roots_first, roots_second, feature, threshold, left, right,
                                             flags, leaf_value, mask, offsets, n_second, deadline_ns, check_every,
                                             first_acc, first_scores, first_indices, out_scores, out_indices,
                                             &n_kept, &n_done, &n_planned)
        return status, n_kept, n_scored, n_done, n_planned, <int64_t>ts.tv_sec * 1000000000 + ts.tv_nsec

    def candidates_fill_score(
        self,
        const int32_t[::1] pool,
        Py_ssize_t seg,
        Py_ssize_t n_seg,
        Py_ssize_t n_popular,
        Py_ssize_t source_user,
        const int32_t[::1] session,
        Py_ssize_t n_again,
        int64_t t_again,
        const int32_t[::1] p_rows,
        const int64_t[::1] p_times,
        Py_ssize_t n_covis,
        Py_ssize_t n_recent_popular,
        Py_ssize_t n_ease,
        Py_ssize_t mask_user,
        const int32_t[::1] exclude,
        const uint32_t[::1] category_codes,
        uint32_t include_bits,
        float32_t min_price,
        float32_t max_price,
        int32_t[::1] slot,
        uint8_t[::1] mark,
        float32_t[::1] weights,
        int rung,
        Py_ssize_t urow,
        int64_t t,
        int64_t t_pop,
        bint at_end,
        int block,
        int weekday,
        const float32_t[::1] qvec,
        const int32_t[::1] ctx_cols,
        TreeArgs trees,
        Py_ssize_t k,
        Py_ssize_t n_second,
        int64_t deadline_ns,
        Py_ssize_t check_every,
        float64_t first_ms,
        float64_t rest_ms,
        float64_t safety,
        const int32_t[::1] skip_rows,
        const int32_t[::1] interest_rows,
        const float32_t[::1] inv_norms,
        float32_t skip_penalty,
        float32_t interest_boost,
        float32_t offset_scale,
        const uint32_t[::1] demote_codes,
        const float32_t[::1] demote_by,
    ):
        """:meth:`candidates`, then :meth:`fill_score` over them, in one call without the GIL.

        The candidate arguments are :meth:`candidates`' (its ``t`` is ``t_again`` here),
        the request's :meth:`fill_score`'s (``urow``, ``seg``, ``session`` and the purchases
        are the same for both), the scoring ones ``ranking.kernels.scoring.TreeCall``'s, the
        ensemble and its phases in ``trees``.
        With ``first_ms`` >= 0 and a deadline, the second phase is first cut to what the
        time left after the merge affords (``CostModel.plan_second_phase``: ``first_ms`` and
        ``rest_ms`` per row, ``safety`` of the time left). The candidates are written once,
        where the feature walk reads them (``slot`` keeps their positions until the end).

        Returns ``(rows, mask, X, out_scores, out_indices, status, expired, n_kept, n_scored,
        n_done, n_planned, n_second, cut, merged_ns, filled_ns)``: ``expired`` when the
        deadline had passed once the candidates were merged (nothing written or scored);
        ``n_second`` the second phase's rows (0: one phase) and ``cut`` whether the plan cut
        it; the times CLOCK_MONOTONIC.

        With ``skip_rows`` or ``interest_rows`` (real-time skips and recent items, ``inv_norms``
        every item's 1/|factor|), every merged candidate's real-time score offset is computed
        before the time check (``_offsets``) and added to its score, with the rules' demotions
        (``demote_codes``: per category, bit b for the b-th demotion of ``demote_by``); they come
        back as ``offsets`` and ``parts`` (the skip penalty's row, the interest boost's, then one
        per demotion), after ``filled_ns``, for the answer in retrieval order and for explain.
        """
        cdef _Merge b = self._sized(pool, seg, n_seg, n_popular, source_user, session, n_again, p_rows, n_covis,
                                    n_recent_popular, n_ease)
        cdef Py_ssize_t bound = b.out.shape[0]
        X_arr = np.empty((bound, N_COLUMNS), np.float32)
        out_scores_arr = np.empty(min(k, bound), np.float32)
        out_indices_arr = np.empty(min(k, bound), np.int32)
        cdef float32_t[:, ::1] X = X_arr
        cdef float32_t[::1] out_scores = out_scores_arr
        cdef int32_t[::1] out_indices = out_indices_arr
        cdef float64_t[::1] work_acc = np.empty(2 * bound, np.float64)  # the walk's scratch, the first phase's sums
        cdef float64_t[::1] work = work_acc[:bound]
        cdef float64_t[::1] first_acc = work_acc[bound:]
        cdef float32_t[::1] first_scores = np.empty(min(bound, max(n_second, k, 1)), np.float32)
        cdef int32_t[::1] first_indices = np.empty(min(bound, max(n_second, k, 1)), np.int32)
        cdef bint realtime = skip_rows.shape[0] > 0 or interest_rows.shape[0] > 0
        cdef bint offset = realtime or demote_by.shape[0] > 0
        offsets_arr = np.zeros(bound, np.float32)
        # The parts only where an offset applies: most requests have none.
        parts_arr = np.zeros((2 + demote_by.shape[0], bound), np.float32) if offset else _NO_ROWS_2D
        cdef float32_t[::1] offsets = offsets_arr
        cdef float32_t[:, ::1] parts = parts_arr
        cdef float32_t[:, ::1] unit = _NO_ROWS_2D
        if realtime:
            unit = np.empty((skip_rows.shape[0] + interest_rows.shape[0] + 1, self.item_factors.shape[1]), np.float32)
        cdef Py_ssize_t n, i, kk = 0, m, fit, n2 = n_second, status = 0
        cdef Py_ssize_t n_kept = 0, n_scored = 0, n_done = 0, n_planned = 0
        cdef bint cut = False, expired = False
        cdef timespec ts
        cdef int64_t merged_ns, filled_ns
        cdef float64_t usable
        cdef const int32_t[::1] r_first = trees.roots
        cdef const int32_t[::1] r_second = trees.roots[:0]
        with nogil:
            n = self._merge(b, source_user, session, t_again, p_rows, p_times, mask_user, exclude, category_codes,
                            include_bits, min_price, max_price, slot, mark, True)
            if offset and n > 0:
                self._offsets(b.out[:n], skip_rows, interest_rows, inv_norms, skip_penalty, interest_boost,
                              offset_scale, demote_codes, demote_by, unit, offsets[:n], parts[:, :n])
            clock_gettime(CLOCK_MONOTONIC, &ts)
            merged_ns = filled_ns = <int64_t>ts.tv_sec * 1000000000 + ts.tv_nsec
            if n < 0:
                status = _NO_MEMORY
                n = 0
            elif deadline_ns and merged_ns >= deadline_ns:
                expired = True
            else:
                kk = min(k, n)
                if first_ms >= 0 and deadline_ns:
                    m = n if (n2 <= 0 or n2 >= n) else n2
                    if m > 1:
                        usable = (deadline_ns - merged_ns) / 1e6 * safety
                        if first_ms * n + rest_ms * m > usable:
                            fit = <Py_ssize_t>((usable - first_ms * n) / rest_ms) if rest_ms > 0 else m
                            n2 = max(1, min(fit, m - 1))
                            cut = True
                if n2 <= 0 or n2 >= n or not trees.phased:
                    n2 = 0
                else:
                    r_first, r_second = trees.roots_first, trees.roots_second
                if kk == 0:
                    n_scored = n
                else:
                    status = self._fill(X[:n], b.out[:n], slot, mark, work[:n], weights, rung, urow, seg, t, t_pop,
                                        at_end, block, weekday, qvec, session, ctx_cols, p_rows, p_times)
                    clock_gettime(CLOCK_MONOTONIC, &ts)
                    filled_ns = <int64_t>ts.tv_sec * 1000000000 + ts.tv_nsec
                    if status == 0:
                        m = min(n, max(n2, kk))
                        n_scored = _score_trees_call(X[:n], r_first, r_second, trees.feature, trees.threshold,
                                                     trees.left, trees.right, trees.flags, trees.leaf_value,
                                                     b.excluded[:n], offsets[:n], n2, deadline_ns,
                                                     check_every, first_acc[:n], first_scores[:m],
                                                     first_indices[:m], out_scores[:kk], out_indices[:kk],
                                                     &n_kept, &n_done, &n_planned)
            for i in range(n):
                slot[b.out[i]] = -1
        return (b.rows[:n], b.mask[:n].view(np.bool_), X_arr[:n], out_scores_arr, out_indices_arr, status, expired,
                n_kept, n_scored, n_done, n_planned, n2, cut, merged_ns, filled_ns,
                offsets_arr[:n] if offset else None, parts_arr[:, :n] if offset else None)

    cdef void _offsets(
        self,
        const int32_t[::1] cands,
        const int32_t[::1] skip_rows,
        const int32_t[::1] interest_rows,
        const float32_t[::1] inv_norms,
        float32_t skip_penalty,
        float32_t interest_boost,
        float32_t scale,
        const uint32_t[::1] demote_codes,
        const float32_t[::1] demote_by,
        float32_t[:, ::1] unit,
        float32_t[::1] offsets,
        float32_t[:, ::1] parts,
    ) noexcept nogil:
        """Each candidate's score offset, as ``RankOverlay.offsets`` computes it in NumPy
        (``ranking.pipeline.overlay``; equal within float32 rounding of the cosines).

        Skip penalty (``parts[0]``): minus ``skip_penalty`` times the candidate's largest cosine
        with a skipped item, clipped to [0, 1]; 1 for a skipped item itself. Interest boost
        (``parts[1]``): the largest cosine with a recent item, clipped to [0, 1] (0 for a recent
        item itself), scaled to this request's candidates (the closest get ``interest_boost``,
        the farthest none). Demotion b (``parts[2 + b]``): minus ``demote_by[b]`` for a candidate
        in a category whose ``demote_codes`` carries bit b. ``offsets`` is their sum, in that
        order; all of them times ``scale``. ``unit`` is scratch of (len(skip_rows) +
        len(interest_rows) + 1, d) rows when either is given; the rows are valid.
        """
        cdef Py_ssize_t n = cands.shape[0], d = self.item_factors.shape[1], i, j, r
        cdef Py_ssize_t n_skip = skip_rows.shape[0], n_interest = interest_rows.shape[0]
        cdef Py_ssize_t m = n_skip + n_interest, n_demote = demote_by.shape[0], n_parts = 2 + n_demote
        cdef int32_t c
        cdef uint32_t bits
        cdef float32_t w, best, sim, lo = INFINITY, hi = -INFINITY
        cdef float32_t* cf = &unit[m, 0] if m else NULL
        cdef bint own
        # Unit factors of the skipped and recent items, then of each candidate in turn.
        for r in range(m):
            c = skip_rows[r] if r < n_skip else interest_rows[r - n_skip]
            w = inv_norms[c]
            for j in range(d):
                unit[r, j] = self.item_factors[c, j] * w
        for i in range(n if m else 0):
            c = cands[i]
            w = inv_norms[c]
            for j in range(d):
                cf[j] = self.item_factors[c, j] * w
            if n_skip:
                best, own = -INFINITY, False
                for r in range(n_skip):
                    best = max(best, _dot(cf, &unit[r, 0], d))
                    own = own or skip_rows[r] == c
                # The skipped item itself may have no factor (the build never saw it): pushed down anyway.
                sim = 1.0 if own else min(max(best, <float32_t>0.0), <float32_t>1.0)
                parts[0, i] = -skip_penalty * sim
            if n_interest:
                best, own = -INFINITY, False
                for r in range(n_skip, m):
                    best = max(best, _dot(cf, &unit[r, 0], d))
                    own = own or interest_rows[r - n_skip] == c
                sim = 0.0 if own else min(max(best, <float32_t>0.0), <float32_t>1.0)
                parts[1, i] = sim
                lo = min(lo, sim)
                hi = max(hi, sim)
        for i in range(n):
            if n_interest:
                # Relative to this request's candidates, whatever the embedding's baseline similarity.
                parts[1, i] = interest_boost * ((parts[1, i] - lo) / (hi - lo)) if hi > lo else 0.0
            if n_demote:
                bits = 0
                for j in range(self.item_cat_indptr[cands[i]], self.item_cat_indptr[cands[i] + 1]):
                    bits |= demote_codes[self.item_cat_ids[j]]
                for r in range(n_demote):
                    parts[2 + r, i] = -demote_by[r] if bits & ((<uint32_t>1) << r) else 0.0
            offsets[i] = parts[0, i] + parts[1, i]
            for r in range(2, n_parts):
                offsets[i] = offsets[i] + parts[r, i]
            if scale != 1.0:
                offsets[i] = offsets[i] * scale
                for r in range(n_parts):
                    parts[r, i] = parts[r, i] * scale

    cdef Py_ssize_t _fill(
        self,
        float32_t[:, ::1] X,
        const int32_t[::1] cands,
        int32_t[::1] slot,
        uint8_t[::1] mark,
        float64_t[::1] work,
        float32_t[::1] weights,
        int rung,
        Py_ssize_t urow,
        Py_ssize_t seg,
        int64_t t,
        int64_t t_pop,
        bint at_end,
        int block,
        int weekday,
        const float32_t[::1] qvec,
        const int32_t[::1] session,
        const int32_t[::1] ctx_cols,
        const int32_t[::1] p_rows,
        const int64_t[::1] p_times,
    ) noexcept nogil:
        cdef Py_ssize_t n = cands.shape[0], i, j, c, d = self.item_factors.shape[1]
        cdef bint known = urow >= 0 and self.user_has_history[urow] != 0
        cdef const float32_t* row
        cdef float64_t after_end = (t - self.data_end) / <float64_t>DAY
        cdef int64_t base
        cdef Py_ssize_t status
        if n == 0:
            return 0
        memset(&X[0, 0], 0, n * N_COLUMNS * sizeof(float32_t))
        # Ask for every candidate's rows up front: the candidates are spread over a catalog
        # far larger than the cache, and misses requested together overlap, where the passes
        # below would otherwise meet them one at a time.
        for i in range(n):
            c = cands[i]
            _prefetch(&self.item_rows[c, 0])
            _prefetch(&self.item_rows[c, 0] + 16)
            _prefetch(&self.item_cat_indptr[c])
            for j in range(0, d, 16):
                _prefetch(&self.item_factors[c, j])

        # Retrieval scores.
        for i in range(n):
            X[i, ALS] = _dot(&self.item_factors[cands[i], 0], &qvec[0], d) if qvec.shape[0] else NAN
        if known:
            status = self._covis(X, COVIS_USER, slot, work, weights,
                                 self.recent_items[self.recent_indptr[urow]:self.recent_indptr[urow + 1]])
        else:
            status = self._covis(X, COVIS_USER, slot, work, weights, session[:0])
        if status < 0:
            return status
        status = self._covis(X, COVIS_SESSION, slot, work, weights, session)
        if status < 0:
            return status
        self._session_similarity(X, cands, session)
        self._ease(X, cands, mark, urow, session)

        # Item.
        for i in range(n):
            c = cands[i]
            row = &self.item_rows[c, 0]
            X[i, POP] = row[R_POP]
            if at_end:
                X[i, POP_7D] = row[R_END_POP_7D]
                X[i, POP_30D] = row[R_END_POP_30D]
                X[i, TREND] = row[R_END_TREND]
            else:
                base = <int64_t>c << 32
                _pop_windows(self._window(base, t_pop, 7), self._window(base, t_pop, 30), &X[i, POP_7D])
            X[i, ITEM_AGE] = <float32_t>(after_end + row[R_AGE_AT_END])  # NaN: never seen
            X[i, PRICE] = row[R_PRICE]
            X[i, ITEM_REPEAT_RATE] = row[R_REPEAT_RATE]
            X[i, HOUR_ITEM_LIFT] = row[R_HOUR + block]
            X[i, WEEKDAY_ITEM_LIFT] = row[self.r_weekday + weekday]
            X[i, RUNG] = rung
            X[i, DAYS_AFTER_END] = <float32_t>((t - self.data_end) / <float64_t>DAY)
        if seg >= 0:
            for j in range(self.seg_indptr[seg], self.seg_indptr[seg + 1]):
                if slot[self.seg_items[j]] >= 0:
                    X[slot[self.seg_items[j]], SEG_POP] = self.seg_scores[j]

        # User and user x item.
        if known:
            status = self._user(X, cands, slot, urow, t, block)
            if status < 0:
                return status
        else:
            for i in range(n):
                X[i, CAT_AFFINITY] = NAN
                X[i, PRICE_FIT] = NAN
                X[i, USER_RECENCY] = NAN
                X[i, USER_TENURE] = NAN
                X[i, USER_STAGE] = NAN if urow < 0 else 0.0
                X[i, HOUR_USER_SHARE] = NAN
        if self._repeat(X, cands, slot, urow, t, p_rows, p_times, NULL) < 0:
            return _NO_MEMORY
        self._context(X, cands, urow, known, ctx_cols)

        # Standing within the request.
        if (_ranks(X, n, ALS, ALS_RANK) < 0 or _ranks(X, n, EASE, EASE_RANK) < 0
                or _ranks(X, n, COVIS_USER, COVIS_USER_RANK) < 0 or _ranks(X, n, POP_30D, POP_30D_RANK) < 0):
            return _NO_MEMORY
        return 0

    cdef inline float32_t _window(self, int64_t base, int64_t t, int64_t days) noexcept nogil:
        """Events of one item (``base`` = its row << 32) in the ``days`` before ``t``."""
        cdef const int64_t* keys = &self.item_event_keys[0] if self.item_event_keys.shape[0] else NULL
        cdef Py_ssize_t m = self.item_event_keys.shape[0]
        cdef int64_t lo_t = t - days * DAY
        return <float32_t>(_count_before(keys, m, base + (t if t > 0 else 0))
                           - _count_before(keys, m, base + (lo_t if lo_t > 0 else 0)))

    cdef Py_ssize_t _covis(
        self,
        float32_t[:, ::1] X,
        int column,
        int32_t[::1] slot,
        float64_t[::1] work,
        float32_t[::1] weights,
        const int32_t[::1] sources,
    ) noexcept nogil:
        """Per candidate, co-visitation similarity summed over ``sources`` (later ones weigh more)."""
        cdef Py_ssize_t s, i, n = X.shape[0], m = sources.shape[0], status
        for i in range(n):
            work[i] = 0.0
        if m:
            for s in range(m):
                weights[s] = _linspace_at(s, m)
            status = _sum_rows_loop(self.covis_indptr, self.covis_items, self.covis_scores, sources,
                                    weights[:m], slot, False, work, slot[:0], 0)
            if status < 0:
                return status
        for i in range(n):
            X[i, column] = <float32_t>work[i]
        return 0

    cdef void _session_similarity(self, float32_t[:, ::1] X, const int32_t[::1] cands,
                                  const int32_t[::1] session) noexcept nogil:
        cdef Py_ssize_t i, s, n = cands.shape[0], d = self.item_factors.shape[1]
        cdef float32_t best, cos, fn, sn
        cdef const float32_t* f
        cdef const float32_t* g
        for i in range(n):
            if session.shape[0] == 0:
                X[i, SESSION_SIM] = NAN
                continue
            f = &self.item_factors[cands[i], 0]
            fn = sqrtf(_dot(f, f, d))
            best = -INFINITY
            for s in range(session.shape[0]):
                g = &self.item_factors[session[s], 0]
                sn = sqrtf(_dot(g, g, d))
                cos = _dot(f, g, d) / (fn * sn if fn * sn > 1e-12 else <float32_t>1e-12)
                if cos != cos or cos > best:
                    best = cos
                    if cos != cos:
                        break
            X[i, SESSION_SIM] = best

    cdef void _ease(self, float32_t[:, ::1] X, const int32_t[::1] cands, uint8_t[::1] mark,
                    Py_ssize_t urow, const int32_t[::1] session) noexcept nogil:
        """EASE weights summed over the user's touched items and the session's, each once."""
        cdef Py_ssize_t i, j, n = cands.shape[0], h = 0
        cdef Py_ssize_t lo = self.touched_indptr[urow] if urow >= 0 else 0
        cdef Py_ssize_t hi = self.touched_indptr[urow + 1] if urow >= 0 else 0
        cdef int32_t r
        cdef const float32_t* row
        if self.has_ease:
            for j in range(lo, hi + session.shape[0]):
                r = self.touched_items[j] if j < hi else session[j - hi]
                if mark[r]:
                    continue
                mark[r] = 1
                row = &self.ease[r, 0]
                if h == 0:
                    for i in range(n):
                        X[i, EASE] = row[cands[i]]
                else:
                    for i in range(n):
                        X[i, EASE] += row[cands[i]]
                h += 1
            for j in range(lo, hi + session.shape[0]):
                mark[self.touched_items[j] if j < hi else session[j - hi]] = 0
        if h == 0:
            for i in range(n):
                X[i, EASE] = NAN

    cdef Py_ssize_t _user(self, float32_t[:, ::1] X, const int32_t[::1] cands, int32_t[::1] slot,
                          Py_ssize_t urow, int64_t t, int block) noexcept nogil:
        cdef Py_ssize_t i, j, n = cands.shape[0], k = self.n_categories
        cdef float32_t* share = <float32_t*>malloc((k if k > 0 else 1) * sizeof(float32_t))
        cdef float32_t ulp = self.user_log_price[urow], stage = self.user_stage[urow]
        cdef float32_t value = self.user_value[urow], hour_share = self.user_hour_share[urow, block]
        cdef float32_t recency = <float32_t>((t - self.user_last_seen[urow]) / <float64_t>DAY)
        cdef float32_t tenure = <float32_t>((self.user_last_seen[urow] - self.user_first_seen[urow]) / <float64_t>DAY)
        cdef int64_t start
        cdef bint bad = False
        if share == NULL:
            return _NO_MEMORY
        memset(share, 0, k * sizeof(float32_t))
        for j in range(self.user_cat_indptr[urow], self.user_cat_indptr[urow + 1]):
            share[self.user_cat_ids[j]] = self.user_cat_share[j]
        for i in range(n):
            start = self.item_cat_indptr[cands[i]]
            X[i, CAT_AFFINITY] = _row_max(
                &self.item_cat_ids[0] + start if self.item_cat_ids.shape[0] else NULL,
                self.item_cat_indptr[cands[i] + 1] - start, share, k, &bad)
            X[i, PRICE_FIT] = fabsf(self.item_rows[cands[i], R_LOG_PRICE] - ulp)
            X[i, USER_STAGE] = stage
            X[i, USER_VALUE] = value
            X[i, USER_RECENCY] = recency
            X[i, USER_TENURE] = tenure
            X[i, HOUR_USER_SHARE] = hour_share
        free(share)
        # Touched but not bought: touched items first, then every bought one back to 0.
        for j in range(self.touched_indptr[urow], self.touched_indptr[urow + 1]):
            if slot[self.touched_items[j]] >= 0:
                X[slot[self.touched_items[j]], TOUCHED_NOT_CONSUMED] = 1.0
        for j in range(self.buy_indptr[urow], self.buy_indptr[urow + 1]):
            if slot[self.buy_items[j]] >= 0:
                X[slot[self.buy_items[j]], TOUCHED_NOT_CONSUMED] = 0.0
        return -2 if bad else 0

    cdef int _repeat(self, float32_t[:, ::1] X, const int32_t[::1] cands, int32_t[::1] slot,
                     Py_ssize_t urow, int64_t t, const int32_t[::1] p_rows,
                     const int64_t[::1] p_times, int64_t* last_out) noexcept nogil:
        """The re-purchase features: the bundle's purchase history of each candidate, with
        the purchases since its data end folded in (one newer basket per day). ``last_out``
        (n,), when given, receives each candidate's last purchase (unix seconds, -1 never)."""
        cdef Py_ssize_t i, j, n = cands.shape[0], n_p = p_rows.shape[0]
        cdef int64_t n_baskets = 0
        cdef int64_t* last
        cdef float32_t baskets, own
        cdef float64_t since
        if urow < 0 and n_p == 0:
            for i in range(n):
                for j in range(BUY_COUNT, IN_LAST_BASKET + 1):
                    X[i, j] = NAN
                X[i, USER_REPEAT_SHARE] = NAN
            return 0
        last = last_out if last_out != NULL else <int64_t*>malloc(n * sizeof(int64_t))
        if last == NULL:
            return -1
        # Defaults: never bought. BUY_COUNT holds the baskets, BUY_INTERVAL the user's own
        # interval (NaN: one basket), IN_LAST_BASKET the flag, while the fold runs.
        for i in range(n):
            last[i] = -1
            X[i, BUY_COUNT] = 0.0
            X[i, BUY_INTERVAL] = NAN
            X[i, IN_LAST_BASKET] = 0.0
        if urow >= 0:
            n_baskets = self.user_baskets[urow]
            for j in range(self.buy_indptr[urow], self.buy_indptr[urow + 1]):
                i = slot[self.buy_items[j]]
                if i >= 0:
                    X[i, BUY_COUNT] = self.buy_baskets[j]
                    last[i] = self.buy_last[j]
                    X[i, BUY_INTERVAL] = self.buy_interval[j]
                    X[i, IN_LAST_BASKET] = self.buy_in_last[j]
        if n_p:
            j = _fold_purchases(X, slot, last, p_rows, p_times)
            if j < 0:
                if last_out == NULL:
                    free(last)
                return -1
            n_baskets += j
        for i in range(n):
            baskets = X[i, BUY_COUNT]
            X[i, BUY_SHARE] = baskets / <float32_t>n_baskets if n_baskets else NAN
            if baskets > 0:
                since = (t - last[i]) / <float64_t>DAY
                own = X[i, BUY_INTERVAL]
                if own != own:
                    own = self.item_rows[cands[i], R_REPEAT_INTERVAL]
                X[i, DAYS_SINCE_BOUGHT] = <float32_t>since
                X[i, BUY_INTERVAL] = own
                X[i, BUY_DUE] = <float32_t>(since / (own if own >= 1.0 or own != own else 1.0))
            else:
                X[i, DAYS_SINCE_BOUGHT] = NAN
                X[i, BUY_INTERVAL] = NAN
                X[i, BUY_DUE] = NAN
            X[i, USER_REPEAT_SHARE] = self.user_repeat_share[urow] if urow >= 0 else NAN
        if last_out == NULL:
            free(last)
        return 0

    cdef void _context(self, float32_t[:, ::1] X, const int32_t[::1] cands, Py_ssize_t urow, bint known,
                       const int32_t[::1] ctx_cols) noexcept nogil:
        """Each context field's item lift and user share at the request's value (NaN: none)."""
        cdef Py_ssize_t i, f, n = cands.shape[0], at
        cdef int col
        cdef float32_t share
        for f in range(3):
            col = ctx_cols[f]
            if col < 0:
                for i in range(n):
                    X[i, CTX_ITEM_LIFT + f] = NAN
                    X[i, CTX_USER_SHARE + f] = NAN
                continue
            if f == 0:
                share = _half(self.ctx_user_0[urow, col]) if known else NAN
            elif f == 1:
                share = _half(self.ctx_user_1[urow, col]) if known else NAN
            else:
                share = _half(self.ctx_user_2[urow, col]) if known else NAN
            at = self.r_context[f] + col
            for i in range(n):
                X[i, CTX_ITEM_LIFT + f] = self.item_rows[cands[i], at]
                X[i, CTX_USER_SHARE + f] = share


cdef void _sort_by_high_half(uint64_t* keys, uint64_t* tmp, Py_ssize_t n) noexcept nogil:
    """Sort ``keys`` (n, written in the order of their low halves) by their high halves, a
    byte at a time from the lowest (a stable radix sort): the same order as sorting the
    whole keys, in a few passes over them rather than a comparison sort's calls; a byte
    every key shares is skipped. ``tmp``: scratch of n keys."""
    cdef Py_ssize_t count[256]
    cdef Py_ssize_t i, total, c
    cdef int shift
    cdef uint64_t* src = keys
    cdef uint64_t* dst = tmp
    cdef uint64_t* swap
    for shift in range(32, 64, 8):
        memset(count, 0, sizeof(count))
        for i in range(n):
            count[(src[i] >> shift) & 0xFF] += 1
        if count[(src[0] >> shift) & 0xFF] == n:
            continue
        total = 0
        for i in range(256):
            c = count[i]
            count[i] = total
            total += c
        for i in range(n):
            c = (src[i] >> shift) & 0xFF
            dst[count[c]] = src[i]
            count[c] += 1
        swap = src
        src = dst
        dst = swap
    if src != keys:
        memcpy(keys, src, n * sizeof(uint64_t))


cdef int _ranks(float32_t[:, ::1] X, Py_ssize_t n, int source, int column) noexcept nogil:
    """Rank of each candidate's ``source`` among the request's, 0 = best, over n; NaN last;
    all NaN when every value is. Tied values share the mean of their ranks, so a rank never
    depends on the order the candidates were merged in. -1: no memory."""
    cdef Py_ssize_t i, j, start = 0
    cdef float32_t rank
    cdef bint any_known = False
    cdef uint64_t* keys
    for i in range(n):
        if X[i, source] == X[i, source]:
            any_known = True
            break
    if not any_known:
        for i in range(n):
            X[i, column] = NAN
        return 0
    keys = <uint64_t*>malloc(2 * n * sizeof(uint64_t))
    if keys == NULL:
        return -1
    for i in range(n):
        keys[i] = _rank_key(X[i, source], i)
    _sort_by_high_half(keys, keys + n, n)
    # Runs of equal values (the keys' high halves; every NaN has the same) share their mean rank.
    for i in range(1, n + 1):
        if i < n and keys[i] >> 32 == keys[start] >> 32:
            continue
        rank = <float32_t>(start + i - 1) * <float32_t>0.5 / <float32_t>n
        for j in range(start, i):
            X[<Py_ssize_t>(keys[j] & ((<uint64_t>1 << 32) - 1)), column] = rank
        start = i
    free(keys)
    return 0


ctypedef struct _Buy:
    int32_t row
    int64_t time


cdef int _cmp_buy(const void* a, const void* b) noexcept nogil:
    cdef const _Buy* x = <const _Buy*>a
    cdef const _Buy* y = <const _Buy*>b
    if x.row != y.row:
        return (x.row > y.row) - (x.row < y.row)
    return (x.time > y.time) - (x.time < y.time)


cdef inline int64_t _day(int64_t t) noexcept nogil:
    """Floor division by a day, as Python's ``//``."""
    return t // DAY if t >= 0 else -((-t + DAY - 1) // DAY)


cdef int64_t _fold_purchases(
    float32_t[:, ::1] X,  # IN/OUT BUY_COUNT, BUY_INTERVAL, IN_LAST_BASKET per candidate
    int32_t[::1] slot,  # IN candidate position per item row, -1 elsewhere
    int64_t* last,  # IN/OUT (n,) last purchase, unix seconds, -1 never
    const int32_t[::1] p_rows,  # IN (p,) purchased item rows since the data end
    const int64_t[::1] p_times,  # IN (p,) their unix seconds
) noexcept nogil:
    """Fold the purchases in; returns the baskets (distinct days) they add. The latest day
    becomes the last basket."""
    cdef Py_ssize_t p, q, start, i, n = X.shape[0], n_p = p_rows.shape[0]
    cdef _Buy* buys = <_Buy*>malloc(n_p * sizeof(_Buy))
    cdef int64_t* days = <int64_t*>malloc(n_p * sizeof(int64_t))
    cdef int64_t latest, distinct = 0, t_new, t_min, old_day, day, prev
    cdef int64_t n_new
    cdef float64_t n_old, first
    cdef bint has_latest
    if buys == NULL or days == NULL:
        free(buys)
        free(days)
        return -1
    for p in range(n_p):
        buys[p].row = p_rows[p]
        buys[p].time = p_times[p]
        days[p] = _day(p_times[p])
    qsort(days, n_p, sizeof(int64_t), _cmp_i64)
    for p in range(n_p):
        if p == 0 or days[p] != days[p - 1]:
            distinct += 1
    latest = days[n_p - 1]
    free(days)
    for i in range(n):
        X[i, IN_LAST_BASKET] = 0.0
    qsort(buys, n_p, sizeof(_Buy), _cmp_buy)
    p = 0
    while p < n_p:
        start = p
        while p < n_p and buys[p].row == buys[start].row:
            p += 1
        i = slot[buys[start].row]
        if i < 0:
            continue
        # buys[start:p]: this item's purchases, by time.
        t_min, t_new = buys[start].time, buys[p - 1].time
        n_old = X[i, BUY_COUNT]
        old_day = _day(last[i]) if n_old >= 1 else -(1 << 62)
        n_new = 0
        has_latest = False
        prev = -(1 << 62)
        for q in range(start, p):
            day = _day(buys[q].time)
            has_latest = has_latest or day == latest
            if day != prev and day != old_day:
                n_new += 1
            prev = day
        if n_old >= 1:
            first = last[i] - (<float64_t>X[i, BUY_INTERVAL] * DAY * (n_old - 1) if n_old >= 2 else 0.0)
            n_new += <int64_t>n_old
            if n_new >= 2:
                X[i, BUY_INTERVAL] = <float32_t>((t_new - first) / DAY / (n_new - 1))
        elif n_new >= 2:
            X[i, BUY_INTERVAL] = <float32_t>((t_new - t_min) / <float64_t>DAY / (n_new - 1))
        X[i, BUY_COUNT] = <float32_t>n_new
        last[i] = last[i] if last[i] > t_new else t_new
        X[i, IN_LAST_BASKET] = 1.0 if has_latest else 0.0
    free(buys)
    return distinct


# ---------------------------------------------------------------------------
# The candidate sources' helpers (FeatureKernel.candidates)
# ---------------------------------------------------------------------------

ctypedef struct _Ranked:
    float64_t score  # higher first
    int64_t tie  # then higher first
    int32_t row  # then lower first


cdef inline bint _better(const _Ranked* a, const _Ranked* b) noexcept nogil:
    if a.score != b.score:
        return a.score > b.score
    if a.tie != b.tie:
        return a.tie > b.tie
    return a.row < b.row


cdef int _cmp_i32(const void* a, const void* b) noexcept nogil:
    cdef int32_t x = (<const int32_t*>a)[0], y = (<const int32_t*>b)[0]
    return (x > y) - (x < y)


cdef void _sift_down(_Ranked* heap, Py_ssize_t k, Py_ssize_t i) noexcept nogil:
    """Restore the heap below ``i``: the worst entry of ``heap[:k]`` at the root."""
    cdef Py_ssize_t child
    cdef _Ranked tmp
    while True:
        child = 2 * i + 1
        if child >= k:
            return
        if child + 1 < k and _better(&heap[child], &heap[child + 1]):
            child += 1  # the worse child
        if not _better(&heap[i], &heap[child]):
            return
        tmp = heap[i]
        heap[i] = heap[child]
        heap[child] = tmp
        i = child


cdef Py_ssize_t _best(_Ranked* ranked, Py_ssize_t n, int32_t[::1] out) noexcept nogil:
    """Write the rows of the best of ``ranked[:n]`` to ``out``, best first, as many as it holds
    (or ``n``); returns how many. Frees ``ranked``."""
    cdef Py_ssize_t i, k = out.shape[0]
    cdef _Ranked tmp
    if k > n:
        k = n
    # Keep the k best in a heap whose root is the worst of them: O(n log k).
    for i in range(k // 2 - 1, -1, -1):
        _sift_down(ranked, k, i)
    for i in range(k, n):
        if _better(&ranked[i], &ranked[0]):
            ranked[0] = ranked[i]
            _sift_down(ranked, k, 0)
    # Then sort them by taking the worst off the root to the end, k times (heapsort): the
    # comparisons inline, where qsort calls a comparator through a pointer for each.
    for i in range(k - 1, 0, -1):
        tmp = ranked[0]
        ranked[0] = ranked[i]
        ranked[i] = tmp
        _sift_down(ranked, i, 0)
    for i in range(k):
        out[i] = ranked[i].row
    free(ranked)
    return k


cdef Py_ssize_t _keep_new(const int32_t[::1] rows, int32_t[::1] slot, int32_t[::1] out,
                          Py_ssize_t n) noexcept nogil:
    """Append to ``out[n:]`` each of ``rows`` (-1 skipped) not met before (``slot`` -1), and
    give it its position in ``slot``; returns the count in ``out``."""
    cdef Py_ssize_t i
    cdef int32_t r
    for i in range(rows.shape[0]):
        r = rows[i]
        if r >= 0 and slot[r] < 0:
            slot[r] = <int32_t>n
            out[n] = r
            n += 1
    return n
