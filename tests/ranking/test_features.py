"""Reranker features from the bundle (ranking.pipeline.features) and the scoring section's formats."""

import json

import numpy as np
import pytest
from tests_support import SMALL_BUILD

from index_builder.build import build
from index_builder.config import BuildConfig
from index_builder.evaluate import RUNGS
from ranking import FEATURE_NAMES, N_FEATURES, BundleError, Ranker, RankingModel, RankQuery, ServingModel

COL = {n: j for j, n in enumerate(FEATURE_NAMES)}


@pytest.fixture(scope="module")
def model(bundle_path):
    return RankingModel(bundle_path)


@pytest.fixture(scope="module")
def ranker(model):
    return Ranker(model)


def test_bundle_serves_the_learned_trees(model, ranker):
    assert ranker.scorer.kind == "trees"
    assert tuple(ranker.feature_names) == FEATURE_NAMES
    assert not hasattr(model, "scorer")  # the loaded bundle holds data; serving builds the scorer
    training = model.manifest["scoring"]["training"]
    assert training["groups"] >= 20 and training["n_trees"] >= 1
    # Learned, and better than the plain embedding order on held-out users.
    v = training["held_out_ndcg_at_10"]
    assert v["reranker"] > v["retrieval_order"]


def test_known_user_features_reflect_planted_taste(ranker, shop):
    prep = ranker.prepare(RankQuery(user_id="u5", event_time=None))
    X = prep.features
    assert X.shape == (len(prep.rows), N_FEATURES) and X.dtype == np.float32
    fav = shop.favourite[5]
    in_fav = shop.item_category[prep.rows] == fav
    aff = X[:, COL["category_affinity"]]
    assert aff[in_fav].mean() > 0.5 > aff[~in_fav].mean()
    assert not np.isnan(X[:, COL["als_score"]]).any()
    assert np.all(X[:, COL["rung"]] == 4)


def test_unknown_visitor_has_missing_user_features(ranker):
    X = ranker.prepare(RankQuery(user_id="nobody")).features
    for name in (
        "als_score",
        "category_affinity",
        "user_recency_days",
        "user_stage",
        "hour_user_share",
        "session_similarity",
    ):
        assert np.isnan(X[:, COL[name]]).all(), name
    assert np.all(X[:, COL["rung"]] == 1)


def test_popularity_windows_follow_the_request_time(ranker, model):
    start = model.manifest["data_window"]["start_unix"]
    end = model.manifest["data_window"]["end_unix"]
    before = ranker.prepare(RankQuery(user_id="u1", event_time=float(start - 86_400))).features
    at_end = ranker.prepare(RankQuery(user_id="u1", event_time=float(end))).features
    assert np.all(before[:, COL["popularity_7d"]] == 0)
    assert at_end[:, COL["popularity_30d"]].max() > 0
    assert np.all(at_end[:, COL["popularity_30d"]] >= at_end[:, COL["popularity_7d"]])


def test_windows_counted_once_at_the_data_end_match_the_per_request_search(ranker, model):
    # Serving requests (after the data end, or without a time) read counts made at load;
    # they must equal what searching the event keys gives for that moment.
    end = model.manifest["data_window"]["end_unix"]
    cands = np.arange(model.n_items, dtype=np.int32)
    keys = np.asarray(model.bundle.array("item_event_keys"))
    for days in (7, 30):
        base = cands.astype(np.int64) << 32
        searched = np.searchsorted(keys, base + end + 1) - np.searchsorted(keys, base + end + 1 - days * 86_400)
        assert np.array_equal(
            np.asarray(model.bundle.array(f"item_events_{days}d_at_end"))[cands], searched.astype(np.float32)
        )
        assert searched.sum() > 0
    later = ranker.prepare(RankQuery(user_id="u1", event_time=float(end + 5 * 86_400))).features
    untimed = ranker.prepare(RankQuery(user_id="u1")).features
    for name in ("popularity_7d", "popularity_30d", "trend"):
        assert np.array_equal(later[:, COL[name]], untimed[:, COL[name]]), name


def test_hour_of_day_changes_the_context_features(ranker, model):
    end = model.manifest["data_window"]["end_unix"]
    day0 = end - end % 86_400
    night = ranker.prepare(RankQuery(user_id="u1", event_time=float(day0 + 2 * 3600))).features
    evening = ranker.prepare(RankQuery(user_id="u1", event_time=float(day0 + 20 * 3600))).features
    assert not np.array_equal(night[:, COL["hour_item_lift"]], evening[:, COL["hour_item_lift"]])


def test_session_items_feed_session_features(ranker, shop):
    fav = [f"i{i}" for i in np.flatnonzero(shop.item_category == 1)[:3]]
    prep = ranker.prepare(RankQuery(session_item_ids=fav))
    X = prep.features
    in_cat = shop.item_category[prep.rows] == 1
    assert X[in_cat, COL["covis_session"]].mean() > X[~in_cat, COL["covis_session"]].mean()
    assert not np.isnan(X[:, COL["session_similarity"]]).any()


def test_linear_bundles_still_load_and_unknown_models_are_refused(shop_files, tmp_path):
    out = tmp_path / "linear"
    path = build(
        shop_files["events"],
        shop_files["items"],
        shop_files["users"],
        out,
        BuildConfig.load(overrides={**SMALL_BUILD, "rerank": False}),
        show_progress=False,
    )
    m = RankingModel(path)
    linear = Ranker(m)
    assert linear.scorer.kind == "linear" and m.manifest["scoring"]["fallback"]["reason"] == "rerank = false"
    res = linear.rank(RankQuery(user_id="u3", explain=True, num_results=5))
    for score, contrib in zip(res.scores, res.contributions):
        assert sum(contrib.values()) == pytest.approx(score, abs=1e-5)
    manifest = path / "manifest.json"
    doc = json.loads(manifest.read_text())
    doc["scoring"]["model"] = "forest"
    manifest.write_text(json.dumps(doc))
    with pytest.raises(BundleError, match="scoring.model is 'forest'"):
        ServingModel(RankingModel(path))


def test_every_build_carries_the_ladder_and_the_data_profile(model):
    ladder = model.manifest["evaluation"]["ladder"]
    for protocol in ("last_n", "temporal"):
        ndcg = ladder[protocol]["ndcg_at_10"]["all"]
        assert set(ndcg) == set(RUNGS)
        assert all(0.0 <= v <= 1.0 for v in ndcg.values())
    profile = model.manifest["data_profile"]
    assert profile["events"] == model.manifest["counts"]["events"]
    assert 0 < profile["long_tail"]["share_of_events_on_top_20pct_items"] <= 1
