"""What the builder hands the server: a search effort tuned for recall, a reranker whose cost has a ceiling."""

import numpy as np
import pytest
from tests_support import SMALL_BUILD

from index_builder.ann_tuning import effort_ladder, exact_top, recall, tune_effort
from index_builder.build import _ladder_phase_veto, build
from index_builder.config import BuildConfig
from index_builder.fit import build_index
from index_builder.rerank_cost import fit_ceiling
from index_builder.rerank_phases import paired_loss, phased_order, prefix_counts, topk_recall
from index_builder.synthetic import make_shop, write_shop
from ranking import ExactHead, Ranker, RankerConfig, RankingModel, resolve_current
from ranking.retrieval.search import Retriever


def test_effort_ladder_doubles_from_16_and_ends_at_the_maximum():
    assert effort_ladder(1024) == [16, 32, 64, 128, 256, 512, 1024]
    assert effort_ladder(100) == [16, 32, 64, 100]
    assert effort_ladder(8) == [8]


def test_ceiling_cuts_every_bag_in_proportion_and_fits():
    rng = np.random.default_rng(0)
    per_tree = [rng.uniform(3, 6, n) for n in (100, 40, 60)]
    total = sum(c.sum() for c in per_tree)
    keep = fit_ceiling(per_tree, total / 2)
    cost = sum(c[:n].sum() for c, n in zip(per_tree, keep))
    assert cost <= total / 2
    # Proportional: every bag keeps about the same share of its trees (floor rounding aside).
    shares = [n / len(c) for n, c in zip(keep, per_tree)]
    assert max(shares) - min(shares) < 0.05 and 0.4 < shares[0] < 0.6
    # A ceiling it already fits, or none at all, keeps everything.
    assert fit_ceiling(per_tree, total + 1) == [100, 40, 60]
    assert fit_ceiling(per_tree, 0) == [100, 40, 60]
    # Below one tree per bag: one tree each is the floor (the builder then says the ceiling is not met).
    assert fit_ceiling(per_tree, 1.0) == [1, 1, 1]


def _clustered_items(n: int, d: int, seed: int, spread: float) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(40, d))
    items = centres[rng.integers(0, 40, n)] + 0.6 * rng.normal(size=(n, d))
    items *= rng.lognormal(0, spread, (n, 1))  # norms spread like popularity
    users = centres[rng.integers(0, 40, 300)] + 0.6 * rng.normal(size=(300, d))
    return items.astype(np.float32), users.astype(np.float32)


def test_tuned_effort_is_the_lowest_reaching_the_target_on_the_served_path():
    items, users = _clustered_items(20_000, 24, 3, 0.2)
    # A weak graph (efConstruction 16), so low efforts miss and the ladder has work to do.
    cfg = BuildConfig.load(overrides={"hnsw_ef_construction": 16, "index_type": "HNSW32,Flat"})
    index = build_index(items, cfg)
    k, head = 200, 2000
    section = tune_effort(index, items, users, k, head, 0.95, 1024)
    effort = section["ann_effort"]
    assert section["reached"] and section["efforts"][-1]["effort"] == effort
    assert len(section["efforts"]) > 1  # this index needs more than the first rung
    # Measured again here, independently: the server's retriever at the chosen effort reaches the target ...
    truth = exact_top(items, users, k)
    got, _ = Retriever(index, ExactHead(items, head)).search(users, k, effort)
    assert recall(truth, got) >= 0.95
    # ... and every lower rung tried fell short (the choice is the lowest).
    assert all(e["served_recall"] < 0.95 for e in section["efforts"][:-1])
    assert all(e["search_us_per_query"] > 0 for e in section["efforts"])


def test_unreachable_target_takes_the_highest_effort_and_says_so(caplog):
    items, users = _clustered_items(20_000, 24, 3, 0.1)
    cfg = BuildConfig.load(overrides={"hnsw_ef_construction": 16, "index_type": "HNSW8,Flat"})
    index = build_index(items, cfg)
    section = tune_effort(index, items, users, 200, 0, 1.0, 32)
    assert not section["reached"] and section["ann_effort"] == 32
    assert [e["effort"] for e in section["efforts"]] == [16, 32]
    assert "no effort up to 32" in section["warning"]
    assert "no search effort up to ann_max_effort = 32" in caplog.text
    # With refine factors too: the pair of highest recall, on a tie the smaller factor, then the higher effort.
    section = tune_effort(index, items, users, 200, 0, 1.0, 32, [1, 2])
    assert len(section["efforts"]) == 4 and not section["reached"]
    top = max(e["served_recall"] for e in section["efforts"])
    tied = [e for e in section["efforts"] if e["served_recall"] == top]
    want = min(tied, key=lambda e: (e["refine"], -e["effort"]))
    assert (section["ann_effort"], section["ann_refine"]) == (want["effort"], want["refine"])
    assert section["served_recall"] == top and "refine factors [1.0, 2.0]" in section["warning"]


def _sq4_shop() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(21)
    return rng.standard_normal((20000, 32)).astype(np.float32), rng.standard_normal((300, 32)).astype(np.float32)


def test_tuning_refines_when_the_codes_cap_recall_below_the_target():
    items, users = _sq4_shop()
    index = build_index(items, BuildConfig.load(overrides={"index_type": "HNSW32,SQ4"}))
    section = tune_effort(index, items, users, 100, 0, 0.95, 64, [4, 1, 2])
    assert section["reached"] and section["refine_factors"] == [1.0, 2.0, 4.0]
    # No effort reaches the target with the codes' own order ...
    plain = [e for e in section["efforts"] if e["refine"] == 1.0]
    assert [e["effort"] for e in plain] == effort_ladder(64)
    assert all(e["served_recall"] < 0.95 for e in plain)
    # ... so a refined pair is chosen: the one reaching it at the lowest measured time.
    reaching = [e for e in section["efforts"] if e["served_recall"] >= 0.95]
    best = min(reaching, key=lambda e: e["search_us_per_query"])
    assert section["ann_refine"] > 1 and (section["ann_effort"], section["ann_refine"]) == (
        best["effort"],
        best["refine"],
    )
    assert section["served_recall"] == best["served_recall"]
    # Measured again here, independently, through the server's retriever.
    got, _ = Retriever(index, None, items, section["ann_refine"]).search(users, 100, section["ann_effort"])
    assert recall(exact_top(items, users, 100), got) >= 0.95
    # No pair measured does more work (a larger factor, no less effort) than one already reaching the target.
    assert not any(
        r["refine"] < e["refine"] and r["effort"] <= e["effort"] for r in reaching for e in section["efforts"]
    )


def test_tuning_keeps_the_index_order_when_it_reaches_the_target():
    items, users = _sq4_shop()
    index = build_index(items, BuildConfig.load(overrides={"index_type": "HNSW32,Flat"}))
    section = tune_effort(index, items, users, 100, 0, 0.95, 1024, [1, 2, 4])
    assert section["reached"] and section["ann_refine"] == 1.0 and section["ann_effort"] == 16
    # Every refined pair would do more work than (16, 1): none was measured.
    assert [(e["effort"], e["refine"]) for e in section["efforts"]] == [(16, 1.0)]


@pytest.mark.parametrize("bad", [[], [0.5], [1, 0], ["2"], [True]])
def test_bad_refine_factors_are_named(bad):
    with pytest.raises(ValueError, match="ann_refine_factors must be a non-empty list of numbers >= 1"):
        BuildConfig.load(overrides={"ann_refine_factors": bad})
    assert BuildConfig.load(overrides={"ann_refine_factors": [1, 3]}).ann_refine_factors == [1, 3]


def test_tuning_refuses_a_refine_factor_below_1():
    items, users = _sq4_shop()
    flat = build_index(items[:500], BuildConfig.load(overrides={"index_type": "Flat"}))
    with pytest.raises(ValueError, match=r"refine factors must be >= 1 \(1: no re-ranking\), got \[0.5, 2\]"):
        tune_effort(flat, items[:500], users, 10, 0, 0.95, 16, [0.5, 2])


@pytest.fixture(scope="module")
def budget_bundle(tmp_path_factory):
    """A shop larger than its exact head, built with the head off and a reranker ceiling forced low."""
    shop = make_shop(n_users=600, n_items=3000, n_categories=8, events_per_user=25, seed=11)
    files = write_shop(shop, tmp_path_factory.mktemp("budget-shop"), "csv")
    out = tmp_path_factory.mktemp("budget-art")
    overrides = {
        **SMALL_BUILD,
        "eval_exact_head_items": 0,
        "rerank_max_tree_nodes_per_candidate": 30,
        "ladder_report": False,
    }
    build(files["events"], files["items"], files["users"], out, BuildConfig.load(overrides=overrides), False)
    return resolve_current(out)


@pytest.mark.slow
def test_build_records_the_tuned_effort_and_the_server_path_reaches_it(budget_bundle):
    model = RankingModel(budget_bundle)
    retrieval = model.manifest["retrieval"]
    effort = retrieval["ann_effort"]
    assert retrieval["reached"] and retrieval["exact_head_items"] == 0 and retrieval["k"] == 200
    # The bundle's index and factors, searched as a server with the head off searches them.
    uf, itf = np.asarray(model.user_factors), np.asarray(model.item_factors)
    users = uf[np.flatnonzero(np.asarray(model.user_has_history))]
    got, _ = Retriever(model.index, None).search(users, 200, effort)
    assert recall(exact_top(itf, users, 200), got) >= 0.95
    # A server left at ann_effort = 0 searches with the bundle's; an operator's setting wins.
    assert (Ranker(model).ann_effort, Ranker(model).ann_effort_source) == (effort, "bundle")
    assert (Ranker(model).ann_refine, Ranker(model).ann_refine_source) == (retrieval["ann_refine"], "bundle")
    ranker = Ranker(model, RankerConfig(ann_effort=effort + 7))
    assert (ranker.ann_effort, ranker.ann_effort_source) == (effort + 7, "config")


@pytest.mark.slow
def test_a_low_ceiling_cuts_the_reranker_and_the_manifest_says_what_it_cost(budget_bundle):
    model = RankingModel(budget_bundle)
    training = model.manifest["scoring"]["training"]
    cost = training["serving_cost"]
    assert cost["cut"] and cost["met"] and cost["ceiling_nodes_per_candidate"] == 30
    assert cost["nodes_per_candidate_before_cut"] > 30 >= cost["nodes_per_candidate"]
    assert sum(cost["trees_per_bag_before_cut"]) > cost["trees"] == sum(training["trees_per_bag"])
    # The served ensemble is the cut one, and the NDCG figures before and after are both recorded.
    assert Ranker(model).scoring_trees == cost["trees"] == training["n_trees"]
    assert 0.0 <= cost["held_out_ndcg_at_10_after_cut"] <= 1.0
    assert 0.0 <= cost["held_out_ndcg_at_10_before_cut"] <= 1.0
    assert training["held_out_ndcg_at_10"]["reranker"] == cost["held_out_ndcg_at_10_after_cut"]
    # nodes_per_candidate is rounded to a tenth: 200 candidates put the product within 10.
    assert abs(cost["nodes_per_request"] - cost["nodes_per_candidate"] * 200) <= 10


def test_default_build_records_its_cost_uncut(bundle_path):
    model = RankingModel(bundle_path)
    cost = model.manifest["scoring"]["training"]["serving_cost"]
    assert not cost["cut"] and cost["met"] and cost["trees"] == Ranker(model).scoring_trees > 0
    assert cost["nodes_per_candidate"] > cost["trees"]  # every tree walks at least one split on these rows
    # The small shop fits the exact head: the lowest effort already recalls everything.
    assert model.manifest["retrieval"]["ann_effort"] == 16
    assert [(e["effort"], e["served_recall"]) for e in model.manifest["retrieval"]["efforts"]] == [(16, 1.0)]
    assert model.manifest["retrieval"]["ann_refine"] == 1.0


def test_phased_order_recall_and_the_noise_rule():
    first = np.array([5.0, 4.0, 3.0, 2.0, 1.0, 0.0])
    full = np.array([0.0, 1.0, 2.0, 9.0, 3.0, 8.0])
    # The best three by the first phase (0, 1, 2) reranked by the full model, then 3, 4, 5.
    np.testing.assert_array_equal(phased_order(first, full, 3), [2, 1, 0, 3, 4, 5])
    np.testing.assert_array_equal(phased_order(first, full, 0), np.argsort(-full, kind="stable"))
    # The full top 2 (rows 3, 5) are outside the first phase's top 3, inside its top 4 once.
    assert topk_recall([first], [full], 3, k=2) == 0.0
    assert topk_recall([first], [full], 4, k=2) == 0.5
    assert topk_recall([first], [full], 6, k=2) == 1.0
    assert prefix_counts([40, 3, 0], 0.1) == [4, 1, 0]
    same = paired_loss(np.full(50, 0.5), np.full(50, 0.5))
    assert not same["lost"] and same["difference"] == 0.0
    rng = np.random.default_rng(0)
    one = rng.random(400)
    assert paired_loss(one, one - 0.05 - 0.01 * rng.random(400))["lost"]
    assert not paired_loss(one, one + rng.normal(0, 0.05, 400))["lost"]


def test_the_ladder_vetoes_phases_that_lose():
    phases = {"second_phase_candidates": 50, "first_trees_per_bag": [3]}
    kept = {"protocols": {"temporal": {"phases": {"lost": False}}, "last_n": {"error": "too few"}}}
    assert _ladder_phase_veto(phases, kept) == phases
    lost = {"protocols": {"temporal": {"phases": {"lost": True}}}}
    vetoed = _ladder_phase_veto(phases, lost)
    assert vetoed["second_phase_candidates"] == 0 and "temporal" in vetoed["one_phase_because"]
    assert vetoed["first_trees_per_bag"] == [3]  # the first phase stays for a server that must cut


def test_default_build_records_its_phases(bundle_path):
    model = RankingModel(bundle_path)
    phases = model.manifest["phases"]
    trees = model.manifest["scoring"]["training"]["trees_per_bag"]
    assert phases["trees_per_bag"] == trees and phases["k"] == 10
    assert all(1 <= t1 < t for t1, t in zip(phases["first_trees_per_bag"], trees) if t > 1)
    assert phases["second_phase_candidates"] == BuildConfig().rerank_second_phase_candidates
    assert phases["recall_at_10"] >= phases["target_recall"] == 0.99
    ndcg = phases["held_out_ndcg_at_10"]
    assert not ndcg["lost"] and ndcg["queries"] == phases["held_out_queries"] > 0
    assert 0.0 <= ndcg["phased"] <= 1.0 and 0.0 <= ndcg["one_phase"] <= 1.0
    # The ladder ranked the same test users both ways, through the serving path.
    for protocol in ("temporal", "last_n"):
        ladder = model.manifest["evaluation"]["ladder"][protocol]["phases"]
        assert {"one_phase", "phased", "difference_se", "same_top_k"} <= set(ladder)
        assert ladder["second_phase_candidates"] == phases["second_phase_candidates"]
