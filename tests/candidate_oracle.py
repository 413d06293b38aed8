"""The NumPy candidate merging and exclusions the pipeline ran before the compiled call: its test oracle.

Kept as ``ranking.pipeline.ranker`` wrote them (``_retrieve``, ``_more_candidates``, ``_mask``
and the real-time exclusions of the overlay), with one change: the EASE source is ordered
best first (ties by item row) where ``np.argpartition`` left its order unspecified, so the
compiled call's order can be compared exactly.
"""

from __future__ import annotations

import numpy as np
from feature_oracle import oracle_tables

from ranking import Ranker, RankQuery
from ranking.pipeline.categories import in_categories
from ranking.pipeline.features import Purchases
from ranking.pipeline.ranker import Rung


def candidates(
    ranker: Ranker,
    q: RankQuery,
    rung: Rung,
    urow: int,
    personal: int,
    seg: int,
    session: np.ndarray,
    purchases: Purchases | None,
    exclude_rows: np.ndarray,
    n_candidates: int,
    pool: np.ndarray | None,
) -> tuple[np.ndarray, np.ndarray]:
    """(rows, mask) of one request; ``pool`` is the embedding search's answer (None: no search)."""
    m, cfg, scratch = ranker.model, ranker.config, ranker.scratch
    # _retrieve
    if q.candidate_item_ids:
        cands = scratch.unique_in_order(m.items.lookup(q.candidate_item_ids))
    else:
        pools = [] if pool is None else [pool]
        if seg >= 0:
            pools.append(m.segment_popular.row(seg)[:n_candidates])
        n_pop = min(cfg.popular_candidates, n_candidates) if pools else n_candidates
        pools.append(m.popular_items[:n_pop])
        cands = scratch.unique_in_order(np.concatenate(pools))
    # _more_candidates
    if ranker.tables is not None and not q.candidate_item_ids:
        t = oracle_tables(ranker.tables)
        scale = n_candidates / max(cfg.n_candidates, 1)
        sources = np.concatenate([t.user_recent_items(personal), session])
        covis, _ = t.covis_from(sources)
        n_covis = max(1, int(cfg.covis_candidates * scale))
        pools = [cands, covis[:n_covis], t.recent_popular_items[: max(1, int(cfg.popular_candidates * scale))]]
        ease = t.ease_all(t.history(personal, session)) if t.ease is not None else None
        if ease is not None:
            n = min(n_covis, len(ease))
            pools.append(np.lexsort((np.arange(len(ease)), -ease))[:n].astype(np.int32))
        if rung == Rung.ONE_TO_ONE and cfg.buy_again_candidates > 0:
            when = int(q.event_time) if q.event_time is not None else t.data_end + 1
            n_again = max(1, int(cfg.buy_again_candidates * scale))
            pools.insert(1, t.buy_again(personal, when, purchases, n_again))
        cands = scratch.unique_in_order(np.concatenate(pools))
    # _mask and the overlay's real-time exclusions
    mask = np.zeros(len(cands), dtype=bool)
    if urow >= 0:
        mask |= np.isin(cands, m.consumed.row(urow))
    if q.exclude_item_ids:
        mask |= np.isin(cands, m.items.lookup(q.exclude_item_ids))
    if rung == Rung.SESSION and len(session):
        mask |= np.isin(cands, session)
    if q.include_categories:
        ids = m.category_names.lookup(q.include_categories)
        mask |= ~in_categories(m, cands, ids[ids >= 0])
    if q.exclude_categories:
        ids = m.category_names.lookup(q.exclude_categories)
        mask |= in_categories(m, cands, ids[ids >= 0])
    if q.min_price > 0 or q.max_price > 0:
        price = m.item_price[cands]
        ok = np.isfinite(price)
        if q.min_price > 0:
            ok &= price >= q.min_price
        if q.max_price > 0:
            ok &= price <= q.max_price
        mask |= ~ok
    if len(exclude_rows):
        mask |= np.isin(cands, exclude_rows)
    return cands, mask
