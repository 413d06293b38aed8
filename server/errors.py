"""The one place where domain errors become gRPC status codes."""

from __future__ import annotations

import logging
from typing import NoReturn

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from ranking import BundleError, EventLogError, InvalidRequest, Unavailable

log = logging.getLogger(__name__)

_CODES = [
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
