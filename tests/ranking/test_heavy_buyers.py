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
from ranking.realtime.user_state import HeldEvents, HeldPurchases, UserStateStore


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


# -- A digest extended by the purchases since the last one ----------------------------------


def _same_digest(got: overlay_module._Digest, want: overlay_module._Digest, what: str) -> None:
    """Every array of both digests equal, bit for bit, with the same dtype."""
    for f in dataclasses.fields(want):
        a, b = getattr(got, f.name), getattr(want, f.name)
        assert a.dtype == b.dtype, f"{f.name} is {a.dtype}, not {b.dtype}: {what}"
        assert a.shape == b.shape and np.array_equal(a, b), f"{f.name}: {what}"


def _purchases_after(
    model, rng: np.random.Generator, user_id: str, items: list[str], at: float, kinds: tuple[str, ...] = ()
) -> list[Event]:
    """The next step of a customer's purchases, all at or after ``at`` and in time order: one
    purchase, a basket of many at one time (often ``at`` itself), or a few over days; of the
    customer's items, items the bundle does not know, and now and then a rating (or one of
    ``kinds``, events a store might hold that are no purchase)."""
    kind = int(rng.integers(0, 3))
    n = 1 if kind == 0 else int(rng.integers(2, 40))
    if kind == 1:
        times = np.full(n, at + float(rng.choice([0.0, 0.25, 60.0, DAY])))
    else:
        times = at + np.sort(rng.choice([0.0, 0.25, 30.0, 3600.0, DAY, 2.5 * DAY], n))
    return [
        Event(
            user_id,
            str(rng.choice(items)),
            str(rng.choice(["purchase", "purchase", "purchase", "rating", *kinds])),
            float(t),
            v,
        )
        for t, v in zip(times, rng.choice([0.0, 1.0, 4.0, 12.5], n))
    ]


def _recent_events(rng: np.random.Generator, user_id: str, items: list[str], bought: tuple[Event, ...]) -> tuple:
    """A few views, clicks, ratings and skips among a customer's purchases, oldest first."""
    kinds = ["view", "click", "add_to_cart", "rating", "skip", *NEGATIVE_EVENT_TYPES]
    at = [e.timestamp for e in bought]
    evs = [
        Event(
            user_id, str(rng.choice(items)), str(rng.choice(kinds)), float(rng.choice(at)) + float(rng.integers(-2, 3))
        )
        for _ in range(int(rng.integers(0, 30)))
    ]
    return tuple(sorted(evs, key=lambda e: e.timestamp))


def _customer_items(model, rng: np.random.Generator) -> list[str]:
    ids = [str(i) for i in model.items.ids]
    return list(rng.choice(ids, int(rng.integers(1, 50)), replace=False)) + ["no-such-item"]


@pytest.mark.slow
def test_a_digest_extended_purchase_by_purchase_is_the_digest_of_all_of_them(model, monkeypatch):
    """Snapshots made one from the last (as a store that appends in time order makes them):
    each one's digest, extended from the last one's by the new purchases alone, is the digest
    of all of its purchases, and the overlay with recent events is the oracle's."""
    rng = np.random.default_rng(21)
    cache = model_cache(model)
    end = float(model.manifest["data_window"]["end_unix"])
    with_history = [str(model.users.ids[r]) for r in np.flatnonzero(np.asarray(model.user_has_history))]
    digested: list[int] = []  # how many events each digest made in Python read
    real_digest = overlay_module._digest
    monkeypatch.setattr(
        overlay_module, "_digest", lambda m, c, evs: (digested.append(len(evs)), real_digest(m, c, evs))[1]
    )
    extended = from_scratch = 0
    for i in range(25):
        user_id = str(rng.choice(with_history)) if i % 3 else f"visitor-{i}"
        items = _customer_items(model, rng)
        # A first run of purchases, some inside the bundle's window, sorted as a store sorts them.
        first = _purchases_after(model, rng, user_id, items, end - float(rng.choice([0.0, DAY])))
        first += _heavy_buyer(model, rng, user_id, int(rng.choice([10, 80, 300])))
        first = sorted((e for e in first if e.event_type in ("purchase", "rating")), key=lambda e: e.timestamp)
        snap = HeldPurchases(tuple(first))
        for step in range(12):
            if rng.random() < 0.8:  # ranked: a digest made (sometimes a customer is not)
                digested.clear()
                base = snap.extends
                had = base is not None and isinstance(base.memo.get(model), overlay_module._Digest)
                got = overlay_module._held_digest(model, cache, snap)
                _same_digest(got, real_digest(model, cache, snap.events), f"customer {i}, step {step}")
                if had:  # read in Python: the new purchases alone
                    assert base is not None and digested == [len(snap.events) - len(base.events)]
                    extended += 1
                else:
                    assert digested == [len(snap.events)]
                    from_scratch += 1
                assert snap.extends is None  # released once the digest is made
                recent = _recent_events(rng, user_id, items, snap.events)
                now = snap.events[-1].timestamp + float(rng.integers(0, 10 * DAY))
                variant = FULL if step % 3 else dataclasses.replace(FULL, use_context=False)
                held = HeldEvents(recent, snap)
                _same_overlay(
                    build_overlay(model, user_id, held, now, variant),
                    reference_overlay(model, user_id, held.merged(), now, variant),
                    f"customer {i}, step {step}",
                )
            # Now and then a step of few purchases among views and skips: the contract is about
            # order, not types.
            kinds = ("view", "view", "view", "skip", "dislike") * 3 if step % 4 == 3 else ()
            snap = HeldPurchases(
                snap.events + tuple(_purchases_after(model, rng, user_id, items, snap.events[-1].timestamp, kinds)),
                extends=snap,
            )
    assert extended > 100 and from_scratch >= 25


def test_the_store_continues_a_snapshot_only_while_purchases_come_in_time_order():
    store = UserStateStore(durable_types=("purchase", "rating"))
    store.add([Event("u", "a", "purchase", 5.0), Event("u", "b", "purchase", 1.0), Event("u", "v", "view", 9.0)])
    first = store.held("u").purchases
    assert first.extends is None and [e.item_id for e in first.events] == ["b", "a"]
    # At the latest time, and after it: the new snapshot continues the last one.
    store.add([Event("u", "c", "purchase", 5.0), Event("u", "v", "view", 2.0), Event("u", "d", "rating", 7.0, 4.0)])
    second = store.held("u").purchases
    assert second.extends is first and [e.item_id for e in second.events] == ["b", "a", "c", "d"]
    assert store.held("u").purchases is second
    second.release_extends()  # as the overlay does once it has the digest
    # Before the latest: sorted anew, a snapshot of its own.
    store.add([Event("u", "e", "purchase", 8.0), Event("u", "f", "purchase", 6.0), Event("u", "g", "purchase", 9.0)])
    third = store.held("u").purchases
    assert third.extends is None and [e.item_id for e in third.events] == ["b", "a", "c", "f", "d", "e", "g"]
    # In order again: continued.
    store.add([Event("u", "h", "purchase", 9.0)])
    fourth = store.held("u").purchases
    assert fourth.extends is third and fourth.events == (*third.events, Event("u", "h", "purchase", 9.0))
    # A snapshot read but never digested is skipped: the next one continues the one before it.
    store.add([Event("u", "i", "purchase", 10.0)])
    fifth = store.held("u").purchases
    assert fifth.extends is third and fifth.events[: len(third.events)] == third.events
    # A prune drops a prefix: the next snapshot is a plain one, even when the last was to be continued.
    store.add([Event("u", "j", "purchase", 10.0)])
    store.prune(4.0)
    store.add([Event("u", "k", "purchase", 11.0)])
    pruned = store.held("u").purchases
    assert pruned.extends is None
    assert [e.item_id for e in pruned.events] == ["a", "c", "f", "d", "e", "g", "h", "i", "j", "k"]
    # A new customer's first purchases have nothing to continue.
    store.add([Event("w", "a", "purchase", 20.0)])
    store.held("w")
    store.add([Event("w", "b", "purchase", 3.0)])
    assert store.held("w").purchases.extends is None


def test_a_snapshot_that_breaks_the_contract_is_refused():
    old = HeldPurchases((Event("u", "a", "purchase", 5.0), Event("u", "b", "purchase", 7.0)))
    with pytest.raises(ValueError, match="more than"):
        HeldPurchases(old.events[:1], extends=old)
    with pytest.raises(ValueError, match="not extends' last event"):
        HeldPurchases((old.events[0], Event("u", "x", "purchase", 7.0), Event("u", "c", "purchase", 8.0)), extends=old)
    with pytest.raises(ValueError, match="event 2 at 6.0 is before"):
        HeldPurchases((*old.events, Event("u", "c", "purchase", 6.0)), extends=old)
    same_time = HeldPurchases((*old.events, Event("u", "c", "purchase", 7.0)), extends=old)
    assert same_time.extends is old


@pytest.mark.slow
def test_a_heavy_buyer_ranked_between_purchases_in_and_out_of_order_and_prunes(model):
    """Through the store as the server reads it: purchases in time order continue the last
    snapshot and its digest; one out of order, or a prune, makes a snapshot of its own; every
    overlay is the oracle's and every digest the one all purchases give."""
    rng = np.random.default_rng(34)
    cache = model_cache(model)
    end = float(model.manifest["data_window"]["end_unix"])
    durable = tuple(cache.weighting.consumed_event_types)
    with_history = [str(model.users.ids[r]) for r in np.flatnonzero(np.asarray(model.user_has_history))]
    kinds: set[str] = set()
    for i in range(10):
        user_id = str(rng.choice(with_history))
        items = _customer_items(model, rng)
        store = UserStateStore(durable_types=durable)
        store.add(_heavy_buyer(model, rng, user_id, 200))
        latest, horizon = end + 6 * DAY, end
        for step in range(15):
            before = store.held(user_id).purchases
            kind = str(rng.choice(["in order", "in order", "in order", "out of order", "prune"]))
            if kind == "prune":
                horizon += float(rng.integers(1, DAY // 2))  # drops the purchases up to it
                store.prune(horizon)
                store.add(_purchases_after(model, rng, user_id, items, latest))
            elif kind == "out of order":
                # Before the latest purchase, after what the last prune dropped.
                back = float(rng.integers(1, int(min(3 * DAY, latest - horizon))))
                late = Event(user_id, str(rng.choice(items)), "purchase", latest - back)
                assert store.add([late]) == 1
                store.add(_purchases_after(model, rng, user_id, items, latest))
            else:
                store.add(_purchases_after(model, rng, user_id, items, latest))
            latest = max(e.timestamp for e in store.held(user_id).purchases.events)
            held = store.held(user_id)
            # In order it continues the snapshot ranked last; otherwise none.
            assert (held.purchases.extends is before) == (kind == "in order"), f"{kind}, customer {i}"
            kinds.add(kind)
            now = latest + float(rng.integers(0, 5 * DAY))
            _same_overlay(
                build_overlay(model, user_id, held, now),
                reference_overlay(model, user_id, store.events(user_id), now),
                f"customer {i}, step {step} ({kind})",
            )
            if len(held) >= overlay_module.DIGEST_MIN_EVENTS:
                _same_digest(
                    held.purchases.memo[model],  # type: ignore[arg-type]
                    overlay_module._digest(model, cache, held.purchases.events),
                    f"customer {i}, step {step} ({kind})",
                )
    assert kinds == {"in order", "out of order", "prune"}
