"""What each customer buys again, and when: a bundle's re-purchase tables and the shop's repeat profile.

A purchase (an event of ``consumed_event_types``) belongs to a basket: its ``order_id``
when the log has one, else the customer's (UTC) day. Per item the builder measures how
many of its buyers bought it in more than one basket (the repeat rate) and the typical
interval between those baskets, both shrunk towards the item's categories, and those
towards the shop, when the item has few buyers. Per customer × item it keeps the baskets
with the item, the last purchase, the customer's own interval and whether it was in
their last basket. ``repeat_policy`` then decides per item whether a purchase ends the
need (the item is excluded from that customer's later rankings, as a film once rated)
or the item is offered again, scored on how due it is (a staple).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from index_builder.config import BuildConfig

DAY = 86_400
POLICIES = ("learned", "never", "always")
PROFILE_CATEGORIES = 5  # most and least replenished categories the profile lists


def basket_keys(events: pa.Table) -> np.ndarray:
    """Each event's basket within its customer: the order's code when the event has an
    ``order_id``, else ``-(day + 1)`` for its UTC day (int64; comparable only within a customer)."""
    day = events["timestamp"].to_numpy() // DAY
    if "order_id" not in events.column_names or events["order_id"].null_count == events.num_rows:
        return -(day.astype(np.int64) + 1)
    column = events["order_id"]
    if isinstance(column, pa.ChunkedArray):
        column = column.unify_dictionaries().combine_chunks() if column.num_chunks else pa.array([], pa.string())
    if not pa.types.is_dictionary(column.type):
        column = pc.dictionary_encode(column.cast(pa.string()))
    codes = pc.fill_null(column.indices, -1).to_numpy(zero_copy_only=False).astype(np.int64)
    return np.where(codes >= 0, codes, -(day.astype(np.int64) + 1))


def rebought_pairs(events: pa.Table, cfg: BuildConfig) -> int:
    """How many (customer, item) pairs were bought in two baskets or more: 0 where a purchase
    always ends the need (a film rated once), and then the builder runs as it always has."""
    bought = np.isin(events["event_type"].to_numpy(zero_copy_only=False), list(cfg.consumed_event_types))
    if cfg.repeat_policy == "never" or not bought.any():
        return 0
    sub = events.filter(pa.array(bought))
    codes = [
        pc.dictionary_encode(sub[c]).combine_chunks().indices.to_numpy(zero_copy_only=False)
        for c in ("user_id", "item_id")
    ]
    triples = np.unique(np.stack([codes[0].astype(np.int64), codes[1].astype(np.int64), basket_keys(sub)]), axis=1)
    _, counts = np.unique(triples[:2], axis=1, return_counts=True)
    return int((counts >= 2).sum())


@dataclass
class RepeatTables:
    """The bundle arrays (``ranking.bundle.schema``, "Re-purchase tables") and the profile for the manifest."""

    arrays: dict[str, np.ndarray]
    profile: dict

    @property
    def reoffer(self) -> np.ndarray:
        return self.arrays["item_reoffer"]


def _group_starts(*keys: np.ndarray) -> np.ndarray:
    """Where a run of equal keys (already sorted) starts, as a boolean mask."""
    n = len(keys[0])
    new = np.zeros(n, bool)
    if n:
        new[0] = True
        for k in keys:
            new[1:] |= k[1:] != k[:-1]
    return new


def _per_category(values: np.ndarray, cat_indptr: np.ndarray, cat_ids: np.ndarray, n_categories: int) -> np.ndarray:
    """Sum of a per-item value over each category's items (an item counts in each of its categories)."""
    lengths = np.diff(cat_indptr)
    return np.bincount(cat_ids, weights=np.repeat(values, lengths), minlength=n_categories)


def _item_prior(per_cat: np.ndarray, shop: float, cat_indptr: np.ndarray, cat_ids: np.ndarray) -> np.ndarray:
    """Each item's prior: the mean of its categories' values, the shop's for an item without one."""
    lengths = np.diff(cat_indptr)
    sums = np.add.reduceat(per_cat[cat_ids], cat_indptr[:-1]) if len(cat_ids) else np.zeros(len(lengths))
    sums = np.where(lengths > 0, sums, 0.0)  # reduceat repeats a neighbour's value on an empty row
    return np.where(lengths > 0, sums / np.maximum(lengths, 1), shop)


def repeat_tables(
    u: np.ndarray,
    i: np.ndarray,
    ts: np.ndarray,
    basket: np.ndarray,
    consumed: np.ndarray,
    n_users: int,
    n_items: int,
    cat_indptr: np.ndarray,
    cat_ids: np.ndarray,
    cat_names: np.ndarray,
    cfg: BuildConfig,
) -> RepeatTables:
    """The re-purchase tables of one fit.

    Parameters
    ----------
    u, i, ts, basket : np.ndarray
        Per event: user row, item row, unix seconds, basket key (:func:`basket_keys`).
    consumed : np.ndarray of bool
        The purchases (events of ``consumed_event_types``).
    cat_indptr, cat_ids, cat_names : np.ndarray
        Each item's categories (CSR) and the category names.
    cfg : BuildConfig
        ``repeat_policy``, ``repeat_categories``, ``repeat_min_rate`` and ``repeat_shrink``.

    Returns
    -------
    RepeatTables
    """
    cu, ci = u[consumed].astype(np.int64), i[consumed].astype(np.int64)
    ct, cb = ts[consumed].astype(np.int64), basket[consumed].astype(np.int64)
    # Baskets: one per (user, basket key), starting at its first purchase.
    order = np.lexsort((ct, cb, cu))
    cu, ci, ct, cb = cu[order], ci[order], ct[order], cb[order]
    new_basket = _group_starts(cu, cb)
    bid = np.cumsum(new_basket) - 1
    b_user, b_start = cu[new_basket], ct[new_basket]
    user_baskets = np.bincount(b_user, minlength=n_users).astype(np.int32)
    last_start = np.full(n_users, np.iinfo(np.int64).min, np.int64)
    np.maximum.at(last_start, b_user, b_start)
    last_bid = np.full(n_users, -1, np.int64)
    at_last = b_start == last_start[b_user]
    np.maximum.at(last_bid, b_user[at_last], np.flatnonzero(at_last))

    # Lines: one per (user, item, basket), in basket time order within (user, item).
    o = np.lexsort((ct, bid, b_start[bid], ci, cu))
    lu, li, lb, lt = cu[o], ci[o], bid[o], ct[o]
    line = _group_starts(lu, li, lb)
    line_last_t = np.maximum.reduceat(lt, np.flatnonzero(line)) if line.any() else np.zeros(0, np.int64)
    lu, li, lb = lu[line], li[line], lb[line]
    pair = _group_starts(lu, li)
    starts = np.flatnonzero(pair)
    pu, pi = lu[pair], li[pair]
    count = np.diff(np.r_[starts, len(lu)]).astype(np.int64)
    first_start = b_start[lb[starts]]
    # No purchase line (a shop of views only, or a fitted part before its first purchase): no pair.
    ends = np.r_[starts[1:], len(lu)] - 1 if len(starts) else np.zeros(0, np.int64)
    last_basket_start = b_start[lb[ends]]
    last_t = np.maximum.reduceat(line_last_t, starts) if len(starts) else np.zeros(0, np.int64)
    in_last = (
        np.maximum.reduceat((lb == last_bid[lu]).astype(np.uint8), starts) if len(starts) else np.zeros(0, np.uint8)
    )
    with np.errstate(invalid="ignore", divide="ignore"):
        interval = np.where(count >= 2, (last_basket_start - first_start) / DAY / np.maximum(count - 1, 1), np.nan)

    # Items: buyers, repeat buyers, and the log intervals of the repeat buyers, shrunk.
    m = float(cfg.repeat_shrink)
    n_cat = len(cat_names)
    buyers = np.bincount(pi, minlength=n_items).astype(np.float64)
    rep = count >= 2
    repeaters = np.bincount(pi[rep], minlength=n_items).astype(np.float64)
    # An interval under a day (two orders on one day) counts as a day: the log stays finite.
    log_int = np.log(np.maximum(interval[rep], 1.0))
    log_sum = np.bincount(pi[rep], weights=log_int, minlength=n_items)
    n_total, r_total = buyers.sum(), repeaters.sum()
    shop_rate = r_total / n_total if n_total else 0.0
    shop_log = log_sum.sum() / r_total if r_total else np.nan
    cat_buyers = _per_category(buyers, cat_indptr, cat_ids, n_cat)
    cat_repeaters = _per_category(repeaters, cat_indptr, cat_ids, n_cat)
    cat_log_sum = _per_category(log_sum, cat_indptr, cat_ids, n_cat)
    with np.errstate(invalid="ignore", divide="ignore"):  # no buyers and no prior: the prior's value
        cat_rate = np.where(cat_buyers + m > 0, (cat_repeaters + m * shop_rate) / (cat_buyers + m), shop_rate)
    with np.errstate(invalid="ignore", divide="ignore"):
        cat_log = np.where(
            cat_repeaters > 0, (cat_log_sum + m * np.nan_to_num(shop_log)) / (cat_repeaters + m), shop_log
        )
        if np.isnan(shop_log):
            cat_log[:] = np.nan
        prior_rate = _item_prior(cat_rate, shop_rate, cat_indptr, cat_ids)
        item_rate = np.where(buyers + m > 0, (repeaters + m * prior_rate) / (buyers + m), prior_rate)
        prior_log = _item_prior(cat_log, shop_log, cat_indptr, cat_ids)
        item_log = np.where(repeaters > 0, (log_sum + m * np.nan_to_num(prior_log)) / (repeaters + m), prior_log)
        if np.isnan(shop_log):
            item_log[:] = np.nan
    item_interval = np.exp(item_log)

    reoffer = _policy(item_rate, cat_indptr, cat_ids, cat_names, cfg)
    lines_per_user = np.bincount(lu, minlength=n_users)
    pairs_per_user = np.bincount(pu, minlength=n_users)
    with np.errstate(invalid="ignore", divide="ignore"):
        user_repeat_share = np.where(
            lines_per_user > 0, (lines_per_user - pairs_per_user) / np.maximum(lines_per_user, 1), np.nan
        )
    arrays = {
        "item_repeat_rate": item_rate.astype(np.float32),
        "item_repeat_interval": item_interval.astype(np.float32),
        "item_reoffer": reoffer.astype(np.uint8),
        "user_baskets": user_baskets,
        "user_repeat_share": user_repeat_share.astype(np.float32),
        "user_buy_indptr": np.searchsorted(pu, np.arange(n_users + 1)).astype(np.int64),
        "user_buy_items": pi.astype(np.int32),
        "user_buy_baskets": count.astype(np.float32),
        "user_buy_last": last_t.astype(np.int64),
        "user_buy_interval": interval.astype(np.float32),
        "user_buy_in_last": in_last.astype(np.uint8),
    }
    n_lines = len(lu)
    shown = np.flatnonzero(cat_buyers >= max(m, 1.0))
    ranked = shown[np.lexsort((cat_names[shown], -cat_rate[shown]))]

    def _cats(rows: np.ndarray) -> list[dict]:
        return [
            {
                "category": str(cat_names[c]),
                "repeat_rate": round(float(cat_rate[c]), 4),
                "interval_days": None if np.isnan(cat_log[c]) else round(float(np.exp(cat_log[c])), 1),
                "buyers": int(cat_buyers[c]),
            }
            for c in rows
        ]

    profile = {
        "policy": cfg.repeat_policy,
        "baskets": len(b_user),
        "basket_from": "order_id" if (basket[consumed] >= 0).any() else "day",
        "purchase_lines": int(n_lines),
        # Share of purchase lines (customer, item, basket) whose item the customer had bought before.
        "repeat_share": round(float((n_lines - len(pu)) / n_lines), 4) if n_lines else 0.0,
        "buyers_who_rebuy": round(float(shop_rate), 4),
        "typical_interval_days": None if np.isnan(shop_log) else round(float(np.exp(shop_log)), 1),
        "items_reoffered": int(reoffer.sum()),
        "items_bought": int((buyers > 0).sum()),
        "most_replenished_categories": _cats(ranked[:PROFILE_CATEGORIES]),
        "least_replenished_categories": _cats(ranked[::-1][:PROFILE_CATEGORIES]),
    }
    return RepeatTables(arrays, profile)


def check_repeat_categories(cfg: BuildConfig, cat_names) -> dict[str, int]:
    """The catalogue's categories by name, once ``repeat_categories`` is known to name only them.

    Raises
    ------
    ValueError
        ``repeat_categories`` names a category the catalogue does not have.
    """
    index = {str(name): c for c, name in enumerate(cat_names)}
    unknown = sorted(n for n in cfg.repeat_categories if n not in index)
    if unknown:
        raise ValueError(
            f"repeat_categories names categories the catalogue does not have: {unknown[:10]}; "
            f"known: {sorted(index)[:20]}"
        )
    return index


def _policy(
    item_rate: np.ndarray, cat_indptr: np.ndarray, cat_ids: np.ndarray, cat_names: np.ndarray, cfg: BuildConfig
) -> np.ndarray:
    """Which items a purchase leaves on offer: learned from the repeat rate, or fixed, then per-category overrides.

    An item in several overridden categories follows ``never`` if any says so.
    """
    if cfg.repeat_policy == "learned":
        reoffer = item_rate >= cfg.repeat_min_rate
    else:
        reoffer = np.full(len(item_rate), cfg.repeat_policy == "always")
    if cfg.repeat_categories:
        index = check_repeat_categories(cfg, cat_names)
        owner = np.repeat(np.arange(len(item_rate)), np.diff(cat_indptr))
        for setting in ("always", "never"):  # never last: it wins
            cats = [index[n] for n, v in cfg.repeat_categories.items() if v == setting]
            if cats:
                reoffer[np.unique(owner[np.isin(cat_ids, cats)])] = setting == "always"
    return reoffer
