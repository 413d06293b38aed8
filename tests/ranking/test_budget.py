"""The request budget: effective budget, the cost model, and degradation in a fixed order."""

import time

import numpy as np
import pytest

from ranking import Budget, CostModel, Ranker, RankerConfig, RankingModel, RankQuery, effective_budget_ms


def test_effective_budget_is_the_smallest_limit():
    assert effective_budget_ms(0, 50, 500, None, 2) == 50
    assert effective_budget_ms(30, 50, 500, None, 2) == 30
    assert effective_budget_ms(900, 50, 500, None, 2) == 500
    assert effective_budget_ms(30, 50, 500, 0.010, 2) == pytest.approx(8.0)
    assert effective_budget_ms(0, 50, 500, 0.001, 2) < 0


def test_cost_model_plans_fewer_candidates_when_short():
    cm = CostModel(alpha=1.0, safety=1.0, min_candidates=10)
    assert not cm.plan(5.0, 200, 128).cut  # nothing learned yet: full plan
    cm.observe(200, 0.0, 20.0)  # 0.1 ms per candidate
    full = cm.plan(50.0, 200, 128)
    assert (full.n_candidates, full.effort, full.cut) == (200, 128, False)
    short = cm.plan(5.0, 200, 128)
    assert short.cut and short.n_candidates == 50 and short.effort == 50
    assert cm.plan(0.1, 200, 128).n_candidates == 10
    assert short.score and not cm.plan(0.1, 200, 128).score  # not even 10 candidates fit: no scoring


@pytest.fixture(scope="module")
def slow_ranker(bundle_path):
    # 100 us per candidate in retrieval and features: 200 candidates cost >= 40 ms.
    cfg = RankerConfig(debug_delay_us_per_candidate={"retrieve": 100.0, "features": 100.0})
    r = Ranker(RankingModel(bundle_path), cfg)
    r.warm(4)
    return r


def timed(ranker, q, budget):
    t0 = time.perf_counter()
    res = ranker.rank(q, budget)
    return res, (time.perf_counter() - t0) * 1000


def test_budgeted_request_with_a_slow_stage_returns_in_time_degraded(slow_ranker):
    res, ms = timed(slow_ranker, RankQuery(user_id="u1"), Budget.start(15.0))
    assert res.degraded and res.degraded_stages[0] == "retrieve"
    assert len(res.item_ids) == 10
    assert res.n_candidates < 150
    # Budget 15 ms; the planner uses 70% of it. Generous slack for a shared machine.
    assert ms < 15.0 + 10.0


def test_unbudgeted_request_does_not_degrade(slow_ranker):
    res, ms = timed(slow_ranker, RankQuery(user_id="u1"), Budget.unlimited())
    assert not res.degraded and res.degraded_stages == []
    assert res.n_candidates >= 200 and ms >= 40.0


def test_too_little_time_to_score_even_a_few_candidates_skips_the_features(slow_ranker):
    # 3 ms: the plan's smallest candidate set would need about 20 x 0.2 ms of slow stages.
    res, ms = timed(slow_ranker, RankQuery(user_id="u1"), Budget.start(3.0))
    assert res.degraded_stages == ["retrieve", "retrieval_order"]
    assert "features" not in res.stage_seconds and len(res.item_ids) == 10
    assert ms < 3.0 + 10.0  # generous slack for a shared machine


def test_no_time_left_answers_in_retrieval_order(slow_ranker):
    res = slow_ranker.rank(RankQuery(user_id="u1", explain=True), Budget.start(0.0))
    assert "retrieval_order" in res.degraded_stages
    assert len(res.item_ids) == 10 and res.contributions is None
    assert res.scores == sorted(res.scores, reverse=True)


def test_the_cheapest_path_searches_nothing_and_still_applies_the_rules(slow_ranker, bundle_path):
    m = slow_ranker.model
    urow = m.users.row("u1")
    consumed = set(m.items.id_of(np.asarray(m.consumed.row(urow))))
    # Plenty of budget: the cheapest path is taken because the caller says so (no pipeline slot).
    res, ms = timed_cheapest(slow_ranker, RankQuery(user_id="u1"))
    assert res.degraded_stages == ["retrieve", "retrieval_order"]
    assert "features" not in res.stage_seconds and len(res.item_ids) == 10
    assert res.n_candidates <= 40 and not consumed & set(res.item_ids)
    assert ms < 40.0  # the full slow stages cost >= 40 ms; this path skips them


def timed_cheapest(ranker, q):
    t0 = time.perf_counter()
    res = ranker.rank(q, Budget.start(5000.0), cheapest=True)
    return res, (time.perf_counter() - t0) * 1000
