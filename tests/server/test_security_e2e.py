"""Security over a real server on a real port: TLS, mTLS, certificates made at test time, tokens
and roles, refusal metrics over HTTPS, files re-read on change, and a client with the wrong CA.

The server runs with its default worker processes (two on a two-core machine), so the guard
and the credentials are exercised in forked workers sharing the port.
"""

from __future__ import annotations

import signal
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from ops_tools import sample, wait_for, write_config
from tls_certs import issue, make_ca, server_cert, write

from one2one.v1 import admin_pb2, admin_pb2_grpc, ranking_pb2_grpc
from one2one.v1 import ranking_pb2 as pb
from server.demo import start_server
from server.security import hash_token

pytestmark = pytest.mark.slow

RANK_TOKEN = "rank-token-0123456789abcdef"
EVENTS_TOKEN = "events-token-0123456789abcdef"
ADMIN_TOKEN = "admin-token-0123456789abcdef"
RANK_METHOD = "one2one.v1.RankingService/Rank"


def callers_toml(*entries: tuple[str, list[str], str, str]) -> str:
    out = []
    for name, roles, token, cert in entries:
        out.append("[[callers]]")
        out.append(f'name = "{name}"')
        out.append("roles = [" + ", ".join(f'"{r}"' for r in roles) + "]")
        if token:
            out.append(f'token_sha256 = "{hash_token(token)}"')
        if cert:
            out.append(f'certificate = "{cert}"')
    return "\n".join(out) + "\n"


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    server_ca, client_ca, other_ca = make_ca("one2one test server CA"), make_ca("clients CA"), make_ca("stranger CA")
    files = {"server_ca": d / "server_ca.crt", "client_ca": d / "client_ca.crt"}
    files["server_ca"].write_bytes(server_ca.cert_pem)
    files["client_ca"].write_bytes(client_ca.cert_pem)
    files["other_ca"] = d / "other_ca.crt"
    files["other_ca"].write_bytes(other_ca.cert_pem)
    files["server_crt"], files["server_key"] = write(d, "server", server_cert(server_ca))
    for name, ca in (("ranker", client_ca), ("stranger", client_ca), ("forged", other_ca)):
        # "forged" claims the ranker's name but is signed by a CA the server does not trust.
        cn = "ranker" if name == "forged" else name
        files[f"{name}_crt"], files[f"{name}_key"] = write(d, name, issue(ca, cn, client=True))
    return files


def channel_creds(pki, client: str | None = "stranger", ca: str = "server_ca") -> grpc.ChannelCredentials:
    root = Path(pki[ca]).read_bytes()
    if client is None:
        return grpc.ssl_channel_credentials(root)
    return grpc.ssl_channel_credentials(
        root, Path(pki[f"{client}_key"]).read_bytes(), Path(pki[f"{client}_crt"]).read_bytes()
    )


def token(value: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {value}"),)


@pytest.fixture(scope="module")
def secured(artifacts, pki, tmp_path_factory):
    """mTLS required, callers by token and by certificate, metrics over HTTPS with client certs."""
    work = tmp_path_factory.mktemp("secured")
    callers = work / "callers.toml"
    callers.write_text(
        callers_toml(
            ("storefront", ["rank"], RANK_TOKEN, ""),
            ("ingest", ["events"], EVENTS_TOKEN, ""),
            ("ops", ["admin"], ADMIN_TOKEN, ""),
            ("ranker-by-cert", ["rank"], "", "ranker"),
        )
    )
    cfg = write_config(
        work / "server.toml",
        tls_cert_file=str(pki["server_crt"]),
        tls_key_file=str(pki["server_key"]),
        tls_client_ca_file=str(pki["client_ca"]),
        require_client_auth=True,
        auth_tokens_file=str(callers),
        metrics_tls_cert_file=str(pki["server_crt"]),
        metrics_tls_key_file=str(pki["server_key"]),
        metrics_tls_client_ca_file=str(pki["client_ca"]),
        reload_interval_seconds=0,
        health_port=0,
    )
    proc, ready = start_server(artifacts, work, cfg)
    channel = grpc.secure_channel(f"127.0.0.1:{ready['grpc_port']}", channel_creds(pki))
    wait_for(lambda: _serving(channel), what="secured server SERVING")
    yield {"proc": proc, "ready": ready, "channel": channel, "work": work, "callers": callers}
    channel.close()
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)


def _serving(channel) -> bool:
    try:
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status
    except grpc.RpcError:
        return False
    return status == health_pb2.HealthCheckResponse.SERVING


def https_metrics(pki, port: int, client: str | None = "ranker") -> str:
    ctx = ssl.create_default_context(cafile=str(pki["server_ca"]))
    if client:
        ctx.load_cert_chain(str(pki[f"{client}_crt"]), str(pki[f"{client}_key"]))
    return urllib.request.urlopen(f"https://127.0.0.1:{port}/metrics", timeout=10, context=ctx).read().decode()


def rpc_code(call, *args, **kwargs) -> grpc.StatusCode:
    try:
        call(*args, timeout=10, **kwargs)
    except grpc.RpcError as err:
        return err.code()
    return grpc.StatusCode.OK


def test_every_auth_and_role_case(secured, pki):
    ch = secured["channel"]  # a verified client certificate whose name is in no callers entry
    rank = ranking_pb2_grpc.RankingServiceStub(ch).Rank
    record = ranking_pb2_grpc.RankingServiceStub(ch).RecordEvents
    status = admin_pb2_grpc.AdminServiceStub(ch).GetStatus
    reload = admin_pb2_grpc.AdminServiceStub(ch).ReloadBundle
    req = pb.RankRequest(user_id="u1", num_results=3)
    events = pb.RecordEventsRequest(events=[pb.Event(user_id="u1", item_id="i1", event_type="click")])
    cases = [
        # (call, request, metadata, expected)
        (rank, req, (), grpc.StatusCode.UNAUTHENTICATED),  # certificate not listed, no token
        (rank, req, token("not-a-token-of-anyone"), grpc.StatusCode.UNAUTHENTICATED),
        (rank, req, (("authorization", f"Basic {RANK_TOKEN}"),), grpc.StatusCode.UNAUTHENTICATED),
        (rank, req, (("authorization", "Bearer"),), grpc.StatusCode.UNAUTHENTICATED),
        (rank, req, token(RANK_TOKEN + "x"), grpc.StatusCode.UNAUTHENTICATED),
        (rank, req, token(RANK_TOKEN), grpc.StatusCode.OK),
        (rank, req, token(EVENTS_TOKEN), grpc.StatusCode.PERMISSION_DENIED),
        (rank, req, token(ADMIN_TOKEN), grpc.StatusCode.PERMISSION_DENIED),
        (record, events, token(EVENTS_TOKEN), grpc.StatusCode.OK),
        (record, events, token(RANK_TOKEN), grpc.StatusCode.PERMISSION_DENIED),
        (record, events, (), grpc.StatusCode.UNAUTHENTICATED),
        (status, admin_pb2.GetStatusRequest(), token(ADMIN_TOKEN), grpc.StatusCode.OK),
        (status, admin_pb2.GetStatusRequest(), token(RANK_TOKEN), grpc.StatusCode.PERMISSION_DENIED),
        (status, admin_pb2.GetStatusRequest(), (), grpc.StatusCode.UNAUTHENTICATED),
        (reload, admin_pb2.ReloadBundleRequest(), token(EVENTS_TOKEN), grpc.StatusCode.PERMISSION_DENIED),
        (reload, admin_pb2.ReloadBundleRequest(), (), grpc.StatusCode.UNAUTHENTICATED),
    ]
    got = [rpc_code(call, request, metadata=md) for call, request, md, _ in cases]
    assert got == [want for *_, want in cases]

    # The answers never say which part was wrong: one message per code.
    messages = set()
    for md in ((), token("nope-nope-nope-nope"), (("authorization", "Basic x"),)):
        with pytest.raises(grpc.RpcError) as err:
            rank(req, timeout=10, metadata=md)
        messages.add(err.value.details())
    assert messages == {"missing or invalid credentials"}

    # Health stays open for probes, with no credential at all.
    assert _serving(ch)


def test_client_certificate_identity_maps_to_roles(secured, pki):
    port = secured["ready"]["grpc_port"]
    with grpc.secure_channel(f"127.0.0.1:{port}", channel_creds(pki, "ranker")) as ch:
        stub = ranking_pb2_grpc.RankingServiceStub(ch)
        resp = stub.Rank(pb.RankRequest(user_id="u1", num_results=3), timeout=10)
        assert len(resp.items) == 3
        assert rpc_code(stub.RecordEvents, pb.RecordEventsRequest()) == grpc.StatusCode.PERMISSION_DENIED
        # A presented token decides over the certificate: a bad one is refused even here.
        assert rpc_code(stub.Rank, pb.RankRequest(user_id="u1"), metadata=token("bad-bad-bad-bad")) == (
            grpc.StatusCode.UNAUTHENTICATED
        )


@pytest.mark.parametrize(
    "client, ca",
    [
        (None, "server_ca"),  # no client certificate under require_client_auth
        ("forged", "server_ca"),  # a client certificate from a CA the server does not trust
        ("ranker", "other_ca"),  # the client does not trust the server's CA
    ],
)
def test_handshake_refused(secured, pki, client, ca):
    port = secured["ready"]["grpc_port"]
    with grpc.secure_channel(f"127.0.0.1:{port}", channel_creds(pki, client, ca)) as ch:
        code = rpc_code(ranking_pb2_grpc.RankingServiceStub(ch).Rank, pb.RankRequest(), metadata=token(RANK_TOKEN))
    assert code == grpc.StatusCode.UNAVAILABLE


def test_plaintext_client_is_refused(secured):
    with grpc.insecure_channel(f"127.0.0.1:{secured['ready']['grpc_port']}") as ch:
        code = rpc_code(health_pb2_grpc.HealthStub(ch).Check, health_pb2.HealthCheckRequest())
    assert code == grpc.StatusCode.UNAVAILABLE


def test_get_status_names_the_version_not_the_path(secured, artifacts):
    ch = secured["channel"]
    resp = admin_pb2_grpc.AdminServiceStub(ch).GetStatus(
        admin_pb2.GetStatusRequest(), timeout=10, metadata=token(ADMIN_TOKEN)
    )
    assert resp.serving and resp.version
    assert resp.artifacts == ""
    raw = resp.SerializeToString()
    assert str(artifacts).encode() not in raw and str(artifacts.resolve()).encode() not in raw


def test_reflection_is_off_by_default(secured):
    refl = reflection_pb2_grpc.ServerReflectionStub(secured["channel"])
    with pytest.raises(grpc.RpcError) as err:
        list(
            refl.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10, metadata=token(RANK_TOKEN)
            )
        )
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_refusals_are_counted_and_logged_without_the_secret(secured, pki):
    port = secured["ready"]["metrics_port"]
    before = https_metrics(pki, port)
    rank = ranking_pb2_grpc.RankingServiceStub(secured["channel"]).Rank
    secret = "leaked-if-logged-0123456789"
    for _ in range(3):
        rpc_code(rank, pb.RankRequest(), metadata=token(secret))
    rpc_code(rank, pb.RankRequest(), metadata=token(EVENTS_TOKEN))
    rpc_code(rank, pb.RankRequest())

    def delta(reason):
        name = f'one2one_auth_refusals_total{{method="{RANK_METHOD}",reason="{reason}"}}'
        return sample(https_metrics(pki, port), name) - sample(before, name)

    assert delta("bad_token") == 3
    assert delta("wrong_role") == 1
    assert delta("unknown_certificate") == 1
    after = https_metrics(pki, port)
    code = f'one2one_rpc_requests_total{{code="UNAUTHENTICATED",method="{RANK_METHOD}"}}'
    assert sample(after, code) - sample(before, code, default=0) == 4
    log = (secured["work"] / "server.log").read_text()
    assert '"msg": "call refused"' in log and '"caller": "ingest"' in log
    assert secret not in log and EVENTS_TOKEN not in log and hash_token(secret) not in log


def test_metrics_endpoint_serves_https_to_verified_scrapers_only(secured, pki):
    port = secured["ready"]["metrics_port"]
    assert "one2one_serving 1.0" in https_metrics(pki, port)
    with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionError)):
        https_metrics(pki, port, client=None)  # no client certificate
    with pytest.raises((urllib.error.URLError, ConnectionError)):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()


def test_callers_file_is_reread_and_the_cli_stores_only_a_hash(secured, pki):
    callers = secured["callers"]
    rank = ranking_pb2_grpc.RankingServiceStub(secured["channel"]).Rank
    out = subprocess.run(
        [sys.executable, "-m", "server", "token", "--name", "late", "--roles", "rank", "--file", str(callers)],
        capture_output=True,
        text=True,
        check=True,
    )
    new_token = out.stdout.strip()
    assert len(new_token) >= 32 and new_token not in callers.read_text()
    assert hash_token(new_token) in callers.read_text()
    assert callers.stat().st_mode & 0o077 == 0
    # Every worker process looks at the file at each call: no wait. A new channel per try
    # reaches either worker (SO_REUSEPORT spreads connections).
    for _ in range(4):
        with grpc.secure_channel(f"127.0.0.1:{secured['ready']['grpc_port']}", channel_creds(pki)) as ch:
            call = ranking_pb2_grpc.RankingServiceStub(ch).Rank
            assert rpc_code(call, pb.RankRequest(user_id="u1"), metadata=token(new_token)) == grpc.StatusCode.OK
    # Taken out again: refused at once.
    original = callers.read_text().split('[[callers]]\nname = "late"')[0]
    callers.write_text(original)
    wait_for(
        lambda: (
            rpc_code(rank, pb.RankRequest(user_id="u1"), metadata=token(new_token)) == grpc.StatusCode.UNAUTHENTICATED
        )
    )
    # A broken file is refused and the last good version keeps serving.
    refused = 'one2one_security_file_reloads_total{file="callers",result="refused"}'
    before = sample(https_metrics(pki, secured["ready"]["metrics_port"]), refused)
    callers.write_text(original + "[[callers]]\nname = 'x'\nroles = ['root']\n")
    assert rpc_code(rank, pb.RankRequest(user_id="u1"), metadata=token(RANK_TOKEN)) == grpc.StatusCode.OK
    assert sample(https_metrics(pki, secured["ready"]["metrics_port"]), refused) > before
    callers.write_text(original)


def test_plaintext_health_port_serves_probes_and_nothing_else(secured):
    # The kubelet's gRPC probe can do neither TLS nor tokens: health alone, in the clear.
    with grpc.insecure_channel(f"127.0.0.1:{secured['ready']['health_port']}") as ch:
        assert _serving(ch)
        code = rpc_code(ranking_pb2_grpc.RankingServiceStub(ch).Rank, pb.RankRequest(), metadata=token(RANK_TOKEN))
        assert code == grpc.StatusCode.UNIMPLEMENTED
        code = rpc_code(admin_pb2_grpc.AdminServiceStub(ch).GetStatus, admin_pb2.GetStatusRequest())
        assert code == grpc.StatusCode.UNIMPLEMENTED
