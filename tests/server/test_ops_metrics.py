"""The live /metrics of a real server: promtool-clean, every family the dashboards use, budget buckets."""

from __future__ import annotations

import re
import subprocess

import grpc
import pytest
from ops_tools import require_tool, sample, scrape, start_one_process

from one2one.v1 import ranking_pb2 as pb
from one2one.v1 import ranking_pb2_grpc
from server import metrics
from server.demo import wait_serving


@pytest.fixture(scope="module")
def live(artifacts, tmp_path_factory):
    proc, ready = start_one_process(artifacts, tmp_path_factory.mktemp("metrics-server"))
    channel = grpc.insecure_channel(f"127.0.0.1:{ready['grpc_port']}")
    wait_serving(channel)
    stub = ranking_pb2_grpc.RankingServiceStub(channel)
    for req in [
        pb.RankRequest(user_id="u1"),
        pb.RankRequest(user_id="nobody"),
        pb.RankRequest(context=pb.Context(session_item_ids=["i3"])),
        pb.RankRequest(candidate_item_ids=["no-such-item"]),
    ]:
        stub.Rank(req, timeout=10)
    with pytest.raises(grpc.RpcError):
        stub.Rank(pb.RankRequest(num_results=-1), timeout=10)
    text = scrape(ready["metrics_port"])
    yield text
    channel.close()
    proc.terminate()
    proc.wait(timeout=60)


def test_promtool_check_metrics_is_clean(live):
    out = subprocess.run(
        [require_tool("promtool"), "check", "metrics"], input=live, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0 and not out.stdout.strip() and not out.stderr.strip(), out.stdout + out.stderr


def test_every_declared_family_is_exported(live):
    families = {re.sub(r"_total$", "", m.group(1)) for m in re.finditer(r"^# TYPE (\S+) ", live, re.M)}
    assert not [f for f in families if f.endswith("_created")]
    for name in [
        "one2one_rpc_requests",
        "one2one_rpc_duration_seconds",
        "one2one_rpc_in_flight_requests",
        "one2one_rank_stage_duration_seconds",
        "one2one_rank_responses",
        "one2one_rank_fallbacks",
        "one2one_rank_degraded",
        "one2one_rank_empty_results",
        "one2one_rank_candidates",
        "one2one_rank_scored_candidates",
        "one2one_rank_retrieval",
        "one2one_bundle_info",
        "one2one_bundle_build_timestamp_seconds",
        "one2one_bundle_load_timestamp_seconds",
        "one2one_bundle_load_duration_seconds",
        "one2one_bundle_load_failures",
        "one2one_bundle_reloads",
        "one2one_bundle_refused",
        "one2one_bundle_max_age_seconds",
        "one2one_rank_budget_seconds",
        "one2one_serving",
        "one2one_gc_pause_seconds",
        "process_cpu_seconds",
        "process_resident_memory_bytes",
        "process_open_fds",
    ]:
        assert name in families, name


def test_what_the_requests_did_is_counted(live):
    assert sample(live, 'one2one_rank_responses_total{strategy="ONE_TO_ONE"}') >= 1
    assert sample(live, 'one2one_rank_responses_total{strategy="SESSION"}') >= 1
    assert sample(live, 'one2one_rank_fallbacks_total{reason="unknown_user"}') >= 1
    assert sample(live, "one2one_rank_empty_results_total") >= 1
    # The test catalogue fits in the default exact head: every embedding search is proven exact.
    assert sample(live, 'one2one_rank_retrieval_total{path="exact_head"}') >= 1
    assert sample(live, 'one2one_rank_retrieval_total{path="ann"}') == 0
    assert sample(live, 'one2one_rank_retrieval_total{path="none"}') >= 1
    bad = 'one2one_rpc_requests_total{code="INVALID_ARGUMENT",method="one2one.v1.RankingService/Rank"}'
    assert sample(live, bad) == 1
    assert sample(live, "one2one_rank_scored_candidates_count") >= 4
    for stage in metrics.STAGES:
        assert sample(live, f'one2one_rank_stage_duration_seconds_count{{stage="{stage}"}}') >= 4, stage
    for reason in metrics.LOAD_FAILURE_REASONS:
        assert sample(live, f'one2one_bundle_load_failures_total{{reason="{reason}"}}') == 0
    assert sample(live, 'one2one_rank_budget_seconds{kind="default"}') == 0.05
    # The collection that freezes the long-lived objects before the first request (server.gc_policy).
    assert sample(live, 'one2one_gc_pause_seconds_count{generation="2"}') >= 1


def test_latency_buckets_include_the_budget_boundaries_exactly(live):
    for bound in metrics.budget_boundaries_seconds():
        assert bound in metrics.LATENCY_BUCKETS
        for series in (
            'one2one_rpc_duration_seconds_bucket{le="%s",method="one2one.v1.RankingService/Rank"}',
            'one2one_rank_stage_duration_seconds_bucket{le="%s",stage="score"}',
        ):
            sample(live, series % repr(bound))  # raises when the bucket is not exported
    assert set(metrics.budget_boundaries_seconds()) == {0.048, 0.05, 0.5}
