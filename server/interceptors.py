"""The server's one interceptor: when each call arrived, which threads run it, and its metrics
(request count, latency and in-flight requests by method and status code)."""

from __future__ import annotations

import contextvars
import time
from concurrent import futures

import grpc

from server import errors, metrics

# When the running call reached the server's Python layer, in time.monotonic_ns().
_ARRIVED_NS: contextvars.ContextVar[int | None] = contextvars.ContextVar("one2one_call_arrived_ns", default=None)


def call_arrived_ns() -> int | None:
    """When the call being handled arrived (``time.monotonic_ns()``), None outside a call.

    The moment gRPC's polling thread passed the call to the interceptors, before it
    queued for a handler thread: a handler reads how long it waited for its thread and
    counts that against the call's budget. Each call runs in its own ``contextvars``
    context, so concurrent calls never see each other's.
    """
    return _ARRIVED_NS.get()


def _method_name(full: str) -> str:
    # "/one2one.v1.RankingService/Rank" -> "one2one.v1.RankingService/Rank": a small fixed set.
    return full.lstrip("/")


def _unset_code(context) -> grpc.StatusCode:
    """The status a call the handler answered without setting one ends with: OK, unless the
    client's deadline passed or the client cancelled first (the answer is then never read)."""
    if context.is_active():
        return grpc.StatusCode.OK
    left = context.time_remaining()
    return grpc.StatusCode.DEADLINE_EXCEEDED if left is not None and left <= 0 else grpc.StatusCode.CANCELLED


class CallInterceptor(grpc.ServerInterceptor):
    """Times every unary call from its arrival, counts it by method and final status code,
    and runs the methods given in ``thread_pools`` on their own threads.

    Parameters
    ----------
    thread_pools : dict, optional
        Method name ("one2one.v1.RankingService/Rank") -> the pool its handlers run on, in
        arrival order. Other methods run on the server's pool. This uses gRPC's
        ``experimental_thread_pool`` handler attribute; a gRPC without it runs every method
        on the server's pool, which still works.
    """

    def __init__(self, thread_pools: dict[str, futures.ThreadPoolExecutor] | None = None):
        self.thread_pools = dict(thread_pools or {})

    def intercept_service(self, continuation, handler_call_details):
        arrived = time.monotonic_ns()
        handler = continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        method = _method_name(handler_call_details.method)
        inner = handler.unary_unary
        in_flight = metrics.child(metrics.RPC_IN_FLIGHT, method)
        deserialize = handler.request_deserializer
        # A caller is judged before its request (server.guard): whoever may not call gets
        # UNAUTHENTICATED or PERMISSION_DENIED whatever bytes it sent; a behaviour that judges
        # on the handler thread (a client certificate) answers an undecodable request itself.
        judged_first = getattr(inner, "judges_caller_first", False)

        def wrapper(request, context):
            _ARRIVED_NS.set(arrived)
            code = grpc.StatusCode.OK
            in_flight.inc()
            try:
                if isinstance(request, errors.Undecodable) and not judged_first:
                    errors.abort(context, request.error)
                response = inner(request, context)
                code = context.code() or _unset_code(context)
                return response
            except BaseException:
                code = context.code()
                if code is None or code == grpc.StatusCode.OK:
                    code = grpc.StatusCode.UNKNOWN
                raise
            finally:
                in_flight.dec()
                metrics.child(metrics.RPC_REQUESTS, method, code.name).inc()
                metrics.child(metrics.RPC_DURATION, method).observe((time.monotonic_ns() - arrived) / 1e9)

        # A pool chosen by an inner interceptor (server.guard) wins over this one's map.
        pool = getattr(inner, "experimental_thread_pool", None) or self.thread_pools.get(method)
        if pool is not None:
            # gRPC reads this attribute off the behaviour function; functions carry no declared attributes.
            wrapper.experimental_thread_pool = pool  # type: ignore[attr-defined]
        return grpc.unary_unary_rpc_method_handler(
            wrapper,
            request_deserializer=errors.tolerant(deserialize),
            response_serializer=handler.response_serializer,
        )
