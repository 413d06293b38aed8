"""The server searches with the effort its bundle's builder chose, unless the operator set one, and says which."""

from __future__ import annotations

import json

import pytest
from ops_tools import publish_copy
from prometheus_client import REGISTRY

from server.config import ServerConfig
from server.model_manager import ModelManager


def _manager(tmp_path, bundle_path, settings: dict, tuned: int | None, refine: float | None = None) -> ModelManager:
    root = tmp_path / "artifacts"
    root.mkdir(parents=True)

    def set_effort(path):
        if tuned is None:
            return
        manifest = json.loads((path / "manifest.json").read_text())
        manifest["retrieval"]["ann_effort"] = tuned
        if refine is None:
            manifest["retrieval"].pop("ann_refine", None)  # as written before the builder tuned it
        else:
            manifest["retrieval"]["ann_refine"] = refine
        (path / "manifest.json").write_text(json.dumps(manifest))

    publish_copy(bundle_path, root, "v1", mutate=set_effort)
    config = ServerConfig()
    config._apply({"artifacts": str(root), **settings}, "test")
    config.validate()
    models = ModelManager(config.artifacts, config.ranker_config())
    assert models.load_current("startup")
    return models


def _gauge(source: str, name: str = "one2one_ann_effort") -> float | None:
    return REGISTRY.get_sample_value(name, {"source": source})


def test_the_bundles_effort_serves_when_the_operator_sets_none(tmp_path, bundle_path):
    ranker = _manager(tmp_path, bundle_path, {}, tuned=96).current()
    assert (ranker.ann_effort, ranker.ann_effort_source) == (96, "bundle")
    assert _gauge("bundle") == 96 and _gauge("config") == 0
    # Warm-up measured the scoring cost of the bundle's trees, and the gauges carry it.
    assert ranker.scoring_seconds_per_candidate is not None and ranker.scoring_seconds_per_candidate > 0
    assert REGISTRY.get_sample_value("one2one_scoring_candidate_seconds") == ranker.scoring_seconds_per_candidate
    assert REGISTRY.get_sample_value("one2one_scoring_trees") == ranker.scoring_trees > 0


def test_an_explicit_ann_effort_wins_over_the_bundles(tmp_path, bundle_path):
    ranker = _manager(tmp_path, bundle_path, {"ann_effort": 300}, tuned=96).current()
    assert (ranker.ann_effort, ranker.ann_effort_source) == (300, "config")
    assert _gauge("config") == 300 and _gauge("bundle") == 0


def test_a_bundle_without_a_tuned_effort_gets_the_default(tmp_path, bundle_path):
    def drop(path):
        manifest = json.loads((path / "manifest.json").read_text())
        del manifest["retrieval"]
        (path / "manifest.json").write_text(json.dumps(manifest))

    root = tmp_path / "artifacts"
    root.mkdir()
    publish_copy(bundle_path, root, "v1", mutate=drop)
    models = ModelManager(root, ServerConfig().ranker_config())
    assert models.load_current("startup")
    ranker = models.current()
    assert (ranker.ann_effort, ranker.ann_effort_source) == (128, "default")


def test_a_negative_ann_effort_is_refused():
    config = ServerConfig()
    config._apply({"artifacts": "x", "ann_effort": -1}, "test")
    with pytest.raises(ValueError, match=r"ann_effort -1 must be >= 0 \(0: the bundle's tuned effort\)"):
        config.validate()


def test_the_bundles_refine_factor_serves_unless_the_operator_sets_one(tmp_path, bundle_path):
    ranker = _manager(tmp_path / "a", bundle_path, {}, tuned=96, refine=2.0).current()
    assert (ranker.ann_refine, ranker.ann_refine_source) == (2.0, "bundle")
    assert ranker.ann.retriever.refine == 2.0 and ranker.ann.retriever.item_factors is not None
    assert _gauge("bundle", "one2one_ann_refine") == 2.0 and _gauge("config", "one2one_ann_refine") == 0
    ranker = _manager(tmp_path / "b", bundle_path, {"ann_refine": 3}, tuned=96, refine=2.0).current()
    assert (ranker.ann_refine, ranker.ann_refine_source) == (3.0, "config")
    assert ranker.ann.retriever.refine == 3.0
    assert _gauge("config", "one2one_ann_refine") == 3.0 and _gauge("bundle", "one2one_ann_refine") == 0


def test_a_bundle_without_a_refine_factor_searches_unrefined(tmp_path, bundle_path):
    ranker = _manager(tmp_path, bundle_path, {}, tuned=96).current()
    assert (ranker.ann_refine, ranker.ann_refine_source) == (1.0, "default")
    assert ranker.ann.retriever.refine == 1.0
    assert _gauge("default", "one2one_ann_refine") == 1.0


@pytest.mark.parametrize("bad", [-1, 0.5])
def test_a_refine_factor_below_1_is_refused(bad):
    config = ServerConfig()
    config._apply({"artifacts": "x", "ann_refine": bad}, "test")
    with pytest.raises(ValueError, match=rf"ann_refine {float(bad)} must be 0 \(the bundle's\) or >= 1"):
        config.validate()


def test_the_library_refuses_a_refine_factor_below_1(bundle_path):
    from ranking import Ranker, RankerConfig, RankingModel

    with pytest.raises(ValueError, match=r"ann_refine 0.5 must be 0 \(the bundle's\) or >= 1"):
        Ranker(RankingModel(bundle_path), RankerConfig(ann_refine=0.5))
