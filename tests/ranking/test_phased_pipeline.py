"""Phased scoring in the Rank pipeline: the builder's phases, the second phase as a budget lever."""

import numpy as np
import pytest

from ranking import Budget, Ranker, RankerConfig, RankingModel, RankQuery
from ranking.pipeline.budget import CostModel


@pytest.fixture(scope="module")
def model(bundle_path):
    return RankingModel(bundle_path)


def test_the_bundle_records_its_phases_and_the_ranker_uses_them(model):
    phases = model.manifest["phases"]
    ranker = Ranker(model)
    assert (ranker.second_phase_candidates, ranker.second_phase_source) == (
        phases["second_phase_candidates"],
        "bundle",
    )
    assert ranker.first_phase_trees == sum(phases["first_trees_per_bag"]) < ranker.scoring_trees
    assert Ranker(model, RankerConfig(second_phase_candidates=7)).second_phase_candidates == 7
    assert Ranker(model, RankerConfig(second_phase_candidates=0)).second_phase_candidates == 0


def test_phased_top_k_equals_one_phase_for_most_requests(model, shop):
    one = Ranker(model, RankerConfig(second_phase_candidates=0))
    phased = Ranker(model, RankerConfig(second_phase_candidates=40))
    ev = shop.events.to_pydict()
    same, bought = [], {}
    for u, i, t in zip(ev["user_id"], ev["item_id"], ev["event_type"]):
        if t == "purchase":
            bought.setdefault(u, set()).add(i)
    for u in range(0, 300, 3):
        q = RankQuery(user_id=f"u{u}", num_results=10)
        a, b = one.rank(q), phased.rank(q)
        same.append(a.item_ids == b.item_ids)
        # Masked (consumed) items never come back, whichever phase ranked them.
        assert not bought.get(f"u{u}", set()) & set(b.item_ids)
        assert len(b.item_ids) == 10 and not b.degraded
    assert np.mean(same) >= 0.9
    # Every candidate in the second phase: the one-phase answer exactly.
    everything = Ranker(model, RankerConfig(second_phase_candidates=100_000))
    for u in range(0, 300, 30):
        q = RankQuery(user_id=f"u{u}", num_results=10)
        a, b = one.rank(q), everything.rank(q)
        assert a.item_ids == b.item_ids and a.scores == b.scores


def test_a_short_budget_cuts_the_second_phase_before_the_scored_candidates(model):
    ranker = Ranker(model, RankerConfig(second_phase_candidates=0))
    ranker.warm()
    assert ranker.phase_seconds_per_candidate is not None
    q = RankQuery(user_id="u4", num_results=10)
    assert "second_phase" not in ranker.rank(q, Budget.start(200.0)).degraded_stages
    # Pretend the trees the second phase adds cost 10 ms a candidate: a 200 ms budget then
    # affords about 14 of them; the first phase still scores every candidate.
    first, _ = ranker.phase_seconds_per_candidate
    ranker.phase_seconds_per_candidate = (first, 1e-2)
    res = ranker.rank(q, Budget.start(200.0))
    assert "second_phase" in res.degraded_stages and "score" not in res.degraded_stages
    assert res.n_scored == res.n_candidates and len(res.item_ids) == 10
    # Unlimited: nothing to cut.
    assert not ranker.rank(q).degraded


def test_plan_second_phase_fits_the_estimate():
    costs = CostModel()
    # 200 candidates at 0.001 ms in the first phase, 0.01 ms for the rest: all 200 need 2.2 ms.
    assert costs.plan_second_phase(10.0, 200, 0, 0.001, 0.01) == (0, False)
    n, cut = costs.plan_second_phase(2.0, 200, 0, 0.001, 0.01)
    assert cut and n == int((2.0 * costs.safety - 0.2) / 0.01)
    assert costs.plan_second_phase(2.0, 200, 50, 0.001, 0.01) == (50, False)
    assert costs.plan_second_phase(0.0, 200, 50, 0.001, 0.01) == (1, True)
    assert costs.plan_second_phase(float("inf"), 200, 0, 1.0, 1.0) == (0, False)


def test_a_model_over_its_scoring_budget_serves_with_the_second_phase_cut(model):
    ranker = Ranker(model, RankerConfig(second_phase_candidates=0, scoring_budget_ms=0.001))
    ranker.warm()
    assert ranker.second_phase_cut and 1 <= ranker.second_phase_candidates < ranker.config.n_candidates
    assert ranker.scoring_ms(200, ranker.second_phase_candidates) < ranker.scoring_ms(200, 0)
    res = ranker.rank(RankQuery(user_id="u7", num_results=10))
    assert len(res.item_ids) == 10
    roomy = Ranker(model, RankerConfig(second_phase_candidates=0, scoring_budget_ms=1000.0))
    roomy.warm()
    assert not roomy.second_phase_cut and roomy.second_phase_candidates == 0
