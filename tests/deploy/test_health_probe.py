"""deploy/health_probe.py, the Kubernetes probe, against real gRPC health servers over
plain text, TLS and mTLS, with certificates made by openssl for each run."""

from __future__ import annotations

import subprocess
import sys
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from ops_tools import DEPLOY, require_tool

PROBE = DEPLOY / "health_probe.py"
NAME = "one2one-server"  # the name the serving certificate carries (deployment.yaml's --server-name)


def _openssl(*args: str, cwd: Path) -> None:
    out = subprocess.run([require_tool("openssl"), *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr


def _ca(d: Path, name: str) -> None:
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.crt", "-subj", f"/CN={name}", "-days", "1", cwd=d)  # fmt: skip


def _leaf(d: Path, name: str, ca: str, ext: str) -> None:
    (d / f"{name}.ext").write_text(ext)
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=d)  # fmt: skip
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key", "-CAcreateserial",
             "-out", f"{name}.crt", "-days", "1", "-extfile", f"{name}.ext", cwd=d)  # fmt: skip


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    _ca(d, "ca")
    _ca(d, "other-ca")  # trusted by nobody
    _ca(d, "client-ca")
    _leaf(d, "server", "ca", f"subjectAltName=DNS:{NAME}\nextendedKeyUsage=serverAuth\n")
    _leaf(d, "client", "client-ca", "extendedKeyUsage=clientAuth\n")
    _leaf(d, "stranger", "other-ca", "extendedKeyUsage=clientAuth\n")
    return d


def _server(credentials=None):
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    servicer.set("liveness", health_pb2.HealthCheckResponse.SERVING)
    servicer.set("draining", health_pb2.HealthCheckResponse.NOT_SERVING)
    port = (
        server.add_secure_port("127.0.0.1:0", credentials) if credentials else server.add_insecure_port("127.0.0.1:0")
    )
    server.start()
    return server, port


@pytest.fixture(scope="module")
def servers(pki):
    key, crt = (pki / "server.key").read_bytes(), (pki / "server.crt").read_bytes()
    started = {
        "plain": _server(),
        "tls": _server(grpc.ssl_server_credentials([(key, crt)])),
        "mtls": _server(
            grpc.ssl_server_credentials(
                [(key, crt)], root_certificates=(pki / "client-ca.crt").read_bytes(), require_client_auth=True
            )
        ),
    }
    yield {name: port for name, (_, port) in started.items()}
    for server, _ in started.values():
        server.stop(None)


def probe(*args: str) -> tuple[int, str]:
    out = subprocess.run([sys.executable, str(PROBE), *args], capture_output=True, text=True, timeout=60)
    return out.returncode, out.stderr


CASES = {
    # name: (server, args, ok, what the refusal says)
    "plain text, serving": ("plain", [], True, ""),
    "tls, serving": ("tls", ["--ca", "ca.crt", "--server-name", NAME], True, ""),
    "tls, liveness": ("tls", ["--ca", "ca.crt", "--server-name", NAME, "--service", "liveness"], True, ""),
    "tls, not serving": (
        "tls",
        ["--ca", "ca.crt", "--server-name", NAME, "--service", "draining"],
        False,
        "NOT_SERVING",
    ),
    "tls, unknown service": ("tls", ["--ca", "ca.crt", "--server-name", NAME, "--service", "nope"], False, "NOT_FOUND"),
    "tls, wrong CA": ("tls", ["--ca", "other-ca.crt", "--server-name", NAME], False, "UNAVAILABLE"),
    "tls, wrong name": ("tls", ["--ca", "ca.crt", "--server-name", "elsewhere"], False, "UNAVAILABLE"),
    "tls server, plain probe": ("tls", [], False, "UNAVAILABLE"),
    "mtls, client certificate": (
        "mtls",
        ["--ca", "ca.crt", "--server-name", NAME, "--cert", "client.crt", "--key", "client.key"],
        True,
        "",
    ),
    "mtls, no client certificate": ("mtls", ["--ca", "ca.crt", "--server-name", NAME], False, "UNAVAILABLE"),
    "mtls, certificate from another CA": (
        "mtls",
        ["--ca", "ca.crt", "--server-name", NAME, "--cert", "stranger.crt", "--key", "stranger.key"],
        False,
        "UNAVAILABLE",
    ),
    "missing CA file": ("tls", ["--ca", "absent.crt", "--server-name", NAME], False, "cannot set up the channel"),
    "certificate without key": (
        "mtls",
        ["--ca", "ca.crt", "--cert", "client.crt"],
        False,
        "--cert and --key go together",
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_probe(case, servers, pki):
    server, args, ok, says = CASES[case]
    args = [str(pki / a) if a.endswith((".crt", ".key")) else a for a in args]
    code, stderr = probe("--port", str(servers[server]), "--timeout", "5", *args)
    assert code == (0 if ok else 1), stderr
    assert says in stderr
    if ok:
        assert stderr == ""
