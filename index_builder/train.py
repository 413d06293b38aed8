"""Interaction weighting with time decay, and ALS user/item factors trained with ``implicit``."""

from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import scipy.sparse as sp

from index_builder.config import BuildConfig

log = logging.getLogger(__name__)
DAY = 86_400.0


def event_weights(events: pa.Table, cfg: BuildConfig, t_end: int) -> np.ndarray:
    """Each event's weight: its type's weight (times value/scale for ratings), decayed by age.

    Parameters
    ----------
    events : pyarrow.Table
        Columns ``event_type``, ``timestamp`` (unix seconds) and ``value``.
    cfg : BuildConfig
    t_end : int
        The end of the data window; an event this old weighs fully.

    Returns
    -------
    np.ndarray
        float32 weights, one per event.
    """
    types = pc.unique(events["event_type"])
    per_type = np.array(
        [cfg.event_weights.get(t, cfg.default_event_weight) for t in types.to_pylist()], dtype=np.float64
    )
    type_idx = pc.index_in(events["event_type"], value_set=types).to_numpy()
    w = per_type[type_idx]
    if cfg.value_event_types:
        is_value = pc.is_in(events["event_type"], value_set=pa.array(cfg.value_event_types)).to_numpy(
            zero_copy_only=False
        )
        values = events["value"].to_numpy(zero_copy_only=False).astype(np.float64)
        # A rating without a value counts as a middling one rather than vanishing.
        values = np.where(np.isnan(values), cfg.value_scale / 2, values)
        w = np.where(is_value, w * values / cfg.value_scale, w)
    age_days = (t_end - events["timestamp"].to_numpy().astype(np.float64)) / DAY
    decay = np.power(0.5, np.maximum(age_days, 0.0) / cfg.half_life_days)
    return (w * decay).astype(np.float32)


def confidence_matrix(
    user_rows: np.ndarray, item_rows: np.ndarray, weights: np.ndarray, n_users: int, n_items: int
) -> sp.csr_matrix:
    """Sum the weights of every (user, item) pair into a users × items CSR matrix."""
    m = sp.coo_matrix((weights, (user_rows, item_rows)), shape=(n_users, n_items), dtype=np.float32).tocsr()
    m.sum_duplicates()
    m.eliminate_zeros()
    return m


def train_als(confidence: sp.csr_matrix, cfg: BuildConfig, show_progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Fit implicit-feedback ALS.

    Returns
    -------
    (user_factors, item_factors) : (np.ndarray, np.ndarray)
        float32 arrays of shape (n_users, factors) and (n_items, factors). Users and
        items without interactions get zero vectors, so they are never retrieved by
        their embedding.
    """
    from implicit.cpu.als import AlternatingLeastSquares
    from threadpoolctl import threadpool_limits

    # implicit parallelises over users itself; a BLAS pool underneath only fights it.
    blas = threadpool_limits(1, "blas")
    model = AlternatingLeastSquares(
        factors=cfg.factors,
        regularization=cfg.regularization,
        alpha=cfg.alpha,
        iterations=cfg.iterations,
        random_state=cfg.random_seed,
        calculate_training_loss=False,
    )
    try:
        model.fit(confidence, show_progress=show_progress)
    finally:
        blas.restore_original_limits()
    users = np.ascontiguousarray(model.user_factors, dtype=np.float32)
    items = np.ascontiguousarray(model.item_factors, dtype=np.float32)
    users[np.diff(confidence.indptr) == 0] = 0.0
    items[np.bincount(confidence.indices, minlength=confidence.shape[1]) == 0] = 0.0
    return users, items
