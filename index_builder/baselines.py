"""The lower rungs of the personalization ladder as plain scorers, for the ladder report.

Each baseline scores every item for a batch of users from the training part
only: POPULAR (all time and recent), SEGMENT, item-to-item, BUY_AGAIN (the
customer's own most bought items), ALS alone and EASE. Segment lists,
item-to-item neighbours and ALS factors are read from the bundle built on the
same training part, so a baseline and the full pipeline
see the same learned tables.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

EASE_MAX_ITEMS = 20_000
DAY = 86_400


def distinct_counts(pos: sp.csr_matrix) -> np.ndarray:
    """Distinct users per item of a binary users × items matrix."""
    return np.asarray((pos > 0).sum(axis=0)).ravel().astype(np.float64)


def popular_scores(pos: sp.csr_matrix) -> np.ndarray:
    """All-time popularity (distinct users), one row shared by every user."""
    return distinct_counts(pos)


def recent_popular_scores(
    u: np.ndarray, i: np.ndarray, ts: np.ndarray, n_users: int, n_items: int, days: float
) -> np.ndarray:
    """Distinct users per item in the last ``days`` of the training part; all-time counts break ties."""
    recent = ts >= ts.max() - days * DAY
    m = sp.csr_matrix((np.ones(int(recent.sum())), (u[recent], i[recent])), shape=(n_users, n_items))
    allm = sp.csr_matrix((np.ones(len(u)), (u, i)), shape=(n_users, n_items))
    return distinct_counts(m) + 1e-6 * distinct_counts(allm)


def segment_scores(model, urows: np.ndarray, fallback: np.ndarray) -> np.ndarray:
    """Per user, the popularity of items in their segment (the bundle's lists); popular where none."""
    out = np.tile(fallback / max(fallback.max(), 1.0) * 1e-3, (len(urows), 1))
    for j, r in enumerate(urows):
        seg = int(model.user_segment[r]) if r >= 0 else -1
        if seg >= 0:
            items = model.segment_popular.row(seg)
            out[j, items] += np.asarray(model.segment_popular.row_values(seg), np.float64) + 1.0
    return out


def item_to_item_scores(model, history: sp.csr_matrix) -> np.ndarray:
    """Sum of item-to-item similarities (the bundle's neighbour lists) to each user's items."""
    n = model.n_items
    ip = np.asarray(model.bundle.array("covis_indptr"))
    S = sp.csr_matrix(
        (np.asarray(model.bundle.array("covis_scores"), np.float64), np.asarray(model.bundle.array("covis_items")), ip),
        shape=(n, n),
    )
    return np.asarray((history @ S).todense())


def als_scores(model, urows: np.ndarray) -> np.ndarray:
    """User factors · item factors of the bundle's ALS."""
    return np.asarray(model.user_factors[urows], np.float64) @ np.asarray(model.item_factors, np.float64).T


def ease_weights(pos: sp.csr_matrix, lam: float) -> np.ndarray | None:
    """EASE (Steck 2019) item-item weights, or None when the catalog exceeds ``EASE_MAX_ITEMS``."""
    n = pos.shape[1]
    if n > EASE_MAX_ITEMS:
        return None
    X = (pos > 0).astype(np.float64)
    G = np.asarray((X.T @ X).todense())
    G[np.diag_indices(n)] += lam
    P = np.linalg.inv(G)
    B = -P / np.diag(P)[None, :]
    B[np.diag_indices(n)] = 0.0
    return B


def buy_again_scores(model, urows: np.ndarray, fallback: np.ndarray) -> np.ndarray:
    """Per user, their most frequently bought items (baskets with the item; ties by the latest
    purchase) among those the bundle's policy offers again, then the ``fallback`` popular items."""
    n_items = len(fallback)
    out = np.tile(fallback / max(float(fallback.max()), 1.0) * 1e-3, (len(urows), 1))
    b = model.bundle
    indptr, items = b.array("user_buy_indptr"), b.array("user_buy_items")
    baskets, last = b.array("user_buy_baskets"), b.array("user_buy_last")
    reoffer = np.asarray(model.item_reoffer) > 0
    for j, r in enumerate(urows):
        if r < 0:
            continue
        lo, hi = int(indptr[r]), int(indptr[r + 1])
        own = np.asarray(items[lo:hi])
        keep = reoffer[own] if n_items else np.zeros(0, bool)
        # 1 + baskets puts every bought item above the fill; last / 1e10 (< 0.2) only breaks ties.
        out[j, own[keep]] = 1.0 + baskets[lo:hi][keep] + last[lo:hi][keep] / 1e10
    return out
