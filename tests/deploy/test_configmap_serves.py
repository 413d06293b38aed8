"""The Kubernetes ConfigMap's server.toml runs the real server: every Secret the Deployment mounts
is made for real at test time (CAs, the serving certificate, the callers file) and laid out
where the mounts put it, and the settings pointing at those files are kept as written, apart
from the mount root. Only what a test machine must change is changed: loopback instead of
0.0.0.0 (tests bind 127.0.0.1 only; tests/deploy/test_k8s_manifests.py checks that the
written host passes the secure-by-default rule), free ports, the test bundle, a temporary
event log. Then the server is called the way the cluster would call it: the kubelet's
plaintext health probe, a caller over mTLS with a token, a caller known by its
certificate, a caller without a client certificate, Prometheus over HTTPS with and
without a client certificate."""

from __future__ import annotations

import json
import signal
import socket
import ssl
import tomllib
from pathlib import Path, PurePosixPath

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from ops_tools import DEPLOY, wait_for
from tls_certs import Issued, issue, make_ca

from one2one.v1 import admin_pb2, admin_pb2_grpc, ranking_pb2_grpc
from one2one.v1 import ranking_pb2 as pb
from server.app import LIVENESS_SERVICE
from server.demo import start_server
from server.security import hash_token

pytestmark = pytest.mark.slow

K8S = DEPLOY / "k8s"
SERVICE_NAME = "one2one-server"  # the name the serving certificate carries (docs/operations.md)
RANK_TOKEN = "storefront-token-0123456789abcdef"


def _manifests() -> dict[tuple[str, str], dict]:
    out = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                out[(doc["kind"], doc["metadata"]["name"])] = doc
    return out


def _mounted_secret_files(pod: dict) -> dict[str, tuple[str, str]]:
    """Path in the container -> (Secret, key), for every file a mounted Secret provides."""
    volumes = {v["name"]: v for v in pod["volumes"]}
    out = {}
    for mount in pod["containers"][0]["volumeMounts"]:
        vol = volumes[mount["name"]]
        sources = [s["secret"] for s in vol.get("projected", {}).get("sources", []) if "secret" in s]
        if "secret" in vol:
            sources.append({"name": vol["secret"]["secretName"], "items": vol["secret"]["items"]})
        for src in sources:
            for item in src["items"]:
                out[str(PurePosixPath(mount["mountPath"]) / item["path"])] = (src["name"], item["key"])
    return out


class Cluster:
    """The CAs and certificates a cluster's cert-manager would hold for one2one and its callers."""

    def __init__(self, root: Path):
        self.server_ca, self.client_ca = make_ca("cluster issuer"), make_ca("one2one callers")
        self.server = issue(self.server_ca, SERVICE_NAME, dns=(SERVICE_NAME, f"{SERVICE_NAME}-headless"))
        self.storefront = issue(self.client_ca, "storefront", client=True)
        self.ops = issue(self.client_ca, "ops-console", client=True)
        self.scraper = issue(self.client_ca, "prometheus", client=True)
        self.root = root
        callers = (
            f'[[callers]]\nname = "storefront"\nroles = ["rank"]\ntoken_sha256 = "{hash_token(RANK_TOKEN)}"\n\n'
            '[[callers]]\nname = "ops"\nroles = ["admin"]\ncertificate = "ops-console"\n'
        )
        # Each Secret's keys, as deployment.yaml's volumes name them.
        self.secrets = {
            ("one2one-server-tls", "tls.crt"): self.server.cert_pem,
            ("one2one-server-tls", "tls.key"): self.server.key_pem,
            ("one2one-server-tls", "ca.crt"): self.server_ca.cert_pem,
            ("one2one-client-ca", "ca.crt"): self.client_ca.cert_pem,
            ("one2one-auth-tokens", "tokens"): callers.encode(),
        }

    def mount(self, files: dict[str, tuple[str, str]]) -> None:
        for path, secret_key in files.items():
            assert secret_key in self.secrets, f"the Deployment mounts {secret_key}, which this test does not make"
            local = self.root / path.lstrip("/")
            local.parent.mkdir(parents=True, exist_ok=True)
            local.write_bytes(self.secrets[secret_key])
            local.chmod(0o440)

    def creds(self, client: Issued | None) -> grpc.ChannelCredentials:
        if client is None:
            return grpc.ssl_channel_credentials(self.server_ca.cert_pem)
        return grpc.ssl_channel_credentials(self.server_ca.cert_pem, client.key_pem, client.cert_pem)


def _channel(cluster: Cluster, port: int, client: Issued | None) -> grpc.Channel:
    # Callers reach the Service by name; the certificate names the Service, not 127.0.0.1.
    return grpc.secure_channel(
        f"127.0.0.1:{port}", cluster.creds(client), options=[("grpc.ssl_target_name_override", SERVICE_NAME)]
    )


def _code(call, request, **kwargs) -> grpc.StatusCode:
    try:
        call(request, timeout=10, **kwargs)
    except grpc.RpcError as err:
        return err.code()
    return grpc.StatusCode.OK


def _health(channel: grpc.Channel, service: str) -> int | None:
    try:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
    except grpc.RpcError:
        return None
    return reply.status


def _scrape(cluster: Cluster, port: int, client: Issued | None) -> bytes:
    ctx = ssl.create_default_context(cadata=cluster.server_ca.cert_pem.decode())
    if client is not None:
        cert, key = cluster.root / "scraper.crt", cluster.root / "scraper.key"
        cert.write_bytes(client.cert_pem)
        key.write_bytes(client.key_pem)
        ctx.load_cert_chain(str(cert), str(key))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname=SERVICE_NAME) as tls:
            tls.sendall(f"GET /metrics HTTP/1.0\r\nHost: {SERVICE_NAME}\r\n\r\n".encode())
            chunks = []
            while chunk := tls.recv(65536):
                chunks.append(chunk)
    return b"".join(chunks)


def test_the_server_starts_from_the_configmap_and_serves_as_the_cluster_calls_it(artifacts, tmp_path):
    objects = _manifests()
    settings = tomllib.loads(objects[("ConfigMap", "one2one-server")]["data"]["server.toml"])["server"]
    files = _mounted_secret_files(objects[("Deployment", "one2one-server")]["spec"]["template"]["spec"])
    cluster = Cluster(tmp_path / "pod")
    cluster.mount(files)

    pointed = {k for k, v in settings.items() if isinstance(v, str) and v in files}
    assert {"tls_cert_file", "tls_key_file", "tls_client_ca_file", "auth_tokens_file"} <= pointed
    for key in pointed:
        settings[key] = str(cluster.root / settings[key].lstrip("/"))
    settings.update(
        host="127.0.0.1",
        metrics_host="127.0.0.1",
        health_port=0,
        artifacts=str(artifacts),
        event_log_dir=str(tmp_path / "events"),
    )
    config = tmp_path / "server.toml"
    config.write_text("[server]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in settings.items()))
    # start_server adds --port 0 and --metrics-port 0.
    proc, ready = start_server(artifacts, tmp_path, ["--config", str(config)])
    try:
        # The kubelet's probes: plain text on health_port, no credential.
        probe = grpc.insecure_channel(f"127.0.0.1:{ready['health_port']}")
        serving = health_pb2.HealthCheckResponse.SERVING
        wait_for(lambda: _health(probe, "") == serving, timeout=60, what="readiness on health_port")
        assert _health(probe, LIVENESS_SERVICE) == serving
        # That port serves health and nothing else.
        assert _code(ranking_pb2_grpc.RankingServiceStub(probe).Rank, pb.RankRequest(user_id="u1")) == (
            grpc.StatusCode.UNIMPLEMENTED
        )
        probe.close()

        port = ready["grpc_port"]
        with _channel(cluster, port, cluster.storefront) as ch:
            rank = ranking_pb2_grpc.RankingServiceStub(ch).Rank
            metadata = (("authorization", f"Bearer {RANK_TOKEN}"),)
            reply = rank(pb.RankRequest(user_id="u1", num_results=3), timeout=10, metadata=metadata)
            assert len(reply.items) == 3
            # The storefront's certificate names no caller: without its token it is nobody.
            assert _code(rank, pb.RankRequest(user_id="u1")) == grpc.StatusCode.UNAUTHENTICATED
            assert _code(
                admin_pb2_grpc.AdminServiceStub(ch).GetStatus, admin_pb2.GetStatusRequest(), metadata=metadata
            ) == (grpc.StatusCode.PERMISSION_DENIED)
            # reflection = false: not served.
            listing = reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10, metadata=metadata
            )
            with pytest.raises(grpc.RpcError) as err:
                list(listing)
            assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
        with _channel(cluster, port, cluster.ops) as ch:
            # Known by its certificate alone (mTLS), with the admin role; the status names no path.
            status = admin_pb2_grpc.AdminServiceStub(ch).GetStatus(admin_pb2.GetStatusRequest(), timeout=10)
            assert status.serving and status.version and not status.artifacts and str(artifacts) not in str(status)
        # require_client_auth: no client certificate, no connection.
        with _channel(cluster, port, None) as ch:
            assert _code(ranking_pb2_grpc.RankingServiceStub(ch).Rank, pb.RankRequest(user_id="u1")) == (
                grpc.StatusCode.UNAVAILABLE
            )
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            assert _health(ch, "") is None  # plain text on the TLS port

        # Prometheus scrapes over HTTPS with a client certificate the client CA signed.
        scraped = _scrape(cluster, ready["metrics_port"], cluster.scraper)
        assert scraped.startswith(b"HTTP/1.0 200") and b"one2one_rpc_requests_total" in scraped
        try:
            answer = _scrape(cluster, ready["metrics_port"], None)
        except (ssl.SSLError, ConnectionError):
            answer = b""  # the handshake's alert (TLS 1.3 sends it after the client's Finished)
        assert not answer.startswith(b"HTTP/1.0 200"), "metrics served without a client certificate"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
