"""Transport security and callers: TLS/mTLS credentials that follow their files, the callers
file (hashed tokens and certificate identities with their roles), the secure-by-default
check, TLS on the metrics endpoint, and ``python -m server token``."""

from __future__ import annotations

import argparse
import hashlib
import hmac
import ipaddress
import logging
import os
import re
import secrets
import ssl
import sys
import tempfile
import threading
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from server.config import ServerConfig

if TYPE_CHECKING:  # imported where used: the supervisor loads this module before it forks
    import grpc

log = logging.getLogger("server.security")

ROLES = ("rank", "events", "admin")
_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
# Called by FileWatch after each reload attempt with (file kind, "loaded" or "refused");
# server.metrics counts them (kept out of here so the supervisor process imports no metric).
ReloadHook = Callable[[str, str], None]


def _no_hook(kind: str, result: str) -> None:
    return None


# -- secure by default ----------------------------------------------------------------------


def is_loopback(host: str) -> bool:
    """Whether ``host`` binds only this machine's loopback interface ("localhost" counts)."""
    if host.strip("[]").lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # any other name may resolve to a reachable address


def exposure_problem(config: ServerConfig) -> str | None:
    """Why the server must not start with ``config`` (None: it may).

    Reachable from other machines with neither TLS nor caller authentication, anyone who
    can reach the port could rank, write events for any customer and reload bundles.
    ``allow_insecure`` is the explicit, logged way to say that is intended.
    """
    if is_loopback(config.host) or config.tls_enabled or config.auth_enabled or config.allow_insecure:
        return None
    return (
        f"refusing to serve on {config.host}:{config.port} without TLS or caller authentication: "
        "set tls_cert_file and tls_key_file, auth_tokens_file or require_client_auth "
        "(docs/operations.md, Security), or allow_insecure = true to accept an open port"
    )


def log_exposure(config: ServerConfig) -> None:
    """One line saying how callers are checked when the port is reachable from elsewhere."""
    if is_loopback(config.host):
        return
    if not (config.tls_enabled or config.auth_enabled):
        log.warning(
            "serving without TLS or caller authentication on a non-loopback address (allow_insecure)",
            extra={"host": config.host},
        )
    elif not config.auth_enabled:
        log.warning(
            "TLS without caller authentication: whoever reaches the port may call every method, admin too",
            extra={"host": config.host},
        )


# -- files that change under a running server --------------------------------------------------


def _signature(paths: Sequence[str]) -> tuple:
    """What changes when any of ``paths`` is rewritten, replaced by rename or re-pointed by a
    symlink swap (Kubernetes secret volumes, cert-manager): stat follows the links."""
    out = []
    for p in paths:
        st = os.stat(p)
        out.append((st.st_ino, st.st_dev, st.st_size, st.st_mtime_ns))
    return tuple(out)


class FileWatch:
    """Re-reads a set of files when they change and keeps the last good parse.

    ``parse`` reads the files and returns the parsed value, raising ``ValueError`` or
    ``OSError`` when they are not usable; a bad new version is logged, counted and
    ignored (the last good one stays), and tried again once the files change again.
    The files' signature is taken before and after parsing: a version being written
    while it was read is not taken, so a half-written file is never used.

    Parameters
    ----------
    kind : str
        What the files are ("tls", "metrics_tls", "callers"), for logs and metrics.
    paths : sequence of str
        The files.
    parse : callable
        Reads ``paths`` and returns the parsed value.
    on_reload : callable, optional
        Called with (kind, "loaded" | "refused") after each attempt to take a new version.

    Raises
    ------
    ValueError, OSError
        The first version is unusable (raised from the constructor: the server must not
        start on files it cannot use).
    """

    def __init__(self, kind: str, paths: Sequence[str], parse: Callable[[], object], on_reload: ReloadHook = _no_hook):
        self.kind, self.paths, self._parse, self._on_reload = kind, tuple(paths), parse, on_reload
        self._lock = threading.Lock()
        self._signature = _signature(self.paths)
        self.value = parse()
        if _signature(self.paths) != self._signature:
            raise ValueError(f"{kind} files changed while being read at start: {', '.join(self.paths)}")
        self._refused: tuple | None = None

    def refresh(self) -> bool:
        """Take a new version if the files changed; True when one was taken."""
        try:
            sig = _signature(self.paths)
        except OSError as exc:
            # Mid-swap (a link briefly dangling) or removed: keep serving what was read.
            if self._refused != ("missing",):
                self._refused = ("missing",)
                log.error("cannot read %s files; keeping the last good version", self.kind, extra={"error": str(exc)})
                self._on_reload(self.kind, "refused")
            return False
        if sig == self._signature:
            self._refused = None
            return False
        if sig == self._refused:
            return False
        with self._lock:
            if sig == self._signature:
                return False
            try:
                value = self._parse()
                if _signature(self.paths) != sig:
                    return False  # still being written: the next look takes the finished version
            except (ValueError, OSError, ssl.SSLError) as exc:
                self._refused = sig
                log.error(
                    "new %s files refused; keeping the last good version",
                    self.kind,
                    extra={"files": list(self.paths), "error": str(exc)},
                )
                self._on_reload(self.kind, "refused")
                return False
            self.value, self._signature, self._refused = value, sig, None
        log.info("%s files reloaded", self.kind, extra={"files": list(self.paths)})
        self._on_reload(self.kind, "loaded")
        return True


# -- TLS for the gRPC port ------------------------------------------------------------------------


def _no_password() -> bytes:
    raise ValueError("encrypted private keys are not supported; mount the key unencrypted (mode 0400)")


def check_key_pair(cert_file: str, key_file: str, client_ca_file: str = "") -> None:
    """Raise ``ssl.SSLError``/``OSError``/``ValueError`` unless the certificate chain and key
    load and belong together (and the client CA bundle, if given, loads)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert_file, key_file, password=_no_password)
    if client_ca_file:
        ctx.load_verify_locations(cafile=client_ca_file)


def _read_tls(cert_file: str, key_file: str, client_ca_file: str) -> tuple[bytes, bytes, bytes | None]:
    cert, key = Path(cert_file).read_bytes(), Path(key_file).read_bytes()
    ca = Path(client_ca_file).read_bytes() if client_ca_file else None
    try:
        check_key_pair(cert_file, key_file, client_ca_file)
    except ssl.SSLError as exc:
        raise ValueError(
            f"TLS files {cert_file}, {key_file}{', ' + client_ca_file if client_ca_file else ''} unusable "
            f"(certificate and key must be PEM and match): {exc}"
        ) from None
    return cert, key, ca


def grpc_server_credentials(config: ServerConfig, on_reload: ReloadHook = _no_hook) -> grpc.ServerCredentials:
    """TLS (mTLS with ``require_client_auth``) credentials that follow their files.

    gRPC asks the fetcher for the certificate configuration at each new connection's
    handshake; it answers None (keep the current one) unless the files changed, and then
    the new certificate, key and client CA. Connections already open, and their calls in
    flight, keep the ones they were made with.

    Raises
    ------
    ValueError, OSError
        The files are missing, unreadable, not PEM, or the key does not match.
    """
    import grpc

    ca_file = config.tls_client_ca_file if config.require_client_auth else ""
    paths = [config.tls_cert_file, config.tls_key_file] + ([ca_file] if ca_file else [])
    watch = FileWatch("tls", paths, lambda: _read_tls(config.tls_cert_file, config.tls_key_file, ca_file), on_reload)

    def configuration(files: tuple[bytes, bytes, bytes | None]):
        cert, key, ca = files
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)

    def fetch():
        return configuration(watch.value) if watch.refresh() else None  # type: ignore[arg-type]

    return grpc.dynamic_ssl_server_credentials(
        configuration(watch.value),  # type: ignore[arg-type]
        fetch,
        require_client_authentication=config.require_client_auth,
    )


def check_files(config: ServerConfig) -> None:
    """Read every TLS and callers file the configuration names, as the server will.

    Run once before serving (and before forking workers), so a missing or bad file stops
    the start with one clear error instead of a worker failing, and being replaced, in a loop.

    Raises
    ------
    ValueError, OSError
        Naming the file and what is wrong with it.
    """
    if config.tls_enabled:
        _read_tls(config.tls_cert_file, config.tls_key_file, config.tls_client_ca_file)
    if config.metrics_tls_enabled:
        _read_tls(config.metrics_tls_cert_file, config.metrics_tls_key_file, config.metrics_tls_client_ca_file)
    if config.auth_tokens_file:
        parse_callers(Path(config.auth_tokens_file).read_text(), config.auth_tokens_file)


def peer_identities(context: grpc.ServicerContext) -> tuple[str, ...]:
    """The verified client certificate's subject common name and subject alternative names
    (empty without a verified client certificate, i.e. without ``require_client_auth``)."""
    auth = context.auth_context() or {}
    names = [*auth.get("x509_common_name", ()), *auth.get("x509_subject_alternative_name", ())]
    return tuple(n.decode("utf-8", "replace") for n in names)


# -- callers: tokens and certificate identities with roles --------------------------------------------


@dataclass(frozen=True)
class Caller:
    """One entry of the callers file: who, how they prove it, what they may call."""

    name: str
    roles: frozenset[str]
    token_sha256: bytes | None = None  # the digest itself (32 bytes)
    certificate: str = ""


def hash_token(token: str) -> str:
    """The hex SHA-256 the callers file stores for ``token``."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def parse_callers(text: str, source: str) -> tuple[Caller, ...]:
    """The callers of a callers file (TOML, ``[[callers]]`` tables).

    Raises
    ------
    ValueError
        Naming the entry (by position) and the field that is wrong.
    """
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{source}: not TOML: {exc}") from None
    unknown_top = set(doc) - {"callers"}
    if unknown_top:
        raise ValueError(f"{source}: unknown key(s) {sorted(unknown_top)}; the file holds [[callers]] tables only")
    entries = doc.get("callers", [])
    if not isinstance(entries, list):
        raise ValueError(f"{source}: callers must be an array of tables ([[callers]])")
    out: list[Caller] = []
    seen_tokens: set[str] = set()
    for i, entry in enumerate(entries):
        where = f"{source}: callers[{i}]"
        if not isinstance(entry, dict):
            raise ValueError(f"{where} must be a table")
        extra = set(entry) - {"name", "roles", "token_sha256", "certificate"}
        if extra:
            raise ValueError(f"{where}: unknown key(s) {sorted(extra)}")
        name = entry.get("name")
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"{where}.name must be a non-empty string")
        roles = entry.get("roles")
        if not isinstance(roles, list) or not roles or any(r not in ROLES for r in roles):
            raise ValueError(f"{where}.roles must be a non-empty list of {', '.join(ROLES)}; got {roles!r}")
        token = entry.get("token_sha256", "")
        cert = entry.get("certificate", "")
        if not isinstance(token, str) or (token and not _SHA256_HEX.match(token)):
            raise ValueError(
                f"{where}.token_sha256 must be 64 lower-case hex digits (python -m server token writes it), "
                "never the token itself"
            )
        if not isinstance(cert, str):
            raise ValueError(f"{where}.certificate must be a string (a client certificate's CN or SAN)")
        if not token and not cert:
            raise ValueError(f"{where} ({name}) needs token_sha256 or certificate")
        if token in seen_tokens:
            raise ValueError(f"{where}.token_sha256 is listed twice; each token belongs to one caller")
        if token:
            seen_tokens.add(token)
        out.append(Caller(name, frozenset(roles), bytes.fromhex(token) if token else None, cert.strip()))
    return tuple(out)


class Callers:
    """The callers file, re-read when it changes (at most one ``stat`` per call).

    Parameters
    ----------
    path : str
        The callers file (``auth_tokens_file``).
    on_reload : callable, optional
        See :class:`FileWatch`.
    """

    def __init__(self, path: str, on_reload: ReloadHook = _no_hook):
        self._watch = FileWatch("callers", [path], lambda: parse_callers(Path(path).read_text(), path), on_reload)

    @property
    def callers(self) -> tuple[Caller, ...]:
        self._watch.refresh()
        return self._watch.value  # type: ignore[return-value]

    def by_token(self, token: str) -> Caller | None:
        """The caller ``token`` belongs to, or None.

        Compared in constant time over the digests of every entry, with no early exit, so
        the time taken says nothing about which entry, or how much of one, matched.
        """
        digest = hashlib.sha256(token.encode("utf-8")).digest()
        found = None
        for caller in self.callers:
            if caller.token_sha256 is not None and hmac.compare_digest(digest, caller.token_sha256):
                found = caller
        return found

    def by_certificate(self, identities: Sequence[str]) -> Caller | None:
        """The first caller whose ``certificate`` is one of the client certificate's names."""
        if not identities:
            return None
        names = set(identities)
        return next((c for c in self.callers if c.certificate and c.certificate in names), None)


def bearer_token(metadata: Sequence[tuple[str, str | bytes]] | None) -> str | None:
    """The token of an ``authorization: Bearer <token>`` header; "" when the header is there but
    malformed (that is a bad credential, not a missing one); None without the header."""
    for key, value in metadata or ():
        if key == "authorization":
            text = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
            scheme, _, token = text.strip().partition(" ")
            return token.strip() if scheme.lower() == "bearer" else ""
    return None


# -- TLS for the metrics endpoint ----------------------------------------------------------


def start_metrics_server(config: ServerConfig, registry=None, on_reload: ReloadHook = _no_hook) -> int:
    """Serve /metrics on ``metrics_host:metrics_port`` (TLS with ``metrics_tls_*``); returns the port.

    Under TLS a server-name callback runs at each handshake and hands the connection the
    newest good certificate, so rotated files serve new scrapes without a restart.
    """
    from prometheus_client import REGISTRY, start_http_server

    registry = REGISTRY if registry is None else registry
    if not config.metrics_tls_enabled:
        httpd, _ = start_http_server(config.metrics_port, addr=config.metrics_host, registry=registry)
        return httpd.server_port
    cert, key, ca = config.metrics_tls_cert_file, config.metrics_tls_key_file, config.metrics_tls_client_ca_file

    def context() -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(cert, key, password=_no_password)
        if ca:
            ctx.load_verify_locations(cafile=ca)
            ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx

    watch = FileWatch("metrics_tls", [cert, key] + ([ca] if ca else []), context, on_reload)
    httpd, _ = start_http_server(
        config.metrics_port,
        addr=config.metrics_host,
        registry=registry,
        certfile=cert,
        keyfile=key,
        client_cafile=ca or None,
        client_auth_required=bool(ca),
        tls_min_version=ssl.TLSVersion.TLSv1_2,
    )

    def pick_certificate(sock: ssl.SSLObject, _server_name: str | None, _ctx: ssl.SSLContext) -> None:
        watch.refresh()
        sock.context = watch.value  # type: ignore[assignment]

    httpd.socket.context.sni_callback = pick_certificate  # type: ignore[attr-defined]
    return httpd.server_port


# -- python -m server token -----------------------------------------------------------------------


def _append_entry(path: Path, entry: str) -> None:
    """Add ``entry`` to the callers file atomically (a server re-reading it never sees half)."""
    old = path.read_text() if path.exists() else "# one2one callers: python -m server token adds entries.\n"
    new = old + ("" if old.endswith("\n") else "\n") + entry
    parse_callers(new, str(path))  # never write a file the server would refuse
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(new)
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def token_main(argv: list[str]) -> int:
    """``python -m server token --name NAME --roles rank,events --file callers.toml``.

    Makes a new random token (or hashes one read from stdin with ``--token-stdin``), adds
    its SHA-256 with the caller's name and roles to the callers file, and prints the token
    itself on stdout once: the file never holds it.
    """
    p = argparse.ArgumentParser(
        prog="python -m server token", description="Add a caller's bearer token (stored hashed) to a callers file."
    )
    p.add_argument("--name", required=True, help="who the caller is (logged on refusals; never the token)")
    p.add_argument("--roles", required=True, help=f"comma-separated, of: {', '.join(ROLES)}")
    p.add_argument("--file", required=True, help="the callers file (auth_tokens_file); created if missing")
    p.add_argument("--token-stdin", action="store_true", help="hash a token read from stdin instead of a new one")
    p.add_argument("--certificate", default="", help="also accept a client certificate with this CN or SAN (mTLS)")
    a = p.parse_args(argv)
    roles = [r.strip() for r in a.roles.split(",") if r.strip()]
    bad = [r for r in roles if r not in ROLES]
    if bad or not roles:
        print(f"error: --roles must name some of {', '.join(ROLES)}; got {a.roles!r}", file=sys.stderr)
        return 2
    token = sys.stdin.readline().strip() if a.token_stdin else secrets.token_urlsafe(32)
    if len(token) < 16:
        print("error: a token must be at least 16 characters", file=sys.stderr)
        return 2
    lines = ["[[callers]]", f"name = {_toml_str(a.name)}", f"roles = [{', '.join(_toml_str(r) for r in roles)}]"]
    lines.append(f'token_sha256 = "{hash_token(token)}"')
    if a.certificate:
        lines.append(f"certificate = {_toml_str(a.certificate)}")
    try:
        _append_entry(Path(a.file), "\n".join(lines) + "\n")
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if not a.token_stdin:
        print(token)
    print(f"added caller {a.name!r} with roles {','.join(roles)} to {a.file}", file=sys.stderr)
    return 0


def _toml_str(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'
