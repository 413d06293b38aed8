"""Lifecycle of a real server process: health before and after the first bundle, hot reload
under load, refused bundles, SIGHUP and admin reloads, SIGTERM drain, request ids in logs."""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from ops_tools import (
    RankLoad,
    corrupt_an_array,
    future_schema,
    percentile,
    publish_copy,
    sample,
    scrape,
    start_one_process,
    wait_for,
    write_config,
)
from tests_support import SMALL_BUILD

from index_builder.build import build
from index_builder.config import BuildConfig
from one2one.v1 import admin_pb2, admin_pb2_grpc, ranking_pb2_grpc
from one2one.v1 import ranking_pb2 as pb
from ranking import resolve_current, set_current
from server.app import LIVENESS_SERVICE
from server.demo import wait_serving

RANK = 'method="one2one.v1.RankingService/Rank"'


def health_status(channel: grpc.Channel, service: str = "") -> int:
    return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status


def stop(proc) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=60)
    except Exception:
        proc.kill()
        proc.wait()
        raise


@pytest.fixture
def own_artifacts(bundle_path, tmp_path) -> Path:
    """A private artifacts directory serving a copy of the session's bundle."""
    root = tmp_path / "artifacts"
    root.mkdir()
    publish_copy(bundle_path, root, "v-first")
    return root


@pytest.fixture(scope="module")
def second_build(shop_files, tmp_path_factory) -> Path:
    """A second, independently built bundle (staged, not yet published anywhere)."""
    staging = tmp_path_factory.mktemp("staging")
    return build(
        shop_files["events"],
        shop_files["items"],
        shop_files["users"],
        staging,
        BuildConfig.load(overrides=SMALL_BUILD),
        show_progress=False,
    )


def test_health_serving_only_once_a_bundle_is_loaded(bundle_path, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    cfg = write_config(tmp_path / "server.toml", reload_interval_seconds=0.2)
    proc, ready = start_one_process(empty, tmp_path, cfg)
    channel = grpc.insecure_channel(f"127.0.0.1:{ready['grpc_port']}")
    try:
        assert health_status(channel) == health_pb2.HealthCheckResponse.NOT_SERVING
        assert health_status(channel, "one2one.v1.RankingService") == health_pb2.HealthCheckResponse.NOT_SERVING
        # Alive though not ready: a liveness probe must not restart a server waiting for its bundle.
        assert health_status(channel, LIVENESS_SERVICE) == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as err:
            ranking_pb2_grpc.RankingServiceStub(channel).Rank(pb.RankRequest(user_id="u1"), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        text = scrape(ready["metrics_port"])
        assert sample(text, "one2one_serving") == 0
        # Nothing published yet is waiting, not a failure.
        assert sample(text, 'one2one_bundle_load_failures_total{reason="missing"}') == 0
        status = admin_pb2_grpc.AdminServiceStub(channel).GetStatus(admin_pb2.GetStatusRequest(), timeout=5)
        assert not status.serving and status.version == ""

        publish_copy(bundle_path, empty, "v-late")
        wait_serving(channel, timeout=30)
        resp = ranking_pb2_grpc.RankingServiceStub(channel).Rank(pb.RankRequest(user_id="u1"), timeout=5)
        assert resp.model_version == "v-late" and len(resp.items) == 10
        text = scrape(ready["metrics_port"])
        assert sample(text, "one2one_serving") == 1
        assert sample(text, 'one2one_bundle_info{version="v-late"}') == 1
        assert sample(text, 'one2one_bundle_reloads_total{result="loaded",trigger="poll"}') == 1
    finally:
        channel.close()
        assert stop(proc) == 0


def test_hot_reload_under_load_fails_no_request(own_artifacts, second_build, tmp_path):
    cfg = write_config(tmp_path / "server.toml", reload_interval_seconds=0.2)
    proc, ready = start_one_process(own_artifacts, tmp_path, cfg)
    target = f"127.0.0.1:{ready['grpc_port']}"
    channel = grpc.insecure_channel(target)
    try:
        wait_serving(channel)
        requests = [pb.RankRequest(user_id=f"u{i}", num_results=10) for i in range(40)] + [
            pb.RankRequest(user_id="nobody", context=pb.Context(session_item_ids=["i1", "i2"]))
        ]
        new_version = second_build.name
        with RankLoad(target, requests, threads=3, max_requests=30000) as load:
            t_start = time.monotonic()
            time.sleep(2.5)
            t_publish = time.monotonic()
            tmp = own_artifacts / f".tmp-{new_version}"
            shutil.copytree(second_build, tmp)
            os.rename(tmp, own_artifacts / new_version)
            set_current(own_artifacts, new_version)
            wait_for(lambda: any(v == new_version for *_, v in load.snapshot()), 30, "the new bundle to serve")
            t_swapped = time.monotonic()
            time.sleep(2.0)
        outcomes = load.snapshot()
        failed = [o for o in outcomes if o[2] != "OK"]
        assert not failed, failed[:5]
        versions = [v for *_, v in outcomes]
        assert "v-first" in versions and new_version in versions
        # Once the swap is seen, no request is served by the old bundle any more than the
        # ones already in flight: every response that started after the swap is new.
        assert all(v == new_version for t0, _, _, v in outcomes if t0 > t_swapped + 0.5)
        # The first half second (connections, first touches of the old bundle) is not "before".
        before = [s for t0, s, _, _ in outcomes if t_start + 0.5 <= t0 < t_publish]
        during = [s for t0, s, _, _ in outcomes if t_publish - 0.1 <= t0 <= t_swapped + 0.5]
        after = [s for t0, s, _, _ in outcomes if t0 > t_swapped + 0.5]
        print(
            f"\nhot reload under load: {len(outcomes)} requests, 0 failed; p99 before swap (after 0.5 s warm-up) "
            f"{percentile(before, 99) * 1e3:.2f} ms (n={len(before)}), during swap "
            f"{percentile(during, 99) * 1e3:.2f} ms (n={len(during)}), after "
            f"{percentile(after, 99) * 1e3:.2f} ms (n={len(after)}); swap seen "
            f"{(t_swapped - t_publish) * 1e3:.0f} ms after CURRENT changed (poll every 200 ms)"
        )
        text = scrape(ready["metrics_port"])
        assert sample(text, f'one2one_bundle_info{{version="{new_version}"}}') == 1
        assert 'one2one_bundle_info{version="v-first"}' not in text
        assert sample(text, 'one2one_bundle_reloads_total{result="loaded",trigger="poll"}') == 1
        assert sample(text, "one2one_bundle_load_duration_seconds") > 0
    finally:
        channel.close()
        assert stop(proc) == 0


def test_corrupt_and_incompatible_bundles_are_refused_and_the_old_one_keeps_serving(own_artifacts, tmp_path):
    cfg = write_config(tmp_path / "server.toml", reload_interval_seconds=0.2)
    proc, ready = start_one_process(own_artifacts, tmp_path, cfg)
    channel = grpc.insecure_channel(f"127.0.0.1:{ready['grpc_port']}")
    stub = ranking_pb2_grpc.RankingServiceStub(channel)
    admin = admin_pb2_grpc.AdminServiceStub(channel)
    port = ready["metrics_port"]
    try:
        wait_serving(channel)
        good = resolve_current(own_artifacts)
        publish_copy(good, own_artifacts, "v-corrupt", mutate=corrupt_an_array)
        wait_for(
            lambda: sample(scrape(port), 'one2one_bundle_load_failures_total{reason="corrupt"}') == 1,
            30,
            "the corrupt bundle to be refused",
        )
        assert stub.Rank(pb.RankRequest(user_id="u2"), timeout=5).model_version == "v-first"
        text = scrape(port)
        assert sample(text, "one2one_bundle_refused") == 1
        assert sample(text, "one2one_serving") == 1
        assert sample(text, 'one2one_bundle_info{version="v-first"}') == 1
        assert health_status(channel) == health_pb2.HealthCheckResponse.SERVING
        # The poll does not re-verify the same broken bundle every 200 ms ...
        time.sleep(1.5)
        assert sample(scrape(port), 'one2one_bundle_load_failures_total{reason="corrupt"}') == 1
        # ... an operator's explicit reload does, and says why it refuses.
        answer = admin.ReloadBundle(admin_pb2.ReloadBundleRequest(), timeout=60)
        assert answer.result == admin_pb2.REFUSED and answer.reason == "corrupt"
        assert "item_popularity.npy" in answer.error and answer.serving_version == "v-first"
        assert sample(scrape(port), 'one2one_bundle_load_failures_total{reason="corrupt"}') == 2

        publish_copy(good, own_artifacts, "v-future", mutate=future_schema)
        answer = admin.ReloadBundle(admin_pb2.ReloadBundleRequest(), timeout=60)
        assert answer.result == admin_pb2.REFUSED and answer.reason == "incompatible"
        assert "schema version 999" in answer.error
        assert stub.Rank(pb.RankRequest(user_id="u2"), timeout=5).model_version == "v-first"

        publish_copy(good, own_artifacts, "v-fixed")
        wait_for(
            lambda: sample(scrape(port), 'one2one_bundle_info{version="v-fixed"}', 0) == 1,
            30,
            "the fixed bundle to serve",
        )
        assert sample(scrape(port), "one2one_bundle_refused") == 0
    finally:
        channel.close()
        assert stop(proc) == 0
    refusals = [
        json.loads(line) for line in (tmp_path / "server.log").read_text().splitlines() if '"refused bundle"' in line
    ]
    assert {r["reason"] for r in refusals} == {"corrupt", "incompatible"}
    assert all(r["level"] == "error" and r["still_serving"] == "v-first" for r in refusals)


def test_sighup_and_admin_reload_without_polling(own_artifacts, bundle_path, tmp_path):
    cfg = write_config(tmp_path / "server.toml", reload_interval_seconds=0, log_level="DEBUG")
    proc, ready = start_one_process(own_artifacts, tmp_path, cfg)
    channel = grpc.insecure_channel(f"127.0.0.1:{ready['grpc_port']}")
    admin = admin_pb2_grpc.AdminServiceStub(channel)
    stub = ranking_pb2_grpc.RankingServiceStub(channel)
    port = ready["metrics_port"]
    try:
        wait_serving(channel)
        publish_copy(bundle_path, own_artifacts, "v-hup")
        assert admin.GetStatus(admin_pb2.GetStatusRequest(), timeout=5).version == "v-first"
        proc.send_signal(signal.SIGHUP)
        wait_for(
            lambda: sample(scrape(port), 'one2one_bundle_reloads_total{result="loaded",trigger="signal"}') == 1,
            30,
            "SIGHUP to reload",
        )
        resp = stub.Rank(pb.RankRequest(user_id="u5"), timeout=5)
        assert resp.model_version == "v-hup"

        publish_copy(bundle_path, own_artifacts, "v-admin")
        answer = admin.ReloadBundle(admin_pb2.ReloadBundleRequest(), timeout=60)
        assert answer.result == admin_pb2.LOADED and answer.version == "v-admin" and answer.seconds > 0
        again = admin.ReloadBundle(admin_pb2.ReloadBundleRequest(), timeout=60)
        assert again.result == admin_pb2.UNCHANGED and again.serving_version == "v-admin"
        status = admin.GetStatus(admin_pb2.GetStatusRequest(), timeout=5)
        assert status.serving and status.version == "v-admin"
        assert status.load_time.seconds > 0 and status.build_time.seconds > 0
        assert status.last_reload.result == admin_pb2.UNCHANGED
    finally:
        channel.close()
        assert stop(proc) == 0
    # Every log line written while handling a Rank carries that request's id.
    lines = [json.loads(line) for line in (tmp_path / "server.log").read_text().splitlines()]
    ranked = [d for d in lines if d.get("msg") == "ranked"]
    assert [d["request_id"] for d in ranked] == [resp.request_id]
    assert ranked[0]["model_version"] == "v-hup"
    assert not [d for d in lines if d.get("msg") in ("listening", "serving bundle") and "request_id" in d]


def test_sigterm_lets_a_slow_in_flight_request_finish_then_exits_zero(own_artifacts, tmp_path):
    # debug_rank_delay_ms holds every Rank for 8 s (test-only setting, off by default);
    # the 5 s notice keeps accepting while health already says NOT_SERVING.
    cfg = write_config(tmp_path / "server.toml", debug_rank_delay_ms=8000, drain_notice_seconds=5.0, drain_seconds=20.0)
    proc, ready = start_one_process(own_artifacts, tmp_path, cfg)
    channel = grpc.insecure_channel(f"127.0.0.1:{ready['grpc_port']}")
    stub = ranking_pb2_grpc.RankingServiceStub(channel)
    port = ready["metrics_port"]
    result: dict = {}
    try:
        wait_serving(channel)

        def call():
            try:
                result["response"] = stub.Rank(pb.RankRequest(user_id="u7", budget_ms=500), timeout=60)
            except grpc.RpcError as exc:
                result["error"] = exc.code()

        caller = threading.Thread(target=call)
        caller.start()
        wait_for(
            lambda: sample(scrape(port), f"one2one_rpc_in_flight_requests{{{RANK}}}", 0) == 1,
            30,
            "the slow request to be in flight",
        )
        proc.send_signal(signal.SIGTERM)
        wait_for(
            lambda: health_status(channel) == health_pb2.HealthCheckResponse.NOT_SERVING,
            4.5,
            "health NOT_SERVING after SIGTERM",
            every=0.05,
        )
        caller.join(timeout=60)
        assert proc.wait(timeout=60) == 0
    finally:
        channel.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "error" not in result, result
    assert result["response"].model_version == "v-first" and len(result["response"].items) == 10
    lines = [json.loads(line) for line in (tmp_path / "server.log").read_text().splitlines()]
    draining = next(d for d in lines if d.get("msg") == "draining")
    assert draining["in_flight"] >= 1
    stopped = next(d for d in lines if d.get("msg") == "stopped")
    assert stopped["in_flight"] == 0


def test_a_request_in_flight_during_a_swap_finishes_on_the_old_bundle(own_artifacts, bundle_path, tmp_path):
    # Every Rank takes the ranker, then waits 2 s (test-only setting) before ranking with it.
    cfg = write_config(tmp_path / "server.toml", reload_interval_seconds=0, debug_rank_delay_ms=2000)
    proc, ready = start_one_process(own_artifacts, tmp_path, cfg)
    channel = grpc.insecure_channel(f"127.0.0.1:{ready['grpc_port']}")
    stub = ranking_pb2_grpc.RankingServiceStub(channel)
    result: dict = {}
    try:
        wait_serving(channel)
        caller = threading.Thread(
            target=lambda: result.update(old=stub.Rank(pb.RankRequest(user_id="u8", budget_ms=500), timeout=60))
        )
        caller.start()
        wait_for(
            lambda: sample(scrape(ready["metrics_port"]), f"one2one_rpc_in_flight_requests{{{RANK}}}", 0) == 1,
            30,
            "the request to be in flight",
        )
        publish_copy(bundle_path, own_artifacts, "v-next")
        answer = admin_pb2_grpc.AdminServiceStub(channel).ReloadBundle(admin_pb2.ReloadBundleRequest(), timeout=60)
        assert answer.result == admin_pb2.LOADED
        in_flight_at_swap = sample(scrape(ready["metrics_port"]), f"one2one_rpc_in_flight_requests{{{RANK}}}", 0)
        caller.join(timeout=60)
        new = stub.Rank(pb.RankRequest(user_id="u8", budget_ms=500), timeout=60)
    finally:
        channel.close()
        assert stop(proc) == 0
    assert in_flight_at_swap == 1, "the swap must happen while the first request is still in flight"
    assert result["old"].model_version == "v-first" and len(result["old"].items) == 10
    assert new.model_version == "v-next"
