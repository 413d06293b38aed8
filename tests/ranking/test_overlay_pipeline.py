"""The Ranker with an overlay: variants cap the ladder or drop context; purchases always excluded."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from ranking import VARIANTS, Event, Ranker, RankingModel, RankQuery, Rung, build_overlay, parse_rules
from ranking.realtime.eventlog import EventLog, read_log


@pytest.fixture(scope="module")
def ranker(bundle_path):
    return Ranker(RankingModel(bundle_path))


def rank(ranker, q, events=(), variant="ONE_TO_ONE", rules=None):
    now = time.time()
    ov = build_overlay(ranker.model, q.user_id, list(events), now, VARIANTS[variant], rules or [])
    return ranker.rank(q, overlay=ov)


def test_variants_cap_the_ladder(ranker, shop):
    session = [f"i{i}" for i in np.flatnonzero(shop.item_category == 1)[:2]]
    q = RankQuery(user_id="u3", num_results=5, session_item_ids=session, attributes={"region": "R1"})
    assert rank(ranker, q).rung == Rung.ONE_TO_ONE
    r = rank(ranker, q, variant="SESSION")
    assert r.rung == Rung.SESSION and r.fallback_reason == "variant"
    assert rank(ranker, q, variant="SEGMENT").rung == Rung.SEGMENT
    r = rank(ranker, q, variant="POPULAR")
    assert r.rung == Rung.POPULAR and r.fallback_reason == "variant"
    # Without context the session is ignored: an unknown user with only a session falls to POPULAR.
    anon = RankQuery(num_results=5, session_item_ids=session)
    assert rank(ranker, anon, variant="ONE_TO_ONE").rung == Rung.SESSION
    assert rank(ranker, anon, variant="ONE_TO_ONE_NO_CONTEXT").rung == Rung.POPULAR


def test_no_context_ignores_real_time_events_but_not_purchases(ranker, shop):
    q = RankQuery(user_id="u8", num_results=10)
    base = ranker.rank(q).item_ids
    now = time.time()
    other = (int(shop.favourite[8]) + 1) % 5
    clicks = [Event("u8", f"i{i}", "click", now) for i in np.flatnonzero(shop.item_category == other)[:6]] * 2
    bought = Event("u8", base[0], "purchase", now, 5.0)
    full = rank(ranker, q, clicks + [bought])
    plain = rank(ranker, q, clicks + [bought], variant="ONE_TO_ONE_NO_CONTEXT")
    assert base[0] not in full.item_ids and base[0] not in plain.item_ids
    assert plain.item_ids[:9] == base[1:]  # the bundle's ranking, minus what was just bought
    assert full.item_ids != plain.item_ids


def test_suppress_rule_returns_nothing_and_says_why(ranker):
    rules = parse_rules([{"name": "quiet", "when": {"channel": "sms"}, "suppress": True}], "t")
    r = rank(ranker, RankQuery(user_id="u3", num_results=5), rules=rules)
    assert r.item_ids == [] and r.applied_rules == ["quiet"]


def test_concurrent_appends_are_all_replayed_whole(tmp_path):
    log = EventLog(tmp_path, segment_bytes=4096)

    def writer(k):
        for j in range(100):
            log.append([{"w": k, "j": j}, {"w": k, "j": j, "second": True}])

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    log.close()
    got = [rec for _, rec in read_log(tmp_path)]
    assert len(got) == 800
    for k in range(4):
        mine = [(r["j"], r.get("second", False)) for r in got if r["w"] == k]
        assert mine == [(j, s) for j in range(100) for s in (False, True)]  # per-writer order, batches unsplit


def test_a_popular_arm_ranks_as_for_a_visitor_minus_the_users_exclusions(ranker):
    """The user's history feeds neither the candidates nor the features of a capped arm: a
    POPULAR arm's list is the anonymous POPULAR list without what the user may not get."""
    from ranking import RankOverlay

    m = ranker.model
    for row in np.flatnonzero(np.asarray(m.user_has_history))[:5]:
        uid = str(m.users.ids[row])
        arm = ranker.rank(RankQuery(user_id=uid, num_results=10), None, RankOverlay(variant=VARIANTS["POPULAR"]))
        anon = ranker.rank(RankQuery(num_results=60), None, RankOverlay(variant=VARIANTS["POPULAR"]))
        gone = set(m.items.id_of(np.asarray(m.consumed.row(row))))
        assert arm.rung.name == "POPULAR" and arm.fallback_reason == "variant"
        assert arm.item_ids == [i for i in anon.item_ids if i not in gone][:10]


def test_an_overlay_ranks_the_same_in_one_call_as_in_two(ranker):
    """The score offsets of real-time events and rules' demotions change a Rank the same whether
    the one compiled call applies them after the merge or NumPy does between two calls: the
    same items, scores within float32 rounding of the cosines, and the same explained parts
    (random events, rules of every kind and variants; the masks are the merge's either way)."""
    from ranking import OverlaySettings

    m = ranker.model
    rng = np.random.default_rng(5)
    cats = [str(c) for c in m.category_names.ids]
    rule_kinds = [
        {},
        {"exclude_categories": [cats[0]]},
        {"only_categories": [cats[1], cats[2]]},
        {"demote_categories": [cats[2]], "demote_by": 0.5},
    ]
    now = time.time()
    seen = set()
    for _ in range(120):
        user = f"u{rng.integers(20)}"
        types = ["view", "click", "purchase", "skip", "dislike"]
        events = [
            Event(user, f"i{rng.integers(m.n_items)}", str(rng.choice(types)), now - float(rng.integers(60)))
            for _ in range(int(rng.integers(0, 5)))
        ]
        kinds = [rule_kinds[j] for j in rng.choice(len(rule_kinds), int(rng.integers(1, 3)), replace=False)]
        rules = parse_rules([{"name": f"r{j}", "when": {"channel": "web"}, **k} for j, k in enumerate(kinds) if k], "t")
        variant = VARIANTS[str(rng.choice(["ONE_TO_ONE", "ONE_TO_ONE_NO_CONTEXT", "POPULAR"]))]
        settings = OverlaySettings(interest_boost=float(rng.choice([0.0, 2.0])))
        q = RankQuery(user_id=user, num_results=10, explain=True)
        one = build_overlay(m, user, events, now, variant, rules, settings)
        two = build_overlay(m, user, events, now, variant, rules, settings)
        two.rules_adjust_candidates = lambda: True  # the two-call path, rules and offsets in NumPy
        a, b = ranker.rank(q, overlay=one), ranker.rank(q, overlay=two)
        assert a.item_ids == b.item_ids, (events, kinds, variant)
        np.testing.assert_allclose(a.scores, b.scores, rtol=0, atol=1e-5)
        for ca, cb in zip(a.contributions or [], b.contributions or []):
            assert ca.keys() == cb.keys()
            np.testing.assert_allclose(list(ca.values()), list(cb.values()), rtol=0, atol=1e-5)
        offsets = one.offsets(m, np.arange(m.n_items, dtype=np.int32))[0]
        seen.add((offsets is not None, bool(rules), variant.use_context))
    # Both paths met offsets and rules, and a variant without context.
    assert (True, True, True) in seen and (False, False, True) in seen and any(not c for _, _, c in seen)


def test_the_merge_masks_what_the_rules_mask(ranker):
    """The masking rules, folded into the merge's category codes, mask exactly what
    ``RankOverlay.rule_mask`` masks on top of the request's own filters: excluded and allowed
    categories (unknown names among them), several rules at once, suppression. Rules needing
    more bits than the codes have stay out of the merge, and the Ranker applies them after it."""
    from ranking import RankOverlay
    from ranking.pipeline.overlay import category_rows

    m = ranker.model
    rng = np.random.default_rng(17)
    cats = [str(c) for c in m.category_names.ids] + ["no-such-category"]
    seen = set()
    for _ in range(150):
        docs = []
        for j in range(int(rng.integers(1, 4))):
            kind = rng.choice(
                ["exclude_categories", "only_categories", "demote_categories", "suppress"], p=[0.4, 0.4, 0.1, 0.1]
            )
            doc = {"name": f"r{j}", "when": {"channel": "web"}}
            doc[str(kind)] = (
                True if kind == "suppress" else list(rng.choice(cats, int(rng.integers(1, 3)), replace=False))
            )
            docs.append(doc)
        ov = RankOverlay(rules=parse_rules(docs, "t"))
        q = RankQuery(user_id=f"u{rng.integers(30)}", num_results=10)
        if rng.random() < 0.3:
            q.include_categories = list(rng.choice(cats[:-1], 2, replace=False))
        if rng.random() < 0.3:
            q.exclude_categories = [str(rng.choice(cats))]
        rung, _, urow, qvec, seg, session = ranker._resolve(q)
        args = (q, rung, urow, urow, qvec, seg, session, None)
        pool, sources, _ = ranker._candidates(*args, ov, 30, ranker.ann_effort)
        rows, mask = ranker._merge(pool, sources, seg, session, None)
        pool0, sources0, _ = ranker._candidates(*args, None, 30, ranker.ann_effort)
        rows0, mask0 = ranker._merge(pool0, sources0, seg, session, None)
        np.testing.assert_array_equal(rows, rows0)
        by_rules = ov.rule_mask(m, rows0)
        want = mask0 | by_rules if by_rules is not None else mask0
        np.testing.assert_array_equal(mask, want, err_msg=str(docs))
        assert ov.masks_in_merge()
        seen.add((by_rules is not None and bool((by_rules & ~mask0).any()), bool(want.all())))
    assert (True, False) in seen and (True, True) in seen  # rules masked some candidates, and all

    # More allowed-category rules than the codes have bits: the merge leaves them, the Ranker
    # applies them after it, and the answer holds to every one.
    some = [str(c) for c in m.category_names.ids]
    docs = [{"name": f"o{j}", "when": {"channel": "web"}, "only_categories": some} for j in range(31)]
    docs.append({"name": "x", "when": {"channel": "web"}, "exclude_categories": [some[0]]})
    ov = RankOverlay(rules=parse_rules(docs, "t"))
    assert not ov.masks_in_merge() and ov.rules_adjust_candidates()
    got = ranker.rank(RankQuery(user_id="u3", num_results=10), overlay=ov)
    assert got.item_ids
    banned = set(category_rows(m, (some[0],)).tolist())
    for item in got.item_ids:
        row = int(m.items.lookup([item])[0])
        assert not banned & set(np.asarray(m.item_categories.row(row)).tolist())
