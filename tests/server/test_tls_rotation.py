"""Certificate rotation without a restart, as cert-manager does it: the mounted secret's files are
swapped by one symlink rename. New connections get the new certificate; a call in flight on
an old connection finishes; a broken new version is refused and the last good one kept."""

from __future__ import annotations

import signal
import ssl
import threading
import time
import urllib.request

import grpc
import pytest
from ops_tools import sample, wait_for, write_config
from tls_certs import SecretDir, make_ca, server_cert

from one2one.v1 import ranking_pb2 as pb
from one2one.v1 import ranking_pb2_grpc
from server.demo import start_server

pytestmark = pytest.mark.slow

SLOW_RANK_MS = 1500


def rank(port: int, ca_pem: bytes, timeout: float = 10) -> grpc.StatusCode:
    """One Rank on a fresh connection trusting only ``ca_pem``."""
    with grpc.secure_channel(f"127.0.0.1:{port}", grpc.ssl_channel_credentials(ca_pem)) as ch:
        try:
            ranking_pb2_grpc.RankingServiceStub(ch).Rank(pb.RankRequest(user_id="u1", num_results=2), timeout=timeout)
        except grpc.RpcError as err:
            return err.code()
    return grpc.StatusCode.OK


def scrape_https(port: int, ca_file: str) -> str:
    ctx = ssl.create_default_context(cafile=ca_file)
    return urllib.request.urlopen(f"https://127.0.0.1:{port}/metrics", timeout=10, context=ctx).read().decode()


def test_rotation_reaches_new_connections_and_spares_calls_in_flight(artifacts, tmp_path):
    old_ca, new_ca = make_ca("CA before rotation"), make_ca("CA after rotation")
    secret = SecretDir(tmp_path / "tls")
    old, new = server_cert(old_ca), server_cert(new_ca)
    secret.publish({"tls.crt": old.cert_pem, "tls.key": old.key_pem})
    (tmp_path / "old_ca.crt").write_bytes(old_ca.cert_pem)
    (tmp_path / "new_ca.crt").write_bytes(new_ca.cert_pem)
    cfg = write_config(
        tmp_path / "server.toml",
        tls_cert_file=secret.path("tls.crt"),
        tls_key_file=secret.path("tls.key"),
        metrics_tls_cert_file=secret.path("tls.crt"),
        metrics_tls_key_file=secret.path("tls.key"),
        # Every Rank takes this long: one is still in flight when the files change.
        debug_rank_delay_ms=SLOW_RANK_MS,
        max_budget_ms=SLOW_RANK_MS + 1000,
        reload_interval_seconds=0,
    )
    proc, ready = start_server(artifacts, tmp_path, cfg)
    port, mport = ready["grpc_port"], ready["metrics_port"]
    try:
        assert rank(port, old_ca.cert_pem) == grpc.StatusCode.OK
        assert "one2one_serving" in scrape_https(mport, str(tmp_path / "old_ca.crt"))

        # A call in flight on a connection made with the old certificate...
        channel = grpc.secure_channel(f"127.0.0.1:{port}", grpc.ssl_channel_credentials(old_ca.cert_pem))
        stub = ranking_pb2_grpc.RankingServiceStub(channel)
        stub.Rank(pb.RankRequest(user_id="u2", num_results=2), timeout=10)  # connected
        result: dict = {}

        def in_flight():
            t0 = time.monotonic()
            try:
                result["resp"] = stub.Rank(
                    pb.RankRequest(user_id="u3", num_results=2, budget_ms=SLOW_RANK_MS + 500), timeout=10
                )
            except grpc.RpcError as err:
                result["error"] = err.code()
            result["seconds"] = time.monotonic() - t0

        t = threading.Thread(target=in_flight)
        t.start()
        in_flight_rank = 'one2one_rpc_in_flight_requests{method="one2one.v1.RankingService/Rank"}'
        wait_for(
            lambda: sample(scrape_https(mport, str(tmp_path / "old_ca.crt")), in_flight_rank) >= 1,
            what="the slow call on the server",
            every=0.02,
        )
        # ...while the secret is swapped, as the kubelet does for cert-manager.
        secret.publish({"tls.crt": new.cert_pem, "tls.key": new.key_pem})
        # New connections, to whichever worker the kernel picks: the new certificate only.
        for _ in range(4):
            assert rank(port, new_ca.cert_pem) == grpc.StatusCode.OK
            assert rank(port, old_ca.cert_pem, timeout=5) == grpc.StatusCode.UNAVAILABLE
        t.join(timeout=20)
        assert "error" not in result and len(result["resp"].items) == 2
        assert result["seconds"] >= SLOW_RANK_MS / 1000
        # The old connection stays up for its next call too (rotation closes nothing).
        assert len(stub.Rank(pb.RankRequest(user_id="u2", num_results=2), timeout=10).items) == 2
        channel.close()

        # The metrics endpoint rotated with its files as well.
        text = scrape_https(mport, str(tmp_path / "new_ca.crt"))
        with pytest.raises(Exception, match="CERTIFICATE_VERIFY_FAILED"):
            scrape_https(mport, str(tmp_path / "old_ca.crt"))
        assert sample(text, 'one2one_security_file_reloads_total{file="tls",result="loaded"}') >= 1

        # A broken version (a key that does not match) is refused; the last good one serves.
        secret.publish({"tls.crt": new.cert_pem, "tls.key": old.key_pem})
        for _ in range(3):
            assert rank(port, new_ca.cert_pem) == grpc.StatusCode.OK
        text = scrape_https(mport, str(tmp_path / "new_ca.crt"))
        assert sample(text, 'one2one_security_file_reloads_total{file="tls",result="refused"}') >= 1
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    log = (tmp_path / "server.log").read_text()
    assert "new tls files refused; keeping the last good version" in log
