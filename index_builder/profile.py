"""The data profile the ladder's answer depends on: buying frequency, basket size, variety, long tail."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from index_builder.config import BuildConfig
from index_builder.repeat import basket_keys, repeat_tables
from index_builder.tables import item_categories

DAY = 86_400


def _q(x: np.ndarray, q: float) -> float | None:
    return round(float(np.quantile(x, q)), 3) if len(x) else None


def data_profile(events: pa.Table, items: pa.Table, cfg: BuildConfig) -> dict:
    """Figures describing a shop's event log (a visit is one user's events on one UTC day).

    Parameters
    ----------
    events : pyarrow.Table
        Validated events.
    items : pyarrow.Table
        The catalog (``categories`` list column when known).
    cfg : BuildConfig
        ``consumed_event_types`` say what counts as a purchase.

    Returns
    -------
    dict
        JSON-ready figures; ``None`` where the log has nothing to measure.
    """
    users = events["user_id"].to_numpy(zero_copy_only=False)
    item_ids = events["item_id"].to_numpy(zero_copy_only=False)
    ts = events["timestamp"].to_numpy().astype(np.int64)
    _, u = np.unique(users, return_inverse=True)
    cat_items, it = np.unique(item_ids, return_inverse=True)
    n_users, n_active_items = int(u.max()) + 1 if len(u) else 0, len(cat_items)
    consumed = pc.is_in(events["event_type"], value_set=pa.array(cfg.consumed_event_types, pa.string()))
    consumed = consumed.to_numpy(zero_copy_only=False)

    day = ts // DAY
    visit_keys = u.astype(np.int64) * (int(day.max()) + 1 if len(day) else 1) + day
    vk, v_inv = np.unique(visit_keys, return_inverse=True)
    items_per_visit = np.bincount(v_inv, minlength=len(vk))
    visits_per_user = np.bincount(vk // (int(day.max()) + 1 if len(day) else 1), minlength=n_users)
    # Days between one visit and the user's next.
    vu = vk // (int(day.max()) + 1 if len(day) else 1)
    vd = vk % (int(day.max()) + 1 if len(day) else 1)
    same = vu[1:] == vu[:-1]
    gaps = (vd[1:] - vd[:-1])[same]
    buys = np.bincount(u[consumed], minlength=n_users)
    span_days = max((int(ts.max()) - int(ts.min())) / DAY, 1.0) if len(ts) else 1.0

    # Long tail: how concentrated interest is on the catalog.
    per_item = np.bincount(it, minlength=n_active_items).astype(np.float64)
    n_catalog = items.num_rows
    counts = np.sort(np.concatenate([per_item, np.zeros(max(n_catalog - n_active_items, 0))]))[::-1]
    total = counts.sum()
    cum = np.cumsum(counts) / total if total else np.zeros(0)

    def top_share(frac: float) -> float | None:
        if not len(cum):
            return None
        return round(float(cum[max(int(np.ceil(frac * len(counts))) - 1, 0)]), 3)

    asc = counts[::-1]
    gini = float(1 - 2 * np.sum(np.cumsum(asc) / total) / len(asc) + 1 / len(asc)) if total else None

    # Variety: distinct items and categories per user.
    pairs = np.unique(u.astype(np.int64) * n_active_items + it)
    distinct_items = np.bincount(pairs // max(n_active_items, 1), minlength=n_users)
    variety = {"distinct_items_per_user_median": _q(distinct_items, 0.5)}
    if "categories" in items.column_names:
        cats = dict(zip(items["item_id"].to_pylist(), items["categories"].to_pylist()))
        first_cat = {k: (v[0] if v else None) for k, v in cats.items()}
        pu = pairs // max(n_active_items, 1)
        pc_ = np.array([first_cat.get(cat_items[p % n_active_items]) or "" for p in pairs])
        per_user: dict[int, set[str]] = {}
        for a, b in zip(pu, pc_):
            if b:
                per_user.setdefault(int(a), set()).add(b)
        ncat = np.array([len(s) for s in per_user.values()])
        variety["distinct_categories_per_user_median"] = _q(ncat, 0.5)
        variety["categories_in_catalog"] = len({c for v in cats.values() if v for c in v})
    return {
        "repeat": _repeat_profile(events, items, consumed, u, n_users, cfg),
        "context": _context_profile(events),
        "events": int(events.num_rows),
        "users": n_users,
        "items_in_catalog": int(n_catalog),
        "items_with_events": int(n_active_items),
        "days": round(span_days, 1),
        "density": round(len(pairs) / max(n_users * max(n_catalog, 1), 1), 5),
        "event_types": {
            k: int(v)
            for k, v in zip(*np.unique(events["event_type"].to_numpy(zero_copy_only=False), return_counts=True))
        },
        "purchase_frequency": {
            "purchases_per_user_median": _q(buys, 0.5),
            "purchases_per_user_p90": _q(buys, 0.9),
            "purchases_per_user_per_30_days_mean": round(float(buys.mean() / span_days * 30), 3) if n_users else None,
            "visits_per_user_median": _q(visits_per_user, 0.5),
            "days_between_visits_median": _q(gaps, 0.5),
            "share_of_users_with_one_visit": round(float((visits_per_user == 1).mean()), 3) if n_users else None,
        },
        "items_per_visit": {
            "mean": round(float(items_per_visit.mean()), 2) if len(vk) else None,
            "median": _q(items_per_visit, 0.5),
            "p90": _q(items_per_visit, 0.9),
        },
        "assortment_variety": variety,
        "long_tail": {
            "share_of_events_on_top_1pct_items": top_share(0.01),
            "share_of_events_on_top_10pct_items": top_share(0.10),
            "share_of_events_on_top_20pct_items": top_share(0.20),
            "share_of_catalog_with_fewer_than_5_events": round(float((counts < 5).mean()), 3) if len(counts) else None,
            "gini": round(gini, 3) if gini is not None else None,
        },
    }


def _context_profile(events: pa.Table) -> dict:
    """Per context column (channel, device, region): the share of events with a value and how many values."""
    out = {}
    for name in ("channel", "device", "region"):
        if name not in events.column_names:
            continue
        column = events[name]
        n_known = len(column) - column.null_count
        distinct = 0
        if n_known:
            if pa.types.is_dictionary(column.type):  # count the codes in use, without decoding every event
                codes = column.unify_dictionaries().combine_chunks().indices
                distinct = len(pc.unique(pc.drop_null(codes)))
            else:
                distinct = int(pc.count_distinct(column).as_py())
        out[name] = {"share_of_events_with_value": round(n_known / max(len(column), 1), 3), "distinct_values": distinct}
    return out


def _repeat_profile(
    events: pa.Table, items: pa.Table, consumed: np.ndarray, u: np.ndarray, n_users: int, cfg: BuildConfig
) -> dict:
    """The shop's re-purchase figures (``index_builder.repeat``): repeat share, intervals, categories."""
    rows = pc.index_in(events["item_id"], value_set=items["item_id"].combine_chunks())
    known = pc.is_valid(rows).to_numpy(zero_copy_only=False)
    i = pc.fill_null(rows, 0).to_numpy(zero_copy_only=False).astype(np.int64)
    cat_indptr, cat_ids, cat_names = item_categories(items)
    ts = events["timestamp"].to_numpy().astype(np.int64)
    tables = repeat_tables(
        u, i, ts, basket_keys(events), consumed & known, n_users, items.num_rows, cat_indptr, cat_ids, cat_names, cfg
    )
    return tables.profile
