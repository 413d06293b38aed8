"""A bundle whose scoring is over the server's budget still serves, its second phase cut to fit, and says so."""

from __future__ import annotations

import logging

from ops_tools import publish_copy
from prometheus_client import REGISTRY

from ranking import RankQuery
from server.config import ServerConfig
from server.model_manager import ModelManager


def _manager(tmp_path, bundle_path, settings: dict) -> ModelManager:
    root = tmp_path / "artifacts"
    root.mkdir()
    publish_copy(bundle_path, root, "v1")
    config = ServerConfig()
    config._apply({"artifacts": str(root), **settings}, "test")
    config.validate()
    models = ModelManager(config.artifacts, config.ranker_config())
    assert models.load_current("startup")
    return models


def _gauge(name: str, **labels) -> float | None:
    return REGISTRY.get_sample_value(name, labels)


def test_a_bundle_over_the_budget_serves_with_its_second_phase_cut(tmp_path, bundle_path, caplog):
    # One phase asked for; a default budget of 10 us cannot hold the full model's scoring.
    with caplog.at_level(logging.WARNING, logger="server.model_manager"):
        ranker = _manager(tmp_path, bundle_path, {"default_budget_ms": 0.01, "second_phase_candidates": 0}).current()
    assert ranker.second_phase_cut and 1 <= ranker.second_phase_candidates < ranker.config.n_candidates
    assert _gauge("one2one_second_phase_cut") == 1
    assert _gauge("one2one_second_phase_candidates") == ranker.second_phase_candidates
    assert _gauge("one2one_first_phase_trees") == ranker.first_phase_trees > 0
    first, second = ranker.phase_seconds_per_candidate
    assert _gauge("one2one_phase_candidate_seconds", phase="first") == first > 0
    assert _gauge("one2one_phase_candidate_seconds", phase="second") == second
    lines = [r for r in caplog.records if "second phase cut to fit" in r.getMessage()]
    assert len(lines) == 1
    assert lines[0].second_phase_candidates == ranker.second_phase_candidates
    assert lines[0].phased_scoring_ms < lines[0].one_phase_scoring_ms
    # It serves: phased, unbudgeted here, ten results.
    res = ranker.rank(RankQuery(user_id="u3", num_results=10))
    assert len(res.item_ids) == 10 and not res.degraded


def test_a_bundle_within_the_budget_keeps_its_own_second_phase(tmp_path, bundle_path):
    ranker = _manager(tmp_path, bundle_path, {}).current()
    assert not ranker.second_phase_cut
    assert (ranker.second_phase_candidates, ranker.second_phase_source) == (
        ranker.model.manifest["phases"]["second_phase_candidates"],
        "bundle",
    )
    assert _gauge("one2one_second_phase_cut") == 0
    assert _gauge("one2one_second_phase_candidates") == ranker.second_phase_candidates
