"""The one place where domain errors become gRPC status codes."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, NoReturn

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from ranking import BundleError, EventLogError, FieldViolation, InvalidRequest, Unavailable

log = logging.getLogger(__name__)


class Unauthenticated(Exception):
    """The call carries no credential, or one that names no caller (server.guard)."""


class PermissionDenied(Exception):
    """The caller is known but lacks the role the method needs (server.guard)."""


class Overloaded(Exception):
    """The call was shed on arrival: too many calls held already (server.shedding)."""


_CODES = [
    (Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    (Overloaded, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (InvalidRequest, grpc.StatusCode.INVALID_ARGUMENT),
    (Unavailable, grpc.StatusCode.UNAVAILABLE),
    (BundleError, grpc.StatusCode.UNAVAILABLE),
]


_LOG_FAILURES = {
    "no_space": "its disk is full",
    "read_only": "its disk is read-only",
    "io_error": "I/O error",
    "closed": "the server is shutting down",
    "busy": "another process holds it",
}


class Undecodable:
    """Stands for a request whose bytes are not a valid message (see :func:`tolerant`)."""

    __slots__ = ("error",)

    def __init__(self, error: InvalidRequest):
        self.error = error


def tolerant(deserialize: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """A request deserializer that never raises: bytes that do not parse become an
    :class:`Undecodable` the handler answers INVALID_ARGUMENT to. gRPC answers a raising
    deserializer with INTERNAL ("Exception deserializing request!"), which blamed the
    server for a malformed request (issue 22)."""
    if deserialize is None:
        return None

    def parse(data: bytes) -> Any:
        try:
            return deserialize(data)
        except Exception as exc:  # protobuf's DecodeError, or a UnicodeDecodeError in a string field
            why = str(exc) or type(exc).__name__
            return Undecodable(
                InvalidRequest([FieldViolation("", f"the request is not a valid protobuf message ({why[:200]})")])
            )

    return parse


def to_status(exc: Exception) -> grpc.Status:
    """The gRPC status for a domain error; INVALID_ARGUMENT carries BadRequest field violations."""
    code = next((c for t, c in _CODES if isinstance(exc, t)), grpc.StatusCode.INTERNAL)
    message = str(exc) if code != grpc.StatusCode.INTERNAL else "internal error"
    if isinstance(exc, EventLogError):
        # The log's message names the server's files; the caller needs what happened and what to do.
        message = (
            f"the event log cannot be written ({_LOG_FAILURES.get(exc.reason, exc.reason)}); "
            "nothing of this request was recorded, retry later"
        )
    details = []
    if isinstance(exc, InvalidRequest):
        bad = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
                for v in exc.violations
            ]
        )
        packed = any_pb2.Any()
        packed.Pack(bad)
        details.append(packed)
    return rpc_status.to_status(status_pb2.Status(code=getattr(code_pb2, code.name), message=message, details=details))


def abort(context: grpc.ServicerContext, exc: Exception) -> NoReturn:
    """End the RPC with the status ``exc`` maps to (never returns)."""
    status = to_status(exc)
    if status.code == grpc.StatusCode.INTERNAL:
        log.exception("internal error", exc_info=exc)
    context.abort_with_status(status)
    # abort_with_status raises; gRPC's Python API is untyped, so say so to the type checker.
    raise AssertionError("grpc.ServicerContext.abort_with_status returned")
