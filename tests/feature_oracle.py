"""The NumPy feature code the serving path ran before the compiled kernel: the kernel's test oracle.

Kept as it was written (``ranking.pipeline.features`` before ``ranking.kernels._features``),
with the table object passed in as ``self``: every feature the kernel writes must equal
what this computes, within float32 rounding.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ranking.bundle.model import Csr
from ranking.bundle.schema import WINDOW_DAYS
from ranking.kernels.rows import CandidateIndex, max_share
from ranking.pipeline.features import (
    DAY,
    FEATURE_NAMES,
    HOUR_BLOCKS,
    KEY_SHIFT,
    N_FEATURES,
    RANKED,
    FeatureTables,
    Purchases,
    Request,
)

_COL = {name: j for j, name in enumerate(FEATURE_NAMES)}


@dataclass(frozen=True)
class BuyStats:
    """One user's purchase history of some items (the bundle's, real-time purchases added)."""

    baskets: np.ndarray  # float32 baskets with the item, 0 never
    last: np.ndarray  # int64 unix seconds of the last purchase, -1 never
    interval: np.ndarray  # float32 days, the user's own mean interval; NaN with one basket
    in_last: np.ndarray  # float32 1 in the user's last basket
    n_baskets: int  # the user's baskets of any item


class OracleTables(FeatureTables):
    """The pipeline's tables plus the arrays only this reference reads (the kernel packs them)."""

    def __init__(self, tables: FeatureTables):
        super().__init__(tables.model, tables.scratch, tables.kernel)
        b = tables.model.bundle
        for name in (
            "item_event_keys",
            "item_first_seen",
            "item_hour_lift",
            "item_weekday_lift",
            "item_repeat_rate",
            "user_first_seen",
            "user_last_seen",
            "user_stage",
            "user_value",
            "user_hour_share",
            "user_log_price",
            "user_repeat_share",
        ):
            setattr(self, name, b.array(name))
        self.user_categories = Csr(b.array("user_cat_indptr"), b.array("user_cat_ids"), b.array("user_cat_share"))
        self._end_counts = {days: b.array(f"item_events_{days}d_at_end") for days in WINDOW_DAYS}
        self.user_recent = Csr(b.array("user_recent_indptr"), b.array("user_recent_items"))
        self.touched = Csr(b.array("touched_indptr"), b.array("touched_items"))
        self.bought = Csr(b.array("user_buy_indptr"), b.array("user_buy_items"))
        self.buy_baskets = b.array("user_buy_baskets")
        self.buy_last = b.array("user_buy_last")
        self.buy_interval = b.array("user_buy_interval")
        self.buy_in_last = b.array("user_buy_in_last")
        self.user_baskets = b.array("user_baskets")
        self.item_repeat_interval = b.array("item_repeat_interval")
        self.item_reoffer = b.array("item_reoffer")
        self.covis = Csr(b.array("covis_indptr"), b.array("covis_items"), b.array("covis_scores"))
        self.recent_popular_items = b.array("recent_popular_items")
        ease = b.array("ease_weights")
        self.ease = ease if ease.size else None  # absent for catalogs above ease_max_items

    # -- what the candidate sources and features read, as the pipeline computed them before --
    def covis_from(self, sources: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(items, summed similarity) of the neighbours of ``sources``, best first."""
        # Each entry of the sources' rows, weight 1, summed per item in float64 in entry order.
        ptr = np.asarray(self.covis.indptr)
        at = np.concatenate([np.arange(ptr[s], ptr[s + 1]) for s in sources]) if len(sources) else np.zeros(0, int)
        items, inv = np.unique(np.asarray(self.covis.indices)[at], return_inverse=True)
        total = np.bincount(inv, weights=np.asarray(self.covis.values)[at].astype(np.float64), minlength=len(items))
        items = items.astype(np.int32)
        order = np.lexsort((items, -total))
        return items[order], total[order].astype(np.float32)

    def user_recent_items(self, urow: int) -> np.ndarray:
        if urow < 0:
            return np.zeros(0, np.int32)
        return np.asarray(self.user_recent.row(urow))

    def history(self, urow: int, session: np.ndarray) -> np.ndarray:
        """Items the user touched (all time) plus this session's: the input of the EASE score."""
        own = np.asarray(self.touched.row(urow)) if urow >= 0 else np.zeros(0, np.int32)
        return np.unique(np.concatenate([own, session]).astype(np.int32))

    def ease_all(self, hist: np.ndarray) -> np.ndarray | None:
        """EASE scores of every item for a history, or None without weights or history."""
        if self.ease is None or len(hist) == 0:
            return None
        return np.asarray(self.ease[hist], np.float64).sum(axis=0)

    def buy_stats(self, urow: int, rows: np.ndarray, purchases: Purchases | None) -> BuyStats:
        """The user's purchase history of ``rows`` (distinct item rows): the bundle's, with the
        purchases since its data end folded in as one newer basket per day."""
        n = len(rows)
        baskets = np.zeros(n, np.float32)
        last = np.full(n, -1, np.int64)
        interval = np.full(n, np.nan, np.float32)
        in_last = np.zeros(n, np.float32)
        n_baskets = 0
        if urow >= 0:
            lo, hi = int(self.bought.indptr[urow]), int(self.bought.indptr[urow + 1])
            n_baskets = int(self.user_baskets[urow])
            if hi > lo:
                own = np.asarray(self.bought.indices[lo:hi])
                # The CSR row is sorted by item row: one binary search per candidate.
                at = np.minimum(np.searchsorted(own, rows), len(own) - 1)
                hit = own[at] == rows
                src = lo + at[hit]
                baskets[hit] = self.buy_baskets[src]
                last[hit] = self.buy_last[src]
                interval[hit] = self.buy_interval[src]
                in_last[hit] = self.buy_in_last[src]
        if purchases is not None and len(purchases):
            days = purchases.times.astype(np.int64) // DAY
            n_baskets += len(np.unique(days))
            # The latest real-time day is now the last basket.
            in_last[:] = 0.0
            position = {int(r): j for j, r in enumerate(rows)}
            latest = int(days.max())
            for r in np.unique(purchases.rows):
                j = position.get(int(r))
                if j is None:
                    continue
                mine = purchases.rows == r
                new_days = np.unique(days[mine])
                t_new = int(purchases.times[mine].max())
                n_old = float(baskets[j])
                if n_old >= 1:
                    first = last[j] - (float(interval[j]) * DAY * (n_old - 1) if n_old >= 2 else 0.0)
                    # A purchase on the day of the bundle's last one is the same basket.
                    new_days = new_days[new_days != last[j] // DAY]
                    n_new = n_old + len(new_days)
                    if n_new >= 2:
                        interval[j] = (t_new - first) / DAY / (n_new - 1)
                else:
                    n_new = float(len(new_days))
                    if n_new >= 2:
                        interval[j] = (t_new - int(purchases.times[mine].min())) / DAY / (n_new - 1)
                baskets[j] = n_new
                last[j] = max(int(last[j]), t_new)
                in_last[j] = float(latest in set(days[mine].tolist()))
        return BuyStats(baskets, last, interval, in_last, n_baskets)

    def buy_again(self, urow: int, t: int, purchases: Purchases | None, n: int) -> np.ndarray:
        """The user's own re-offerable purchases, best first by a cheap due-ness: the buy-again candidates.

        An item scores its baskets times how close it is to due (days since its last purchase
        over its interval, 1 best, on a log scale), so a staple just bought waits for its turn.
        """
        own = self.bought.row(urow) if urow >= 0 else np.zeros(0, np.int32)
        if purchases is not None and len(purchases):
            own = np.union1d(own, purchases.rows).astype(np.int32)
        own = own[self.item_reoffer[own] > 0] if len(own) else own
        if len(own) == 0 or n <= 0:
            return np.zeros(0, np.int32)
        st = self.buy_stats(urow, own, purchases)
        typical = np.where(np.isnan(st.interval), self.item_repeat_interval[own], st.interval)
        with np.errstate(invalid="ignore", divide="ignore"):
            due = (t - st.last) / DAY / typical
            closeness = np.exp(-np.abs(np.log(np.maximum(due, 1e-3))))
        score = st.baskets * np.nan_to_num(closeness, nan=0.5)
        top = np.lexsort((-st.last, -score))[:n]
        return own[top].astype(np.int32)


_ORACLES: dict[int, tuple[FeatureTables, OracleTables]] = {}


def oracle_tables(tables: FeatureTables) -> OracleTables:
    """The reference's tables for ``tables``, built once per tables object."""
    held = _ORACLES.get(id(tables))
    if held is None or held[0] is not tables:
        held = _ORACLES[id(tables)] = (tables, OracleTables(tables))
    return held[1]


def assemble(tables: FeatureTables, req: Request, cands: np.ndarray) -> np.ndarray:
    """The (n_candidates, N_FEATURES) float32 matrix of one request, in NumPy."""
    self = oracle_tables(tables)
    n = len(cands)
    X = np.zeros((n, N_FEATURES), dtype=np.float32)
    if n == 0:
        return X
    with self.scratch.index(cands) as index:
        _fill(self, X, req, index)
    return X


def _covis_to(self: OracleTables, sources: np.ndarray, index: CandidateIndex) -> np.ndarray:
    # Later items (the user's most recent, the session's last) weigh more.
    w = np.linspace(0.5, 1.0, len(sources), dtype=np.float32)
    return index.scatter_sum(self.covis, sources, w)


def window_counts(self: OracleTables, cands: np.ndarray, t: int, days: int) -> np.ndarray:
    if t == self._t_end:
        return self._end_counts[days][cands]
    base = cands.astype(np.int64) * KEY_SHIFT
    hi = np.searchsorted(self.item_event_keys, base + max(t, 0))
    lo = np.searchsorted(self.item_event_keys, base + max(t - days * DAY, 0))
    return (hi - lo).astype(np.float32)


def _fill(self: OracleTables, X: np.ndarray, req: Request, index: CandidateIndex) -> None:
    m = self.model
    cands = index.cands
    # Without an event time (offline callers only: the server fills in its clock) the
    # request is taken to come just after the bundle's data.
    t = int(req.event_time) if req.event_time is not None else self._t_end
    c = _COL
    urow = req.urow
    known = urow >= 0 and bool(m.user_has_history[urow])

    if req.qvec is not None:
        X[:, c["als_score"]] = np.asarray(m.item_factors[cands], np.float32) @ req.qvec
    else:
        X[:, c["als_score"]] = np.nan
    X[:, c["covis_user"]] = _covis_to(self, self.user_recent_items(urow) if known else np.zeros(0, np.int32), index)
    X[:, c["covis_session"]] = _covis_to(self, req.session, index)
    hist = self.history(urow, req.session) if self.ease is not None else ()
    if self.ease is not None and len(hist):
        X[:, c["ease_score"]] = np.asarray(self.ease[hist][:, cands], np.float32).sum(axis=0)
    else:
        X[:, c["ease_score"]] = np.nan
    if len(req.session):
        f = np.asarray(m.item_factors[cands], np.float32)
        s = np.asarray(m.item_factors[req.session], np.float32)
        fn = np.linalg.norm(f, axis=1)
        sn = np.linalg.norm(s, axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            cos = (f @ s.T) / np.maximum(fn[:, None] * sn[None, :], 1e-12)
        X[:, c["session_similarity"]] = cos.max(axis=1)
    else:
        X[:, c["session_similarity"]] = np.nan

    X[:, c["popularity"]] = m.item_popularity[cands]
    # The bundle knows nothing after its data end: a later request sees the last windows it has.
    t_pop = min(t, self._t_end)
    c7, c30 = (window_counts(self, cands, t_pop, days) for days in WINDOW_DAYS)
    X[:, c["popularity_7d"]] = np.log1p(c7)
    X[:, c["popularity_30d"]] = np.log1p(c30)
    X[:, c["trend"]] = np.log((c7 + 1.0) / (c30 * (7.0 / 30.0) + 1.0))
    first = self.item_first_seen[cands]
    X[:, c["item_age_days"]] = np.where(first >= 0, (t - first) / DAY, np.nan)
    price = np.asarray(m.item_price[cands], np.float32)
    X[:, c["price"]] = price
    if req.seg >= 0:
        pos = index.positions(m.segment_popular.row(req.seg))
        hit = pos >= 0
        X[pos[hit], c["segment_popularity"]] = m.segment_popular.row_values(req.seg)[hit]

    if known:
        share = np.zeros(len(m.category_names), np.float32)  # the user's share per category, 0 for none
        share[self.user_categories.row(urow)] = self.user_categories.row_values(urow)
        X[:, c["category_affinity"]] = max_share(m.item_categories, cands, share)
        ulp = float(self.user_log_price[urow])
        with np.errstate(invalid="ignore", divide="ignore"):
            X[:, c["price_fit"]] = np.abs(np.log(price) - ulp)
        tnc = X[:, c["touched_not_consumed"]]
        for rows, flag in ((self.touched.row(urow), 1.0), (self.bought.row(urow), 0.0)):
            pos = index.positions(rows)
            tnc[pos[pos >= 0]] = flag
        X[:, c["user_stage"]] = self.user_stage[urow]
        X[:, c["user_value"]] = self.user_value[urow]
        X[:, c["user_recency_days"]] = (t - int(self.user_last_seen[urow])) / DAY
        X[:, c["user_tenure_days"]] = (int(self.user_last_seen[urow]) - int(self.user_first_seen[urow])) / DAY
    else:
        for name in ("category_affinity", "price_fit", "user_recency_days", "user_tenure_days"):
            X[:, c[name]] = np.nan
        X[:, c["user_stage"]] = np.nan if urow < 0 else 0.0

    _fill_repeat(self, X, req, cands, t)

    block = (t // 3600) % 24 // (24 // HOUR_BLOCKS)
    weekday = (t // DAY + 3) % 7  # 1970-01-01 was a Thursday; Monday = 0
    X[:, c["hour_item_lift"]] = self.item_hour_lift[cands, block]
    X[:, c["weekday_item_lift"]] = self.item_weekday_lift[cands, weekday]
    X[:, c["hour_user_share"]] = self.user_hour_share[urow, block] if known else np.nan
    for field, table in self.context.items():
        col = table.column(getattr(req, field))
        if col < 0:
            X[:, c[f"{field}_item_lift"]] = np.nan
            X[:, c[f"{field}_user_share"]] = np.nan
            continue
        X[:, c[f"{field}_item_lift"]] = table.item_lift[cands, col]
        X[:, c[f"{field}_user_share"]] = table.user_share[urow, col] if known else np.nan
    X[:, c["rung"]] = req.rung
    X[:, c["days_after_data_end"]] = (t - self.data_end) / DAY
    for rank_name, source in RANKED:
        v = X[:, c[source]]
        if np.isnan(v).all():
            X[:, c[rank_name]] = np.nan
            continue
        X[:, c[rank_name]] = mean_rank(v)


def mean_rank(v: np.ndarray) -> np.ndarray:
    """Rank of each value among ``v``, 0 = largest, over len(v); NaN (unknown) last; tied
    values (NaN with NaN) share the mean of their ranks; all NaN when every value is."""
    n = len(v)
    if np.isnan(v).all():
        return np.full(n, np.nan, np.float32)
    key = np.where(np.isnan(v), np.inf, -np.asarray(v, np.float64))
    order = np.argsort(key, kind="stable")
    s = key[order]
    first = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])
    last = np.r_[first[1:], n] - 1
    run = np.cumsum(np.r_[True, s[1:] != s[:-1]]) - 1
    r = np.empty(n, np.float32)
    r[order] = ((first + last).astype(np.float32) * np.float32(0.5) / np.float32(n))[run]
    return r


def _fill_repeat(self: OracleTables, X: np.ndarray, req: Request, cands: np.ndarray, t: int) -> None:
    """The re-purchase features (``buy_count`` .. ``user_repeat_share``)."""
    c = _COL
    X[:, c["item_repeat_rate"]] = self.item_repeat_rate[cands]
    names = ("buy_count", "buy_share", "days_since_bought", "buy_interval_days", "buy_due", "in_last_basket")
    if req.urow < 0 and (req.purchases is None or not len(req.purchases)):
        for name in (*names, "user_repeat_share"):
            X[:, c[name]] = np.nan
        return
    st = self.buy_stats(req.urow, cands, req.purchases)
    bought = st.baskets > 0
    X[:, c["buy_count"]] = st.baskets
    X[:, c["buy_share"]] = st.baskets / st.n_baskets if st.n_baskets else np.nan
    since = np.where(bought, (t - st.last) / DAY, np.nan)
    own = np.where(np.isnan(st.interval), self.item_repeat_interval[cands], st.interval)
    own = np.where(bought, own, np.nan)
    X[:, c["days_since_bought"]] = since
    X[:, c["buy_interval_days"]] = own
    with np.errstate(invalid="ignore", divide="ignore"):
        X[:, c["buy_due"]] = since / np.maximum(own, 1.0)
    X[:, c["in_last_basket"]] = st.in_last
    share = float(self.user_repeat_share[req.urow]) if req.urow >= 0 else np.nan
    X[:, c["user_repeat_share"]] = share
