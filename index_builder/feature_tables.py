"""The bundle tables the reranker's features are read from (see ``ranking.pipeline.features``).

Item event times for windowed popularity, first-seen dates, hour/weekday lifts,
per-user activity, category shares, price level, recent items, touched items,
the item-to-item (co-visitation cosine) neighbour lists, and per context field
(channel, device, region) a small vocabulary with item lifts and user shares.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import scipy.sparse as sp

from index_builder.config import BuildConfig
from index_builder.tables import top_rows
from ranking.pipeline.features import (
    CONTEXT_FIELDS,
    DAY,
    DAYS_OF_WEEK,
    HOUR_BLOCKS,
    KEY_SHIFT,
    WINDOW_DAYS,
    window_counts_at,
)


def _hour_block(ts: np.ndarray) -> np.ndarray:
    return ((ts // 3600) % 24 // (24 // HOUR_BLOCKS)).astype(np.int64)


def _weekday(ts: np.ndarray) -> np.ndarray:
    return ((ts // DAY + 3) % 7).astype(np.int64)


def _lift(rows: np.ndarray, bucket: np.ndarray, n_rows: int, n_buckets: int) -> np.ndarray:
    """Each row's (smoothed) share of events per bucket over everyone's share: 1 = no preference."""
    flat = rows.astype(np.int64) * n_buckets + bucket.astype(np.int64)
    counts = np.bincount(flat, minlength=n_rows * n_buckets).reshape(n_rows, n_buckets).astype(np.float64)
    overall = (counts.sum(axis=0) + 1.0) / (counts.sum() + n_buckets)
    # A prior of n_buckets events spread like everyone's keeps rare items near 1.
    share = (counts + n_buckets * overall) / (counts.sum(axis=1, keepdims=True) + n_buckets)
    return (share / overall).astype(np.float32)


def context_codes(
    column: pa.ChunkedArray | pa.Array, positive: np.ndarray, cap: int
) -> tuple[np.ndarray, np.ndarray, bool]:
    """A context column's vocabulary and every event's code in it.

    Parameters
    ----------
    column : pyarrow array
        One context value per event (dictionary-encoded, as ``index_builder.io.read_events``
        returns it), null where unknown.
    positive : np.ndarray of bool
        The events the vocabulary is counted on (those that show interest).
    cap : int
        The most values kept; the rest share one "other" code.

    Returns
    -------
    codes : np.ndarray of int16
        Per event: the value's column (0 .. len(values) - 1), ``len(values)`` for "other",
        -1 for unknown (no value, or one seen only on events that are not positive).
    values : np.ndarray of str
        The vocabulary, most frequent first (ties by name).
    has_other : bool
        Whether the vocabulary was capped (and code ``len(values)`` exists).
    """
    if column.null_count == len(column):  # no context in this shop: nothing to decode
        return np.full(len(column), -1, np.int16), np.zeros(0, str), False
    if isinstance(column, pa.ChunkedArray):
        column = column.unify_dictionaries().combine_chunks() if column.num_chunks else pa.array([], pa.string())
    if not pa.types.is_dictionary(column.type):
        column = pc.dictionary_encode(column.cast(pa.string()))
    idx = pc.fill_null(column.indices, -1).to_numpy(zero_copy_only=False).astype(np.int64)
    names = np.asarray(column.dictionary.to_pylist(), dtype=str) if len(column.dictionary) else np.zeros(0, str)
    counts = np.bincount(idx[positive & (idx >= 0)], minlength=len(names))
    seen = np.flatnonzero(counts > 0)
    ranked = seen[np.lexsort((names[seen], -counts[seen]))]
    keep = ranked[:cap]
    has_other = len(ranked) > cap
    mapping = np.full(len(names) + 1, -1, np.int16)  # the extra last slot maps the null index -1
    if has_other:
        mapping[: len(names)] = len(keep)
    mapping[keep] = np.arange(len(keep), dtype=np.int16)
    return mapping[idx], names[keep], has_other


def context_of(events: pa.Table, rows: list[int]) -> dict[str, list[str]]:
    """The context fields of some events as request fields ("" where unknown), e.g. a query's first event.

    Only the given rows become Python strings.
    """
    take = pa.array(rows, pa.int64())
    return {
        f: [v or "" for v in pc.take(events[f], take).to_pylist()] for f in CONTEXT_FIELDS if f in events.column_names
    }


def context_tables(
    u: np.ndarray, i: np.ndarray, positive: np.ndarray, codes: dict[str, tuple], n_users: int, n_items: int
) -> dict[str, np.ndarray]:
    """Per context field: its vocabulary, each item's lift and each user's share per value.

    Parameters
    ----------
    u, i : np.ndarray
        Per event: user row, item row.
    positive : np.ndarray of bool
        The events counted.
    codes : dict
        Field name to ``context_codes``'s (codes, values, has_other).

    Returns
    -------
    dict
        ``context_<f>_values`` (str), ``item_<f>_lift`` (n_items × columns, float16, smoothed
        as the hour lifts: 1 = no preference) and ``user_<f>_share`` (n_users × columns,
        float16, NaN for a user without a positive event of known value). Columns are the
        values, then "other" when the vocabulary was capped. float16 keeps a million items
        and users at 2 bytes per column.
    """
    out: dict[str, np.ndarray] = {}
    for name, (code, values, has_other) in codes.items():
        n_cols = len(values) + int(has_other)
        sel = positive & (code >= 0)
        out[f"context_{name}_values"] = values
        if n_cols == 0:
            out[f"item_{name}_lift"] = np.zeros((n_items, 0), np.float16)
            out[f"user_{name}_share"] = np.zeros((n_users, 0), np.float16)
            continue
        c = code[sel].astype(np.int64)
        out[f"item_{name}_lift"] = _lift(i[sel], c, n_items, n_cols).astype(np.float16)
        ucounts = np.bincount(u[sel].astype(np.int64) * n_cols + c, minlength=n_users * n_cols)
        ucounts = ucounts.reshape(n_users, n_cols).astype(np.float32)
        total = ucounts.sum(axis=1, keepdims=True)
        with np.errstate(invalid="ignore", divide="ignore"):
            out[f"user_{name}_share"] = np.where(total > 0, ucounts / total, np.nan).astype(np.float16)
    return out


def lifecycle_stage(n_events: np.ndarray, tenure_days: np.ndarray, cfg: BuildConfig) -> np.ndarray:
    """0 new, 1 developing, 2 established (from interaction count and tenure; thresholds in ``cfg``)."""
    stage = np.ones(len(n_events), np.int8)
    stage[(n_events < cfg.lifecycle_new_events) & (tenure_days < cfg.lifecycle_established_days)] = 0
    stage[(n_events >= cfg.lifecycle_established_events) | (tenure_days >= cfg.lifecycle_established_days)] = 2
    return stage


def covisitation(pos: sp.csr_matrix, top_n: int, shrink: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Item-to-item neighbours by shrunk cosine of their user sets: (indptr, items, scores), best first."""
    X = pos.tocsc().astype(np.float32)
    X.data[:] = 1.0
    counts = np.asarray(X.sum(axis=0)).ravel()
    C = (X.T @ X).tocsr()
    C.setdiag(0)
    C.eliminate_zeros()
    C = C.tocoo()
    denom = np.sqrt(counts[C.row] * counts[C.col]) + shrink
    sim = sp.csr_matrix((C.data / denom, (C.row, C.col)), shape=C.shape)
    indptr, items, scores = [0], [], []
    for r in range(sim.shape[0]):
        lo, hi = sim.indptr[r], sim.indptr[r + 1]
        cols, vals = sim.indices[lo:hi], sim.data[lo:hi]
        top = top_rows(vals, top_n)
        items.append(cols[top])
        scores.append(vals[top])
        indptr.append(indptr[-1] + len(top))
    return (
        np.asarray(indptr, np.int64),
        np.concatenate(items).astype(np.int32) if items else np.zeros(0, np.int32),
        np.concatenate(scores).astype(np.float32) if scores else np.zeros(0, np.float32),
    )


def feature_tables(
    u: np.ndarray,
    i: np.ndarray,
    ts: np.ndarray,
    positive: np.ndarray,
    consumed: np.ndarray,
    n_users: int,
    n_items: int,
    cat_indptr: np.ndarray,
    cat_ids: np.ndarray,
    n_categories: int,
    prices: np.ndarray,
    recent_pop: np.ndarray,
    cfg: BuildConfig,
) -> dict[str, np.ndarray]:
    """Every feature table, as bundle arrays by name.

    Parameters
    ----------
    u, i, ts : np.ndarray
        Per event: user row, item row, unix seconds.
    positive, consumed : np.ndarray of bool
        Events that show interest (weight > 0); events that consume the item (bought, rated).
    cat_indptr, cat_ids : np.ndarray
        Each item's categories (CSR).
    prices : np.ndarray
        float32 price per item, NaN unknown.
    recent_pop : np.ndarray
        Recent popularity per item (for the recent-popular candidate list).
    """
    out: dict[str, np.ndarray] = {}
    ts = ts.astype(np.int64)
    up, ip, tp = u[positive], i[positive], ts[positive]

    keys = ip.astype(np.int64) * KEY_SHIFT + np.clip(tp, 0, KEY_SHIFT - 1)
    out["item_event_keys"] = np.sort(keys)
    # Every served request comes after the data: its windows end just after the last event.
    t_after = int(ts.max()) + 1 if len(ts) else 0
    for days in WINDOW_DAYS:
        out[f"item_events_{days}d_at_end"] = window_counts_at(out["item_event_keys"], t_after, days, n_items)
    first = np.full(n_items, np.iinfo(np.int64).max, np.int64)
    np.minimum.at(first, i, ts)
    out["item_first_seen"] = np.where(first == np.iinfo(np.int64).max, -1, first)
    out["item_hour_lift"] = _lift(ip, _hour_block(tp), n_items, HOUR_BLOCKS)
    out["item_weekday_lift"] = _lift(ip, _weekday(tp), n_items, DAYS_OF_WEEK)

    ufirst = np.full(n_users, np.iinfo(np.int64).max, np.int64)
    ulast = np.full(n_users, -1, np.int64)
    np.minimum.at(ufirst, u, ts)
    np.maximum.at(ulast, u, ts)
    ufirst = np.where(ulast < 0, -1, ufirst)
    out["user_first_seen"] = ufirst
    out["user_last_seen"] = ulast
    n_events = np.bincount(up, minlength=n_users)
    tenure = np.where(ulast >= 0, (ulast - ufirst) / DAY, 0.0)
    out["user_stage"] = lifecycle_stage(n_events, tenure, cfg)
    out["user_value"] = np.log1p(np.bincount(u[consumed], minlength=n_users)).astype(np.float32)
    hours = np.zeros((n_users, HOUR_BLOCKS), np.float32)
    np.add.at(hours, (up, _hour_block(tp)), 1.0)
    out["user_hour_share"] = (hours / np.maximum(hours.sum(axis=1, keepdims=True), 1.0)).astype(np.float32)

    logp = np.log(np.where(prices > 0, prices, np.nan)).astype(np.float64)
    ev_logp = logp[ip]
    ok = np.isfinite(ev_logp)
    s = np.bincount(up[ok], weights=ev_logp[ok], minlength=n_users)
    cnt = np.bincount(up[ok], minlength=n_users)
    with np.errstate(invalid="ignore", divide="ignore"):
        out["user_log_price"] = np.where(cnt > 0, s / cnt, np.nan).astype(np.float32)

    # Category shares: each positive event spreads one unit over its item's categories.
    lengths = np.diff(cat_indptr)[ip]
    owner = np.repeat(np.arange(len(ip)), lengths)
    flat = np.arange(int(lengths.sum())) - np.repeat(np.cumsum(lengths) - lengths, lengths) + cat_indptr[ip][owner]
    uc = sp.csr_matrix((1.0 / lengths[owner], (up[owner], cat_ids[flat])), shape=(n_users, max(n_categories, 1)))
    uc.sum_duplicates()
    totals = np.bincount(up, minlength=n_users).astype(np.float64)
    uc = sp.csr_matrix(sp.diags(1.0 / np.maximum(totals, 1.0)) @ uc)
    uc.sort_indices()
    out["user_cat_indptr"] = uc.indptr.astype(np.int64)
    out["user_cat_ids"] = uc.indices.astype(np.int32)
    out["user_cat_share"] = uc.data.astype(np.float32)

    # The user's last distinct positive items, most recent last.
    order = np.lexsort((tp, up))
    su, si = up[order], ip[order]
    indptr, items = [0], []
    bounds = np.searchsorted(su, np.arange(n_users + 1))
    for r in range(n_users):
        seq = si[bounds[r] : bounds[r + 1]][::-1]
        _, first_pos = np.unique(seq, return_index=True)
        last = seq[np.sort(first_pos)][: cfg.recent_items_per_user][::-1]
        items.append(last)
        indptr.append(indptr[-1] + len(last))
    out["user_recent_indptr"] = np.asarray(indptr, np.int64)
    out["user_recent_items"] = np.concatenate(items).astype(np.int32) if items else np.zeros(0, np.int32)

    touched = sp.csr_matrix((np.ones(len(u), np.int8), (u, i)), shape=(n_users, n_items))
    touched.sum_duplicates()
    touched.sort_indices()
    out["touched_indptr"] = touched.indptr.astype(np.int64)
    out["touched_items"] = touched.indices.astype(np.int32)

    pos = sp.csr_matrix((np.ones(len(up), np.float32), (up, ip)), shape=(n_users, n_items))
    pos.sum_duplicates()
    out["covis_indptr"], out["covis_items"], out["covis_scores"] = covisitation(
        pos, cfg.covis_neighbours, cfg.covis_shrink
    )
    out["recent_popular_items"] = top_rows(recent_pop, cfg.popular_top_items)
    out["ease_weights"] = ease(pos, cfg.ease_lambda) if n_items <= cfg.ease_max_items else np.zeros((0, 0), np.float32)
    return out


def ease(pos: sp.csr_matrix, lam: float) -> np.ndarray:
    """EASE item-item weights (Steck 2019): a closed-form linear autoencoder of the user × item matrix."""
    X = pos.copy()
    X.data[:] = 1.0
    G = np.asarray((X.T @ X).todense(), dtype=np.float64)
    G[np.diag_indices_from(G)] += lam
    P = np.linalg.inv(G)
    B = -P / np.diag(P)[None, :]
    B[np.diag_indices_from(B)] = 0.0
    return B.astype(np.float32)
