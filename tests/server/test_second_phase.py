"""A bundle whose scoring is over the server's budget still serves, its second phase cut to fit, and says so."""

from __future__ import annotations

import json
import logging
import urllib.request

import grpc
import pytest
from ops_tools import publish_copy
from prometheus_client import REGISTRY

from one2one.v1 import ranking_pb2 as pb
from one2one.v1 import ranking_pb2_grpc
from ranking import RankQuery
from server.config import ServerConfig
from server.demo import start_server, wait_serving
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


def test_a_real_server_over_its_budget_serves_and_says_so(artifacts, tmp_path):
    """End to end: a server whose default budget (20 us) cannot hold the full model's scoring."""
    cfg = tmp_path / "server.toml"
    cfg.write_text("[server]\nworkers = 1\ndefault_budget_ms = 0.02\nmax_budget_ms = 5000\n")
    proc, ready = start_server(artifacts, tmp_path, extra=["--config", str(cfg)])
    channel = grpc.insecure_channel(f"127.0.0.1:{ready['grpc_port']}")
    try:
        wait_serving(channel)
        stub = ranking_pb2_grpc.RankingServiceStub(channel)
        # A request with a roomy budget of its own is ranked in full, phased.
        resp = stub.Rank(pb.RankRequest(user_id="u2", num_results=10, budget_ms=2000), timeout=10)
        assert len(resp.items) == 10 and not resp.degraded
        scrape = urllib.request.urlopen(f"http://127.0.0.1:{ready['metrics_port']}/metrics", timeout=5).read()
        values = {
            line.split(" ")[0]: float(line.split(" ")[1])
            for line in scrape.decode().splitlines()
            if line.startswith("one2one_second_phase") or line.startswith("one2one_first_phase")
        }
        assert values["one2one_second_phase_cut"] == 1
        assert 1 <= values["one2one_second_phase_candidates"] < 200
        assert values["one2one_first_phase_trees"] > 0
    finally:
        channel.close()
        proc.terminate()
        proc.wait(timeout=30)
    logged = [json.loads(line) for line in (tmp_path / "server.log").read_text().splitlines() if line.startswith("{")]
    cut = [r for r in logged if r.get("msg") == "bundle scoring over budget: second phase cut to fit"]
    assert len(cut) == 1 and cut[0]["second_phase_candidates"] == values["one2one_second_phase_candidates"]


def test_a_second_phase_below_minus_one_is_refused():
    config = ServerConfig()
    config._apply({"artifacts": "/nowhere", "second_phase_candidates": -2}, "test")
    with pytest.raises(ValueError, match="second_phase_candidates -2 must be >= -1"):
        config.validate()
