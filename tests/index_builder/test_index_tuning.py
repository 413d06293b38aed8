"""The builder tunes the HNSW graph itself when no search effort reaches the recall target cheaply enough."""

import logging

import numpy as np
import pytest
from tests_support import SMALL_BUILD

from index_builder.ann_tuning import exact_top, hnsw_m, index_bytes, index_ladder, recall, tune_index
from index_builder.build import build
from index_builder.config import BuildConfig
from index_builder.fit import build_index
from index_builder.synthetic import make_shop, write_shop
from ranking import Ranker, RankingModel, Retriever, resolve_current


def test_the_ladder_doubles_ef_construction_then_m_and_keeps_the_storage():
    assert index_ladder("HNSW32,SQ8", 40, 3) == [
        ("HNSW32,SQ8", 40),
        ("HNSW32,SQ8", 80),
        ("HNSW64,SQ8", 80),
        ("HNSW64,SQ8", 160),
    ]
    assert index_ladder("HNSW16_PQ8", 10, 0) == [("HNSW16_PQ8", 10)]
    # No M in the string: FAISS's 32.
    assert index_ladder("HNSW,Flat", 80, 2)[-1] == ("HNSW64,Flat", 160)
    with pytest.raises(ValueError, match=r"index_type 'IVF16_HNSW32,Flat' is not an HNSW factory string"):
        index_ladder("IVF16_HNSW32,Flat", 40, 1)


def _clustered(n: int, d: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Items around 30 centres with norms spread like popularity, and users drawn near the same centres."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(30, d))
    items = centres[rng.integers(0, 30, n)] + 0.6 * rng.normal(size=(n, d))
    items *= rng.lognormal(0, 0.2, (n, 1))
    users = centres[rng.integers(0, 30, 200)] + 0.6 * rng.normal(size=(200, d))
    return items.astype(np.float32), users.astype(np.float32)


def _weak(**overrides) -> BuildConfig:
    """A graph too weak for the target at the efforts allowed: few links, a narrow build search."""
    settings = {
        "index_type": "HNSW4,Flat",
        "hnsw_ef_construction": 4,
        "ann_max_effort": 16,
        "ann_refine_factors": [1.0],
        "eval_exact_head_items": 0,
        "ann_max_search_us": 0.0,
        "ann_max_index_rebuilds": 6,
    }
    return BuildConfig.load(overrides={**settings, **overrides})


K = 20


def test_a_weak_graph_is_rebuilt_until_one_reaches_the_target():
    items, users = _clustered(5000, 16, 1)
    cfg = _weak()
    first = build_index(items, cfg)
    index, section = tune_index(first, 0.5, items, users, K, cfg)
    tried = section["indexes"]
    assert not tried[0]["reached"] and tried[0]["index_type"] == "HNSW4,Flat" and tried[0]["build_seconds"] == 0.5
    # Climbed until the first index within the target (no ceiling): it is the last tried and the one kept.
    assert 1 < len(tried) <= 7 and tried[-1]["reached"] and not any(t["reached"] for t in tried[:-1])
    assert [(t["index_type"], t["hnsw_ef_construction"]) for t in tried] == index_ladder("HNSW4,Flat", 4, 6)[
        : len(tried)
    ]
    assert section["reached"] and section["index"] == {
        "index_type": tried[-1]["index_type"],
        "hnsw_m": tried[-1]["hnsw_m"],
        "hnsw_ef_construction": tried[-1]["hnsw_ef_construction"],
        "rebuilt": True,
    }
    # The chosen pair and its figures are the kept index's; "efforts" are its pairs.
    assert (section["ann_effort"], section["served_recall"]) == (tried[-1]["ann_effort"], tried[-1]["served_recall"])
    assert section["efforts"] == tried[-1]["efforts"] and "warning" not in section
    # The index returned is the one described, measured as built: its M, its size.
    assert index is not first and hnsw_m(index) == section["index"]["hnsw_m"]
    assert index_bytes(index) == tried[-1]["index_bytes"] > tried[0]["index_bytes"]
    assert all(t["build_seconds"] > 0 for t in tried)
    # Measured again here, independently, as the server searches it.
    got, _ = Retriever(index, None).search(users, K, section["ann_effort"])
    assert recall(exact_top(items, users, K), got) >= 0.95
    # The first graph, at the same effort, does not.
    got, _ = Retriever(first, None).search(users, K, section["ann_effort"])
    assert recall(exact_top(items, users, K), got) < 0.95


def test_an_index_reaching_the_target_is_kept_as_built():
    items, users = _clustered(5000, 16, 1)
    cfg = _weak(index_type="HNSW32,Flat", hnsw_ef_construction=80, ann_max_effort=64)
    first = build_index(items, cfg)
    index, section = tune_index(first, 0.25, items, users, K, cfg)
    assert index is first and section["reached"]
    assert len(section["indexes"]) == 1 and section["indexes"][0]["within_ceiling"]
    assert section["index"] == {"index_type": "HNSW32,Flat", "hnsw_m": 32, "hnsw_ef_construction": 80, "rebuilt": False}


def test_a_ceiling_no_index_meets_climbs_the_whole_ladder_and_keeps_the_fastest_reaching(caplog):
    items, users = _clustered(5000, 16, 1)
    # Every pair costs more than a nanosecond: no index is within the ceiling.
    cfg = _weak(
        index_type="HNSW16,Flat",
        hnsw_ef_construction=40,
        ann_max_effort=64,
        ann_max_index_rebuilds=2,
        ann_max_search_us=0.001,
    )
    index, section = tune_index(build_index(items, cfg), 0.1, items, users, K, cfg)
    tried = section["indexes"]
    assert [(t["index_type"], t["hnsw_ef_construction"]) for t in tried] == [
        ("HNSW16,Flat", 40),
        ("HNSW16,Flat", 80),
        ("HNSW32,Flat", 80),
    ]
    assert not any(t["within_ceiling"] for t in tried)
    reaching = [t for t in tried if t["reached"]]
    assert reaching
    fastest = min(reaching, key=lambda t: t["search_us_per_query"])
    assert section["index"]["index_type"] == fastest["index_type"]
    assert section["search_us_per_query"] == fastest["search_us_per_query"]
    assert hnsw_m(index) == fastest["hnsw_m"]
    assert "within 0.001 us per query" in section["warning"] and "ann_max_index_rebuilds" in section["warning"]
    assert "no index tried (HNSW16,Flat efConstruction 40, " in caplog.text


@pytest.mark.parametrize("index_type", ["Flat", "IVF16,Flat"])
def test_other_index_types_are_tuned_as_they_are(index_type, caplog):
    caplog.set_level(logging.INFO, logger="index_builder.ann_tuning")
    items, users = _clustered(2000, 16, 2)
    cfg = _weak(index_type=index_type)
    first = build_index(items, cfg)
    index, section = tune_index(first, 0.1, items, users, K, cfg)
    assert index is first and len(section["indexes"]) == 1
    assert section["index"] == {
        "index_type": index_type,
        "hnsw_m": None,
        "hnsw_ef_construction": None,
        "rebuilt": False,
    }
    assert section["index_tuning"].startswith(f"not rebuilt: {index_type} is not an HNSW index")
    assert f"index tuning skipped: not rebuilt: {index_type} is not an HNSW index" in caplog.text


@pytest.mark.parametrize(
    ("setting", "value", "message"),
    [
        ("ann_max_search_us", -1.0, r"ann_max_search_us must be >= 0 microseconds \(0: no ceiling\), got -1.0"),
        ("ann_max_search_us", float("nan"), r"ann_max_search_us must be >= 0 microseconds"),
        ("ann_max_index_rebuilds", -1, r"ann_max_index_rebuilds must be in 0..6 \(0: the configured index only\)"),
        ("ann_max_index_rebuilds", 7, r"ann_max_index_rebuilds must be in 0..6 .*got 7"),
        ("ann_max_index_rebuilds", 1.5, r"build setting 'ann_max_index_rebuilds' must be int, got float 1.5"),
        ("ann_max_search_us", "fast", r"build setting 'ann_max_search_us' must be float, got str 'fast'"),
        ("hnsw_ef_construction", 0, r"hnsw_ef_construction must be >= 1, got 0"),
    ],
)
def test_bad_index_tuning_settings_are_named(setting, value, message):
    with pytest.raises(ValueError, match=message):
        BuildConfig.load(overrides={setting: value})


@pytest.fixture(scope="module")
def tuned_bundle(tmp_path_factory):
    """A small shop built with a graph too weak for the target: the builder must rebuild it."""
    shop = make_shop(n_users=600, n_items=3000, n_categories=8, events_per_user=25, seed=11)
    files = write_shop(shop, tmp_path_factory.mktemp("weak-shop"), "csv")
    out = tmp_path_factory.mktemp("weak-art")
    overrides = {
        **SMALL_BUILD,
        "eval_candidates": K,
        "rerank": False,
        "ladder_report": False,
        "index_type": "HNSW4,Flat",
        "hnsw_ef_construction": 4,
        "ann_max_effort": 16,
        "eval_exact_head_items": 0,
        "ann_max_index_rebuilds": 6,
    }
    build(files["events"], files["items"], files["users"], out, BuildConfig.load(overrides=overrides), False)
    return resolve_current(out)


def test_the_bundle_ships_the_rebuilt_index_and_its_server_path_reaches_the_target(tuned_bundle):
    model = RankingModel(tuned_bundle)
    retrieval = model.manifest["retrieval"]
    tried = retrieval["indexes"]
    assert retrieval["reached"] and retrieval["index"]["rebuilt"] and not tried[0]["reached"]
    assert retrieval["index"]["index_type"] == tried[-1]["index_type"] != "HNSW4,Flat"
    # The configured settings stay in the manifest's config; the shipped ones are in retrieval.
    assert model.manifest["config"]["index_type"] == "HNSW4,Flat"
    shipped = retrieval["index"]
    assert hnsw_m(model.index) == shipped["hnsw_m"] and (shipped["hnsw_m"], shipped["hnsw_ef_construction"]) != (4, 4)
    assert (tuned_bundle / "index.faiss").stat().st_size == tried[-1]["index_bytes"]
    # The server, left at its defaults, searches with the bundle's effort and refine factor ...
    ranker = Ranker(model)
    assert (ranker.ann_effort, ranker.ann_effort_source) == (retrieval["ann_effort"], "bundle")
    assert (ranker.ann_refine, ranker.ann_refine_source) == (retrieval["ann_refine"], "bundle")
    # ... and on the bundle's own index and factors that reaches the target for users with history.
    uf, itf = np.asarray(model.user_factors), np.asarray(model.item_factors)
    users = np.ascontiguousarray(uf[np.flatnonzero(np.asarray(model.user_has_history))])
    got, _ = Retriever(model.index, None, itf, ranker.ann_refine).search(users, K, ranker.ann_effort)
    assert recall(exact_top(itf, users, K), got) >= 0.95
    # The published index reaches what the first, weak one could not at that effort.
    assert model.manifest["evaluation"][f"ann_recall_at_{K}"] >= 0.95


def test_a_head_that_proves_every_query_needs_no_rebuild(bundle_path):
    """The default small bundle: its catalogue fits the exact head, the first index is kept."""
    retrieval = RankingModel(bundle_path).manifest["retrieval"]
    assert [t["index_type"] for t in retrieval["indexes"]] == [BuildConfig().index_type]
    assert retrieval["index"]["rebuilt"] is False and retrieval["index"]["hnsw_m"] == 32
    assert retrieval["max_index_rebuilds"] == BuildConfig().ann_max_index_rebuilds
