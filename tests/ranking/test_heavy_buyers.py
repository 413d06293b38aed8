"""Customers with many purchases since the bundle: the overlay read through the held purchases'
digest is the one a pass over every event gives, and the feature kernel answers the same for
the purchases it keeps (the first and last of each item and day) as for all of them."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from tests_support import SMALL_BUILD

from index_builder.build import build
from index_builder.config import BuildConfig
from index_builder.synthetic import make_grocery, write_shop
from ranking import Event, Ranker, RankingModel, RankQuery, build_overlay, resolve_current
from ranking.pipeline import overlay as overlay_module
from ranking.pipeline.features import DAY, Purchases, Request
from ranking.pipeline.overlay import MAX_RECENT, RankOverlay, model_cache
from ranking.policy.experiments import FULL, Variant
from ranking.realtime.events import NEGATIVE_EVENT_TYPES
from ranking.realtime.user_state import HeldEvents, UserStateStore


def reference_overlay(model, user_id: str, events: list[Event], now: float, variant: Variant = FULL) -> RankOverlay:
    """The overlay as one pass over every event gives it, purchase by purchase (the reading
    before held purchases had a digest): the oracle of the tests below."""
    ov = RankOverlay(variant=variant)
    cache = model_cache(model)
    w = cache.weighting
    events = [e for e in events if e.timestamp > cache.bundle_end]
    if not events:
        return ov
    rows = model.items.lookup([e.item_id for e in events])
    known = np.flatnonzero(rows >= 0)
    if not len(known):
        return ov
    rows = rows[known].astype(np.int64)
    evs = [events[i] for i in known]
    types = [e.event_type for e in evs]
    is_buy = np.array([t in set(w.consumed_event_types) for t in types], dtype=bool)
    timestamps = np.array([e.timestamp for e in evs], dtype=np.float64)
    bought = rows[is_buy]
    ov.exclude_rows = np.unique(bought[model.item_reoffer[bought] == 0]).astype(np.int32)
    ov.purchases = Purchases(bought.astype(np.int32), timestamps[is_buy].astype(np.int64))
    yty = cache.yty if variant.use_context and cache.ready.is_set() else None
    if yty is None:
        return ov
    ov.n_realtime_events = len(evs)
    is_negative = np.array([t in NEGATIVE_EVENT_TYPES for t in types], dtype=bool)
    ov.negative_rows = np.unique(rows[is_negative]).astype(np.int32)
    positive = rows[~is_negative][np.argsort(timestamps[~is_negative], kind="stable")]
    last = {int(r): i for i, r in enumerate(positive)}
    ov.recent_rows = np.array(sorted(last, key=last.__getitem__)[-MAX_RECENT:], dtype=np.int32)
    weights = w.weights(types, np.array([e.value for e in evs], dtype=np.float64), timestamps, now)
    distinct = sorted(set(rows.tolist()))
    position = {r: i for i, r in enumerate(distinct)}
    uniq = np.array(distinct, dtype=np.int64)
    summed = np.bincount([position[r] for r in rows.tolist()], weights=weights, minlength=len(uniq))
    has_factor = np.any(np.asarray(model.item_factors[uniq], dtype=np.float32) != 0, axis=1)
    keep = (summed != 0) & has_factor
    if not keep.any():
        return ov
    from ranking.realtime.user_state import fold_in

    urow = model.users.row(user_id)
    prior = None
    if urow >= 0 and model.user_has_history[urow]:
        prior = np.asarray(model.user_factors[urow], dtype=np.float64)
    vec = fold_in(model.item_factors, yty, uniq[keep], w.alpha * summed[keep], w.regularization, prior)
    if np.all(np.isfinite(vec)) and np.any(vec != 0):
        ov.user_vector = vec
    return ov


def _same_overlay(got: RankOverlay, want: RankOverlay, what: str) -> None:
    for name in ("exclude_rows", "negative_rows", "recent_rows"):
        np.testing.assert_array_equal(getattr(got, name), getattr(want, name), err_msg=f"{name}: {what}")
        assert getattr(got, name).dtype == np.int32, f"{name}: {what}"
    assert got.n_realtime_events == want.n_realtime_events, what
    if want.user_vector is None:
        assert got.user_vector is None, what
    else:  # the same sums in the same order: the same vector, bit for bit
        assert got.user_vector is not None and np.array_equal(got.user_vector, want.user_vector), what
    assert (got.purchases is None) == (want.purchases is None), what


def _heavy_buyer(model: RankingModel, rng: np.random.Generator, user_id: str, n_buys: int) -> list[Event]:
    """A customer's events since the bundle, in arrival order: many purchases of a few items (a
    staple bought day after day, several in one basket at one time), some of items the bundle
    does not know, some already in its window, ratings and values, and views and skips."""
    end = float(model.manifest["data_window"]["end_unix"])
    ids = [str(i) for i in model.items.ids]
    items = list(rng.choice(ids, int(rng.integers(1, 40)), replace=False)) + ["no-such-item", "gone"]
    # Baskets: a few distinct times, so many purchases share one (and a day).
    times = end + rng.choice(rng.integers(-DAY, 6 * DAY, int(rng.integers(1, 30))), n_buys)
    times = times + rng.choice([0.0, 0.25, 0.75], n_buys)  # fractions of a second, as clocks give them
    evs = [
        Event(user_id, str(rng.choice(items)), str(rng.choice(["purchase", "purchase", "rating"])), float(t), v)
        for t, v in zip(times, rng.choice([0.0, 1.0, 4.0, 12.5], n_buys))
    ]
    for _ in range(int(rng.integers(0, 30))):
        kind = str(rng.choice(["view", "click", "add_to_cart", "skip", *NEGATIVE_EVENT_TYPES]))
        evs.append(Event(user_id, str(rng.choice(items)), kind, float(rng.choice(times)) + float(rng.integers(-2, 3))))
    order = rng.permutation(len(evs))
    return [evs[i] for i in order]


@pytest.fixture(scope="module")
def grocery_path(tmp_path_factory):
    """Staples bought again on cycles, offered again when due (the small shop offers nothing again)."""
    shop = make_grocery(n_users=200, n_items=150, n_categories=8, days=90, seed=4)
    files = write_shop(shop, tmp_path_factory.mktemp("grocery"), "parquet")
    out = tmp_path_factory.mktemp("grocery-art")
    cfg = BuildConfig.load(overrides={**SMALL_BUILD, "ladder_report": False, "repeat_policy": "learned"})
    build(files["events"], files["items"], files["users"], out, cfg, False)
    return resolve_current(out)


@pytest.fixture(scope="module", params=["bundle_path", "grocery_path"])
def model(request):
    m = RankingModel(request.getfixturevalue(request.param))
    assert model_cache(m).ready.wait(timeout=60)
    return m


@pytest.mark.slow
def test_the_held_purchases_overlay_is_the_one_every_event_gives(model):
    rng = np.random.default_rng(5)
    durable = tuple(model_cache(model).weighting.consumed_event_types)
    with_history = [str(model.users.ids[r]) for r in np.flatnonzero(np.asarray(model.user_has_history))]
    variants = [FULL, dataclasses.replace(FULL, use_context=False)]
    seen = set()
    for i in range(40):
        user_id = str(rng.choice(with_history)) if i % 4 else f"visitor-{i}"
        events = _heavy_buyer(model, rng, user_id, int(rng.choice([1, 50, 400, 2000])))
        store = UserStateStore(max_events_per_user=int(rng.choice([5, 50])), durable_types=durable)
        cut = int(rng.integers(0, len(events)))
        store.add(events[:cut])
        store.held(user_id)  # a digest of the first part is made and must not outlive it
        held_before = store.held(user_id)
        build_overlay(model, user_id, held_before, 0.0)
        store.add(events[cut:])
        held = store.held(user_id)
        assert isinstance(held, HeldEvents) and held.merged() == store.events(user_id)
        now = float(model.manifest["data_window"]["end_unix"]) + float(rng.integers(0, 30 * DAY))
        variant = variants[i % 2]
        want = reference_overlay(model, user_id, store.events(user_id), now, variant)
        for got in (
            build_overlay(model, user_id, held, now, variant),
            build_overlay(model, user_id, store.held(user_id), now, variant),  # the digest kept
            build_overlay(model, user_id, store.events(user_id), now, variant),  # a plain list
        ):
            _same_overlay(got, want, f"customer {i}")
            if want.purchases is not None:
                _same_purchases(model, got.purchases, want.purchases, rng)
        seen.add((want.user_vector is not None, len(want.recent_rows) == MAX_RECENT, len(want.exclude_rows) > 0))
    # The draws reached a re-solved vector, a full recent list and exclusions.
    assert {s[0] for s in seen} == {True, False} and True in {s[1] for s in seen} and True in {s[2] for s in seen}


def _same_purchases(model, got: Purchases, want: Purchases, rng: np.random.Generator) -> None:
    """The kernel's re-purchase features over every item are the same for both."""
    ranker = _ranker(model)
    cands = np.arange(model.n_items, dtype=np.int32)
    urow = int(rng.choice(np.flatnonzero(np.asarray(model.user_has_history))))
    t = float(model.manifest["data_window"]["end_unix"]) + 9 * DAY
    req = Request(4, urow, None, -1, np.zeros(0, np.int32), t, purchases=want)
    X_want = ranker.tables.assemble(req, cands)
    X_got = ranker.tables.assemble(dataclasses.replace(req, purchases=got), cands)
    np.testing.assert_array_equal(X_got, X_want)
    assert len(got) <= len(want)


_RANKERS: dict[int, Ranker] = {}


def _ranker(model) -> Ranker:
    return _RANKERS.setdefault(id(model), Ranker(model))


@pytest.mark.slow
def test_a_heavy_buyer_is_ranked_as_every_purchase_ranks_them(model):
    """The whole Rank (buy-again candidates, exclusions, features, scores) with the digest's
    overlay is the Rank with the overlay of every purchase."""
    rng = np.random.default_rng(8)
    ranker = _ranker(model)
    durable = tuple(model_cache(model).weighting.consumed_event_types)
    with_history = [str(model.users.ids[r]) for r in np.flatnonzero(np.asarray(model.user_has_history))]
    for i in range(12):
        user_id = str(rng.choice(with_history))
        store = UserStateStore(durable_types=durable)
        store.add(_heavy_buyer(model, rng, user_id, 3000))
        now = float(model.manifest["data_window"]["end_unix"]) + 7 * DAY
        got = ranker.rank(
            RankQuery(user_id=user_id, num_results=30), overlay=build_overlay(model, user_id, store.held(user_id), now)
        )
        want = ranker.rank(
            RankQuery(user_id=user_id, num_results=30),
            overlay=reference_overlay(model, user_id, store.events(user_id), now),
        )
        assert got.item_ids == want.item_ids and got.scores == want.scores, f"customer {i}"


def test_kept_purchases_are_one_of_each_item_and_day_and_each_item_s_first_and_last():
    rows = np.array([5, 5, 5, 5, 5, 5, 2, 2, 7, 7], np.int64)
    times = np.array(
        [4 * DAY + 7, 3 * DAY + 9, 3 * DAY + 1, 3 * DAY + 5, 4 * DAY, 4 * DAY + 3, 10, 10, -1, -DAY], np.int64
    )
    got_rows, got_times = overlay_module._compact_purchases(rows, times)
    assert got_rows.dtype == np.int32 and got_times.dtype == np.int64
    assert list(zip(got_rows.tolist(), got_times.tolist())) == [
        (2, 10),
        (2, 10),  # the first of its day and the item's last: two at one time stay two
        (5, 3 * DAY + 1),  # the first; the rest of that day dropped
        (5, 4 * DAY),  # one of the next day
        (5, 4 * DAY + 7),  # and the last
        (7, -DAY),  # before 1970 the days floor, as the kernel's: -1 is day -1, not day 0
        (7, -1),
    ]


def test_held_purchases_are_one_snapshot_until_they_change():
    store = UserStateStore(durable_types=("purchase",))
    store.add([Event("u", "a", "purchase", 5.0), Event("u", "b", "view", 5.0), Event("u", "c", "purchase", 1.0)])
    first = store.held("u")
    assert store.held("u").purchases is first.purchases
    assert [e.item_id for e in first.purchases.events] == ["c", "a"]  # oldest first
    assert [e.item_id for e in first.merged()] == ["c", "b", "a"]  # the recent one first at equal times
    store.add([Event("u", "d", "view", 6.0)])
    assert store.held("u").purchases is first.purchases  # a view leaves the purchases as they were
    store.add([Event("u", "e", "purchase", 2.0)])
    changed = store.held("u")
    assert changed.purchases is not first.purchases
    assert [e.item_id for e in changed.purchases.events] == ["c", "e", "a"]
    store.prune(1.5)
    assert [e.item_id for e in store.held("u").purchases.events] == ["e", "a"]
    assert len(store.held("")) == 0 and store.held("nobody").merged() == []
