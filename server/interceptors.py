"""Server interceptors: request count, latency and in-flight requests by method and status code."""
from __future__ import annotations

import time

import grpc

from server import metrics


def _method_name(full: str) -> str:
    # "/one2one.v1.RankingService/Rank" -> "one2one.v1.RankingService/Rank": a small fixed set.
    return full.lstrip("/")


class MetricsInterceptor(grpc.ServerInterceptor):
    """Counts and times every unary call, labelled by method and final status code."""

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        method = _method_name(handler_call_details.method)
        inner = handler.unary_unary
        in_flight = metrics.RPC_IN_FLIGHT.labels(method)

        def wrapper(request, context):
            start = time.perf_counter()
            code = grpc.StatusCode.OK
            in_flight.inc()
            try:
                response = inner(request, context)
                code = context.code() or grpc.StatusCode.OK
                return response
            except BaseException:
                code = context.code()
                if code is None or code == grpc.StatusCode.OK:
                    code = grpc.StatusCode.UNKNOWN
                raise
            finally:
                in_flight.dec()
                metrics.RPC_REQUESTS.labels(method, code.name).inc()
                metrics.RPC_DURATION.labels(method).observe(time.perf_counter() - start)

        return grpc.unary_unary_rpc_method_handler(
            wrapper,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
