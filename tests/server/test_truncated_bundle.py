"""A truncated bundle (an array cut short, as an interrupted copy leaves it) is refused while the
old bundle keeps serving, and counted (issue 22; the flipped-byte case is in test_ops_lifecycle)."""

from __future__ import annotations

import signal
from pathlib import Path

import grpc
from ops_tools import publish_copy, sample, scrape, start_one_process, wait_for, write_config

from one2one.v1 import admin_pb2, admin_pb2_grpc, ranking_pb2_grpc
from one2one.v1 import ranking_pb2 as pb
from server.demo import wait_serving


def truncate_an_array(path: Path) -> None:
    target = path / "item_popularity.npy"
    data = target.read_bytes()
    target.write_bytes(data[: len(data) // 2])


def test_truncated_bundle_is_refused_counted_and_the_old_one_serves(bundle_path, tmp_path):
    root = tmp_path / "artifacts"
    root.mkdir()
    publish_copy(bundle_path, root, "v-first")
    cfg = write_config(tmp_path / "server.toml", reload_interval_seconds=0)
    proc, ready = start_one_process(root, tmp_path, cfg)
    channel = grpc.insecure_channel(f"127.0.0.1:{ready['grpc_port']}")
    try:
        wait_serving(channel)
        publish_copy(bundle_path, root, "v-truncated", mutate=truncate_an_array)
        answer = admin_pb2_grpc.AdminServiceStub(channel).ReloadBundle(admin_pb2.ReloadBundleRequest(), timeout=60)
        assert answer.result == admin_pb2.REFUSED and answer.reason == "corrupt", answer
        assert "item_popularity.npy" in answer.error and answer.serving_version == "v-first"
        stub = ranking_pb2_grpc.RankingServiceStub(channel)
        assert stub.Rank(pb.RankRequest(user_id="u2"), timeout=5).model_version == "v-first"
        wait_for(
            lambda: sample(scrape(ready["metrics_port"]), 'one2one_bundle_load_failures_total{reason="corrupt"}') == 1,
            10,
            "the refusal to be counted",
        )
        assert sample(scrape(ready["metrics_port"]), "one2one_bundle_refused") == 1
    finally:
        channel.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
