"""User state: fold-in against a NumPy reference and implicit, the builder's weighting, TTL and LRU."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import scipy.sparse as sp

from index_builder.config import BuildConfig
from index_builder.train import event_weights
from ranking import Event, RankingModel, build_overlay
from ranking.realtime.user_state import DAY, UserStateStore, Weighting, fold_in


def reference_fold_in(y, rows, conf, reg, prior=None):
    """Hu-Koren-Volinsky normal equations built densely: C = diag over all items."""
    n, k = y.shape
    c_full = np.ones(n)
    p_full = np.zeros(n)
    for r, c in zip(rows, conf):
        c_full[r] = abs(c)
        p_full[r] = 1.0 if c > 0 else 0.0
    a = y.T @ (c_full[:, None] * y) + reg * np.eye(k)
    b = y.T @ (c_full * p_full)
    if prior is not None:
        b = b + (y.T @ y + reg * np.eye(k)) @ prior
    return np.linalg.solve(a, b)


@pytest.mark.parametrize("seed", range(5))
def test_fold_in_matches_the_dense_reference(seed):
    rng = np.random.default_rng(seed)
    y = rng.normal(size=(60, 8)).astype(np.float32)
    rows = rng.choice(60, size=rng.integers(1, 15), replace=False)
    conf = rng.uniform(0.5, 20, size=len(rows)) * rng.choice([1, 1, 1, -1], size=len(rows))
    prior = rng.normal(size=8) if seed % 2 else None
    yty = y.astype(np.float64).T @ y.astype(np.float64)
    got = fold_in(y, yty, rows, conf, 0.1, prior)
    want = reference_fold_in(y.astype(np.float64), rows, conf, 0.1, prior)
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5)


def test_fold_in_without_prior_is_what_implicit_recalculates():
    from implicit.cpu.als import AlternatingLeastSquares
    from threadpoolctl import threadpool_limits

    rng = np.random.default_rng(3)
    m = sp.random(80, 50, density=0.1, random_state=4, format="csr", dtype=np.float32)
    m.data = rng.uniform(1, 5, size=m.nnz).astype(np.float32)
    with threadpool_limits(1, "blas"):
        model = AlternatingLeastSquares(factors=6, regularization=0.05, alpha=2.0, iterations=5, random_state=1)
        model.fit(m, show_progress=False)
    y = np.asarray(model.item_factors)
    rows = np.array([3, 17, 21, 40])
    weights = np.array([1.0, 2.0, 4.0, 8.0], dtype=np.float32)
    user_items = sp.csr_matrix((weights, (np.zeros(4, int), rows)), shape=(1, 50))
    want = model.recalculate_user(0, user_items)
    got = fold_in(y, y.astype(np.float64).T @ y, rows, 2.0 * weights, 0.05)
    np.testing.assert_allclose(got, np.asarray(want).ravel(), rtol=1e-3, atol=1e-4)


def test_event_weights_are_the_builders():
    cfg = BuildConfig()
    w = Weighting.from_manifest({"config": cfg.to_dict()})
    t_end = 1_700_000_000
    evs = [
        Event("u", "i", t, t_end - age * DAY, value)
        for t, age, value in [
            ("view", 0, 0),
            ("click", 10, 0),
            ("purchase", 200, 30.0),
            ("rating", 3, 4.0),
            ("rating", 0, 0.0),
            ("skip", 1, 0),
            ("something_else", 0, 0),
        ]
    ]
    table = pa.table(
        {
            "event_type": [e.event_type for e in evs],
            "timestamp": pa.array([int(e.timestamp) for e in evs], pa.int64()),
            "value": pa.array([e.value if e.event_type == "rating" and e.value else None for e in evs], pa.float64()),
        }
    )
    want = event_weights(table, cfg, t_end)
    got = [w.weight(e, t_end) for e in evs]
    np.testing.assert_allclose(got, want, rtol=1e-6)
    many = w.weights(
        np.array([e.event_type for e in evs]),
        np.array([e.value for e in evs]),
        np.array([e.timestamp for e in evs]),
        t_end,
    )
    np.testing.assert_allclose(many, want, rtol=1e-6)


def test_store_evicts_least_recent_users_but_never_a_purchase():
    store = UserStateStore(max_users=3, max_events_per_user=4, durable_types=("purchase",))
    now = 10_000.0
    store.add([Event(u, f"i{k}", "click", now - 50 + k) for u in "abc" for k in range(6)])
    store.add([Event("c", "bought", "purchase", now - 10)])
    assert [e.item_id for e in store.events("a")] == ["i2", "i3", "i4", "i5"]  # newest 4 of the clicks
    store.events("b")  # reads count as use: the order is now c, a, b, so c goes first
    store.add([Event("d", "i1", "view", now)])
    assert store.evicted_users == 1
    # c's clicks were evicted, its purchase was not; a and b are untouched.
    assert [e.item_id for e in store.events("c")] == ["bought"]
    assert len(store.events("a")) == 4 and len(store.events("b")) == 4
    assert len(store) == 4  # c is still held, by its purchase alone
    # Many more purchases than the per-customer cap: every one is kept.
    store.add([Event("c", f"p{k}", "purchase", now + k) for k in range(10)])
    assert len(store.events("c")) == 11 and store.n_purchases == 11


def test_store_keeps_events_until_a_bundle_holds_them_however_old():
    """No wall-clock expiry: a purchase a year old by the clock stays until a bundle's window covers it."""
    store = UserStateStore(max_users=10, max_events_per_user=10, durable_types=("purchase",))
    year_ago = 1_000_000.0
    store.add([Event("a", "tv", "purchase", year_ago), Event("a", "i1", "click", year_ago + 5)])
    assert [e.item_id for e in store.events("a")] == ["tv", "i1"]
    assert store.prune(year_ago - 1) == 0  # a bundle ending before them holds neither
    assert [e.item_id for e in store.events("a")] == ["tv", "i1"]
    assert store.prune(year_ago) == 1  # its window covers the purchase, not the click
    assert [e.item_id for e in store.events("a")] == ["i1"]
    store.add([Event("a", "old", "purchase", year_ago - 100)])  # inside the served window: not held
    assert [e.item_id for e in store.events("a")] == ["i1"]
    assert store.prune(year_ago + 5) == 1 and store.events("a") == [] and len(store) == 0
    assert store.prune(0.0) == 0 and store.horizon == year_ago + 5  # the horizon never moves back


def test_overlay_excludes_purchases_and_skips_what_the_bundle_already_has(bundle_path):
    model = RankingModel(bundle_path)
    end = model.manifest["data_window"]["end_unix"]
    now = end + 1000.0
    evs = [
        Event("u3", "i1", "purchase", now - 10, 9.0),
        Event("u3", "i2", "purchase", end - 10, 9.0),
        Event("u3", "no-such-item", "purchase", now - 5),
        Event("u3", "i3", "click", now - 1),
    ]
    ov = build_overlay(model, "u3", evs, now)
    assert model.items.id_of(ov.exclude_rows) == ["i1"]
    assert ov.user_vector is not None and ov.n_realtime_events == 2
    prior = np.asarray(model.user_factors[model.users.row("u3")])
    assert not np.allclose(ov.user_vector, prior)


def test_the_bundle_carries_the_gram_matrix_so_fold_in_is_ready_at_once(bundle_path):
    import ranking.pipeline.overlay as overlay

    model = RankingModel(bundle_path)  # a fresh model object: nothing cached for it yet
    cache = overlay.model_cache(model)
    assert cache.ready.is_set()
    y = np.asarray(model.item_factors, dtype=np.float64)
    np.testing.assert_allclose(cache.yty, y.T @ y, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(cache.inv_norms, 1.0 / np.linalg.norm(y, axis=1), rtol=1e-5)


def test_without_a_stored_gram_a_large_catalog_gets_it_in_the_background(bundle_path, monkeypatch):
    import ranking.pipeline.overlay as overlay

    monkeypatch.setattr(overlay, "SYNC_GRAM_LIMIT", 0)
    model = RankingModel(bundle_path)  # a fresh model object: nothing cached for it yet
    # As a bundle from before the builder stored the Gram matrix.
    has_array = model.bundle.has_array
    monkeypatch.setattr(model.bundle, "has_array", lambda name: name != "item_gram" and has_array(name))
    end = model.manifest["data_window"]["end_unix"]
    evs = [Event("u3", "i1", "purchase", end + 10, 9.0), Event("u3", "i3", "click", end + 20)]
    first = build_overlay(model, "u3", evs, end + 30)
    assert model.items.id_of(first.exclude_rows) == ["i1"]  # purchases never wait for the Gram matrix
    assert overlay.model_cache(model).ready.wait(timeout=60)
    later = build_overlay(model, "u3", evs, end + 30)
    y = np.asarray(model.item_factors, dtype=np.float64)
    np.testing.assert_allclose(overlay.model_cache(model).yty, y.T @ y, rtol=1e-5, atol=1e-5)
    assert later.user_vector is not None
