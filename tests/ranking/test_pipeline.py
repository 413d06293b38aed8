"""The Rank pipeline in process against a bundle built from a shop with planted structure."""

import numpy as np
import pytest

from ranking import Budget, InvalidRequest, Ranker, RankingModel, RankQuery, Rung


@pytest.fixture(scope="module")
def ranker(bundle_path):
    return Ranker(RankingModel(bundle_path))


def category_of(shop):
    return {f"i{i}": int(c) for i, c in enumerate(shop.item_category)}


def test_planted_taste_is_recovered(ranker, shop):
    """Users who buy from one category get that category ranked first."""
    cat = category_of(shop)
    shares = []
    for u in range(0, 300, 3):
        res = ranker.rank(RankQuery(user_id=f"u{u}", num_results=10))
        assert res.rung == Rung.ONE_TO_ONE
        shares.append(np.mean([cat[i] == shop.favourite[u] for i in res.item_ids]))
    # 90% of each user's events are in the favourite category; chance is 20%.
    assert np.mean(shares) >= 0.8


def test_consumed_items_are_never_offered(ranker, shop):
    ev = shop.events.to_pydict()
    bought = {i for u, i, t in zip(ev["user_id"], ev["item_id"], ev["event_type"]) if u == "u5" and t == "purchase"}
    assert bought
    res = ranker.rank(RankQuery(user_id="u5", num_results=100))
    assert not bought & set(res.item_ids)
    # Merely viewed items may come back: only consumption excludes.
    assert len(res.item_ids) == 100


def test_exclusions_filters_and_rerank_only(ranker, shop):
    base = ranker.rank(RankQuery(user_id="u1", num_results=5))
    res = ranker.rank(RankQuery(user_id="u1", num_results=5, exclude_item_ids=base.item_ids[:2]))
    assert not set(base.item_ids[:2]) & set(res.item_ids)
    assert res.item_ids[:3] == base.item_ids[2:5]

    cat = category_of(shop)
    other = (shop.favourite[1] + 1) % 5
    res = ranker.rank(RankQuery(user_id="u1", num_results=10, include_categories=[f"cat{other}"]))
    assert len(res.item_ids) == 10 and all(cat[i] == other for i in res.item_ids)
    res = ranker.rank(RankQuery(user_id="u1", num_results=30, exclude_categories=[f"cat{shop.favourite[1]}"]))
    assert all(cat[i] != shop.favourite[1] for i in res.item_ids)

    prices = dict(zip(shop.items["item_id"].to_pylist(), shop.items["price"].to_pylist()))
    res = ranker.rank(RankQuery(user_id="u1", num_results=20, min_price=15, max_price=30))
    assert res.item_ids and all(15 <= prices[i] <= 30 for i in res.item_ids)

    cands = ["i3", "i7", "nope", "i3", "i11"]
    res = ranker.rank(RankQuery(user_id="u1", num_results=10, candidate_item_ids=cands))
    assert sorted(res.item_ids) == sorted(set(cands) - {"nope"} - set(i for i in cands if i in _consumed(shop, "u1")))


def _consumed(shop, user):
    ev = shop.events.to_pydict()
    return {i for u, i, t in zip(ev["user_id"], ev["item_id"], ev["event_type"]) if u == user and t == "purchase"}


def test_ladder_fallbacks(ranker, shop):
    cat = category_of(shop)
    fav_items = [f"i{i}" for i in np.flatnonzero(shop.item_category == 2)[:3]]
    res = ranker.rank(RankQuery(user_id="stranger", session_item_ids=fav_items, num_results=10))
    assert res.rung == Rung.SESSION and res.fallback_reason == "unknown_user"
    assert not set(fav_items) & set(res.item_ids)
    assert np.mean([cat[i] == 2 for i in res.item_ids]) >= 0.7

    res = ranker.rank(RankQuery(attributes={"region": "R3"}, num_results=10))
    assert res.rung == Rung.SEGMENT and res.fallback_reason == "no_user_id"
    seg_share = np.mean([cat[i] == 3 for i in res.item_ids])
    pop = ranker.rank(RankQuery(num_results=10))
    assert pop.rung == Rung.POPULAR
    assert seg_share > np.mean([cat[i] == 3 for i in pop.item_ids])
    assert seg_share >= 0.6


def test_explain_contributions_add_up(ranker):
    res = ranker.rank(RankQuery(user_id="u2", num_results=5, explain=True))
    assert len(res.contributions) == 5
    for score, contrib in zip(res.scores, res.contributions):
        assert set(contrib) >= {"als_score", "popularity", "bias"}
        assert sum(contrib.values()) == pytest.approx(score, abs=1e-5)


def test_invalid_fields_are_named(ranker):
    with pytest.raises(InvalidRequest) as err:
        ranker.rank(RankQuery(num_results=-1, budget_ms=-5, session_item_ids=[""], min_price=-1))
    fields = {v.field for v in err.value.violations}
    assert fields == {"num_results", "budget_ms", "context.session_item_ids[0]", "filter.min_price"}
    with pytest.raises(InvalidRequest, match="filter.include_categories"):
        ranker.rank(RankQuery(include_categories=["no-such-category"]))


def test_num_results_default_and_clamp(ranker):
    assert len(ranker.rank(RankQuery(user_id="u1")).item_ids) == 10
    assert len(ranker.rank(RankQuery(user_id="u1", num_results=10_000)).item_ids) == 100


def test_spent_budget_degrades_instead_of_failing(ranker):
    res = ranker.rank(RankQuery(user_id="u1", num_results=10), Budget.start(0.0))
    assert res.degraded and res.degraded_stages[-1] == "retrieval_order"
    assert len(res.item_ids) == 10
    full = ranker.rank(RankQuery(user_id="u1", num_results=10), Budget.start(10_000))
    assert not full.degraded and full.n_scored == full.n_candidates


def test_in_categories_says_which_items_belong_to_any_of_the_categories(ranker):
    from ranking.pipeline.categories import in_categories

    m = ranker.model
    rows = np.arange(0, m.n_items, 7, dtype=np.int32)
    for cats in ([0], [1, 3], [4, 4, 2], list(range(len(m.category_names)))):
        want = [bool(set(m.item_categories.row(r).tolist()) & set(cats)) for r in rows]
        got = in_categories(m, rows, np.array(cats))
        assert got.dtype == bool and got.tolist() == want
        assert 0 < got.sum() < len(rows) or len(cats) == len(m.category_names)
    assert in_categories(m, rows, np.zeros(0, np.int32)).tolist() == [False] * len(rows)
    assert in_categories(m, np.zeros(0, np.int32), np.array([0])).shape == (0,)
