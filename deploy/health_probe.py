"""Kubernetes probe: one grpc.health.v1 Check against the server in the same container.

The kubelet's own gRPC probe speaks neither TLS nor mTLS, so deploy/k8s/deployment.yaml
runs this inside the container instead (the image puts it at /opt/one2one/health_probe.py).
Exit status 0 when the service answers SERVING, 1 otherwise, with one line on stderr
saying why. Usage::

    python health_probe.py --port 50051 --service "" --ca /run/secrets/one2one/tls/ca.crt \\
        --server-name one2one-server [--cert client.crt --key client.key]

Without ``--ca`` it connects in plain text (a server started with ``allow_insecure``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1", help="address to connect to (default: %(default)s)")
    p.add_argument("--port", type=int, required=True, help="the server's gRPC port")
    p.add_argument("--service", default="", help='health service name: "" (readiness) or "liveness"')
    p.add_argument("--ca", type=Path, help="PEM CA bundle that verifies the server's certificate (enables TLS)")
    p.add_argument("--server-name", help="name the server's certificate must carry (default: --host)")
    p.add_argument("--cert", type=Path, help="client certificate (PEM), for a server that requires mTLS")
    p.add_argument("--key", type=Path, help="client certificate's private key (PEM)")
    p.add_argument("--timeout", type=float, default=3.0, help="seconds for the whole check (default: %(default)s)")
    return p


def _channel(args: argparse.Namespace) -> grpc.Channel:
    target = f"{args.host}:{args.port}"
    if args.ca is None:
        if args.cert or args.key or args.server_name:
            raise ValueError("--cert, --key and --server-name need --ca (TLS)")
        return grpc.insecure_channel(target)
    if (args.cert is None) != (args.key is None):
        raise ValueError("--cert and --key go together")
    credentials = grpc.ssl_channel_credentials(
        root_certificates=args.ca.read_bytes(),
        private_key=args.key.read_bytes() if args.key else None,
        certificate_chain=args.cert.read_bytes() if args.cert else None,
    )
    # The certificate names the Service (one2one-server), not the loopback address.
    options = [("grpc.ssl_target_name_override", args.server_name)] if args.server_name else []
    return grpc.secure_channel(target, credentials, options=options)


def check(args: argparse.Namespace) -> tuple[bool, str]:
    """One Check call; ``(serving, what happened)``."""
    try:
        channel = _channel(args)
    except (OSError, ValueError) as exc:
        return False, f"cannot set up the channel: {exc}"
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout)
        except grpc.RpcError as exc:
            return False, f"health check of service {args.service!r} failed: {exc.code().name}: {exc.details()}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return reply.status == health_pb2.HealthCheckResponse.SERVING, f"service {args.service!r} is {status}"


def main(argv: list[str] | None = None) -> int:
    ok, message = check(_parser().parse_args(argv))
    if not ok:
        print(message, file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
