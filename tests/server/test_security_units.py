"""The pieces of server.security and server.guard on their own: the secure-by-default rule, the
callers file, bearer headers, the token CLI, files re-read on change, and every method's role."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from tls_certs import make_ca, server_cert, write

from one2one.v1 import admin_pb2, ranking_pb2
from server.config import ServerConfig
from server.guard import OPEN, method_role
from server.security import (
    Callers,
    FileWatch,
    bearer_token,
    check_files,
    exposure_problem,
    hash_token,
    is_loopback,
    parse_callers,
    token_main,
)


@pytest.mark.parametrize(
    "host, loopback",
    [("127.0.0.1", True), ("127.3.4.5", True), ("::1", True), ("[::1]", True), ("localhost", True),
     ("0.0.0.0", False), ("::", False), ("", False), ("10.0.0.7", False), ("one2one.internal", False)],
)  # fmt: skip
def test_loopback(host, loopback):
    assert is_loopback(host) is loopback


def test_secure_by_default_rule():
    open_port = ServerConfig(artifacts="x", host="0.0.0.0")
    assert "refusing to serve on 0.0.0.0:50051 without TLS or caller authentication" in exposure_problem(open_port)
    assert exposure_problem(ServerConfig(artifacts="x")) is None  # loopback
    assert exposure_problem(ServerConfig(artifacts="x", host="0.0.0.0", allow_insecure=True)) is None
    assert exposure_problem(ServerConfig(artifacts="x", host="0.0.0.0", tls_cert_file="c", tls_key_file="k")) is None
    assert exposure_problem(ServerConfig(artifacts="x", host="0.0.0.0", auth_tokens_file="callers.toml")) is None


def test_the_server_refuses_to_start_open_and_says_why_in_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "server", "--artifacts", str(tmp_path), "--host", "0.0.0.0", "--port", "0"],
        capture_output=True,
        text=True,
        timeout=60,
        env={k: v for k, v in os.environ.items() if not k.startswith("ONE2ONE_")},
    )
    assert proc.returncode == 1
    lines = [json.loads(line) for line in proc.stderr.splitlines() if line.startswith("{")]
    assert len(lines) == 1 and lines[0]["level"] == "error"
    assert "without TLS or caller authentication" in lines[0]["msg"] and "allow_insecure" in lines[0]["msg"]


def test_unusable_tls_or_callers_files_stop_the_start_naming_the_file(tmp_path):
    ca = make_ca("ca")
    crt, key = write(tmp_path, "server", server_cert(ca))
    _, other_key = write(tmp_path, "other", server_cert(ca))
    with pytest.raises(ValueError, match="must be PEM and match"):
        check_files(ServerConfig(artifacts="x", tls_cert_file=str(crt), tls_key_file=str(other_key)))
    with pytest.raises(FileNotFoundError, match="missing.key"):
        check_files(ServerConfig(artifacts="x", tls_cert_file=str(crt), tls_key_file=str(tmp_path / "missing.key")))
    check_files(ServerConfig(artifacts="x", tls_cert_file=str(crt), tls_key_file=str(key)))
    bad = tmp_path / "callers.toml"
    bad.write_text('[[callers]]\nname = "a"\nroles = ["rank"]\ntoken_sha256 = "secret-in-clear"\n')
    with pytest.raises(ValueError, match=r"callers\[0\].token_sha256 must be 64 lower-case hex"):
        check_files(ServerConfig(artifacts="x", auth_tokens_file=str(bad)))


def test_settings_that_go_together():
    for settings, message in [
        ({"tls_cert_file": "c"}, "tls_cert_file and tls_key_file go together"),
        ({"require_client_auth": True, "tls_cert_file": "c", "tls_key_file": "k"}, "require_client_auth needs"),
        ({"tls_client_ca_file": "ca", "tls_cert_file": "c", "tls_key_file": "k"}, "only used with require_client"),
        ({"metrics_tls_key_file": "k"}, "metrics_tls_cert_file and metrics_tls_key_file go together"),
        ({"metrics_tls_client_ca_file": "ca"}, "metrics_tls_client_ca_file needs"),
        ({"max_queued_ranks": -1}, "max_concurrent_calls and max_queued_ranks must be >= 0"),
    ]:
        with pytest.raises(ValueError, match=message):
            ServerConfig(artifacts="x", **settings).validate()


def _entry(**fields) -> str:
    return "[[callers]]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in fields.items())


@pytest.mark.parametrize(
    "text, message",
    [
        ("[[callers]\n", "not TOML"),
        ("tokens = 1\n", "unknown key"),
        (_entry(roles=["rank"], token_sha256="a" * 64), r"callers\[0\].name must be a non-empty string"),
        (_entry(name="a", roles=[], token_sha256="a" * 64), r"callers\[0\].roles must be a non-empty list"),
        (_entry(name="a", roles=["root"], token_sha256="a" * 64), r"callers\[0\].roles"),
        (_entry(name="a", roles=["rank"]), "needs token_sha256 or certificate"),
        (_entry(name="a", roles=["rank"], token_sha256="A" * 64), "64 lower-case hex"),
        (_entry(name="a", roles=["rank"], token="x"), "unknown key"),
        (_entry(name="a", roles=["rank"], token_sha256="a" * 64)
         + _entry(name="b", roles=["admin"], token_sha256="a" * 64), r"callers\[1\].token_sha256 is listed twice"),
    ],
)  # fmt: skip
def test_callers_file_errors_name_the_entry_and_field(text, message):
    with pytest.raises(ValueError, match=message):
        parse_callers(text, "callers.toml")


def test_callers_by_token_and_certificate(tmp_path):
    path = tmp_path / "callers.toml"
    path.write_text(
        _entry(name="web", roles=["rank"], token_sha256=hash_token("t-web-0123456789"))
        + _entry(name="web", roles=["rank"], token_sha256=hash_token("t-web-rotated-0123"))  # a rotation in progress
        + _entry(name="ingest", roles=["events"], certificate="ingest.svc")
    )
    callers = Callers(str(path))
    assert callers.by_token("t-web-0123456789").name == "web"
    assert callers.by_token("t-web-rotated-0123").name == "web"
    assert callers.by_token("t-web-012345678") is None and callers.by_token("") is None
    assert callers.by_certificate(("CN-other", "ingest.svc")).roles == {"events"}
    assert callers.by_certificate(()) is None and callers.by_certificate(("web",)) is None


def test_bearer_header_forms():
    assert bearer_token([("authorization", "Bearer abc")]) == "abc"
    assert bearer_token([("x", "y"), ("authorization", "bearer  abc ")]) == "abc"
    assert bearer_token([("authorization", "Basic abc")]) == ""  # present but not a bearer token: bad, not missing
    assert bearer_token([("authorization", "Bearer")]) == ""
    assert bearer_token([("x", "y")]) is None and bearer_token(None) is None


def test_file_watch_keeps_the_last_good_version_and_takes_the_next_good_one(tmp_path):
    path = tmp_path / "f"
    path.write_text("1")
    seen = []

    def parse():
        text = path.read_text()
        if not text.isdigit():
            raise ValueError(f"not a number: {text!r}")
        return int(text)

    watch = FileWatch("test", [str(path)], parse, lambda kind, result: seen.append(result))
    assert watch.value == 1 and not watch.refresh() and seen == []
    path.write_text("22")
    assert watch.refresh() and watch.value == 22
    path.write_text("bad")
    assert not watch.refresh() and watch.value == 22
    assert not watch.refresh()  # the same bad version is not tried (or counted) again
    os.unlink(path)
    assert not watch.refresh() and watch.value == 22
    path.write_text("333")
    assert watch.refresh() and watch.value == 333
    assert seen == ["loaded", "refused", "refused", "loaded"]


def test_token_cli_adds_a_hashed_entry_and_refuses_bad_input(tmp_path, capsys, monkeypatch):
    path = tmp_path / "callers.toml"
    assert token_main(["--name", "web", "--roles", "rank,events", "--file", str(path)]) == 0
    token = capsys.readouterr().out.strip()
    (caller,) = parse_callers(path.read_text(), "f")
    assert caller.name == "web" and caller.roles == {"rank", "events"} and token not in path.read_text()
    assert Callers(str(path)).by_token(token) == caller
    assert path.stat().st_mode & 0o777 == 0o600
    monkeypatch.setattr("sys.stdin", __import__("io").StringIO("an-existing-token-from-a-vault\n"))
    assert token_main(["--name", "ops", "--roles", "admin", "--file", str(path), "--token-stdin"]) == 0
    assert capsys.readouterr().out == ""  # a token the operator gave is not echoed
    assert Callers(str(path)).by_token("an-existing-token-from-a-vault").name == "ops"
    assert token_main(["--name", "x", "--roles", "root", "--file", str(path)]) == 2
    assert "--roles must name some of rank, events, admin" in capsys.readouterr().err
    monkeypatch.setattr("sys.stdin", __import__("io").StringIO("short\n"))
    assert token_main(["--name", "x", "--roles", "rank", "--file", str(path), "--token-stdin"]) == 2


def test_every_served_method_has_a_decided_role():
    roles = {}
    for file in (ranking_pb2, admin_pb2):
        for service in file.DESCRIPTOR.services_by_name.values():
            for m in service.methods:
                roles[f"{service.full_name}/{m.name}"] = method_role(f"{service.full_name}/{m.name}")
    assert roles == {
        "one2one.v1.RankingService/Rank": "rank",
        "one2one.v1.RankingService/RecordEvents": "events",
        "one2one.v1.AdminService/ReloadBundle": "admin",
        "one2one.v1.AdminService/GetStatus": "admin",
    }
    assert method_role("grpc.health.v1.Health/Check") == OPEN
    assert method_role("grpc.health.v1.Health/Watch") == OPEN
    assert method_role("grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo") == "other"
    assert method_role("one2one.v1.RankingService/SomethingNew") == "admin"  # fails closed
