"""The guard interceptor: who is calling (token or client certificate), whether their role allows
the method, and whether the worker has room for the call, all decided before the call queues.

Order, on gRPC's polling thread as each call arrives: health passes untouched (probes need
no credentials); a bearer token is checked against the callers file; the call is shed if
its role's pool, the Rank queue or the worker is full; otherwise it goes to its role's
pool. A caller identified by its client certificate (mTLS, no token) is checked on the
handler thread, the only place gRPC shows the peer's certificate. Refusals run on a pool of
their own, so they never wait behind the work they refuse.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent import futures

import grpc

from server import errors, logs
from server.security import Caller, Callers, bearer_token, peer_identities
from server.shedding import LoadShedder

log = logging.getLogger("server.guard")

OPEN = ""  # the role of methods anyone may call
# Why a call was refused (the ``reason`` label of one2one_auth_refusals_total). Clients are
# told only UNAUTHENTICATED or PERMISSION_DENIED, never which of these.
AUTH_REASONS = ("missing", "bad_token", "unknown_certificate", "wrong_role")
_UNAUTHENTICATED = "missing or invalid credentials"
_DENIED = "the caller may not call this method"
_OVERLOADED = "server overloaded; retry with backoff"

# Role each method needs. "other": any known caller (reflection). Unlisted methods need
# "admin": a method added without a decision here fails closed.
SERVICE_ROLES = {
    "one2one.v1.RankingService/Rank": "rank",
    "one2one.v1.RankingService/RecordEvents": "events",
    "one2one.v1.AdminService/": "admin",
    "grpc.health.v1.Health/": OPEN,
    "grpc.reflection.v1alpha.ServerReflection/": "other",
    "grpc.reflection.v1.ServerReflection/": "other",
}


def method_role(method: str) -> str:
    """The role ``method`` ("one2one.v1.RankingService/Rank") needs: "rank", "events", "admin",
    "other" (any caller) or :data:`OPEN`."""
    if method in SERVICE_ROLES:
        return SERVICE_ROLES[method]
    service = method.split("/", 1)[0] + "/"
    return SERVICE_ROLES.get(service, "admin")


def _allowed(caller: Caller, role: str) -> bool:
    return role == "other" or role in caller.roles


def _replace_behavior(handler: grpc.RpcMethodHandler, behavior: Callable) -> grpc.RpcMethodHandler:
    """``handler`` with ``behavior`` in place of its own, whatever its streaming kind."""
    kinds = (
        ("unary_unary", grpc.unary_unary_rpc_method_handler),
        ("unary_stream", grpc.unary_stream_rpc_method_handler),
        ("stream_unary", grpc.stream_unary_rpc_method_handler),
        ("stream_stream", grpc.stream_stream_rpc_method_handler),
    )
    for attr, make in kinds:
        if getattr(handler, attr) is not None:
            return make(
                behavior,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
    raise ValueError("a method handler with no behaviour")


def _behavior(handler: grpc.RpcMethodHandler) -> Callable:
    return handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream


class GuardInterceptor(grpc.ServerInterceptor):
    """Authenticates, authorises and sheds every call but health; see the module docstring.

    Parameters
    ----------
    callers : Callers or None
        The callers file; None when no ``auth_tokens_file`` is set (then every caller the
        transport lets in has every role: mTLS alone, or no authentication at all).
    certificates : bool
        Callers may prove who they are with a verified client certificate (mTLS).
    shedder : LoadShedder
        The pools per role ("rank", "events", "admin", "other") and their bounds.
    refusal_pool : ThreadPoolExecutor
        Where refused calls are answered.
    count_refusal, count_shed : callable
        Called with (method, reason) for each refusal; :mod:`server.metrics` counts them.
    """

    def __init__(
        self,
        callers: Callers | None,
        certificates: bool,
        shedder: LoadShedder,
        refusal_pool: futures.ThreadPoolExecutor,
        count_refusal: Callable[[str, str], None],
        count_shed: Callable[[str, str], None],
    ):
        self.callers, self.certificates, self.shedder = callers, certificates, shedder
        self.refusal_pool = refusal_pool
        self.count_refusal, self.count_shed = count_refusal, count_shed
        self._samplers: dict[tuple[str, str], logs.Sampler] = {}

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method.lstrip("/")
        role = method_role(method)
        if role == OPEN:
            return handler
        caller = None
        if self.callers is not None:
            token = bearer_token(handler_call_details.invocation_metadata)
            if token is not None:
                caller = self.callers.by_token(token) if token else None
                if caller is None:
                    return self._refuse(handler, method, "bad_token")
            elif not self.certificates:
                return self._refuse(handler, method, "missing")
            if caller is not None and not _allowed(caller, role):
                return self._refuse(handler, method, "wrong_role", caller.name)
        reason = self.shedder.refusal(role)
        if reason is not None:
            return self._refuse(handler, method, reason, caller.name if caller else "")
        if self.callers is not None and caller is None:
            # No token, mTLS: the certificate decides, on the handler thread.
            behavior = self._certificate_check(_behavior(handler), method, role)
        else:
            behavior = _forward(_behavior(handler))
        # gRPC reads this attribute off the behaviour function (a fresh one: a servicer's bound
        # method takes no attributes); functions carry no declared attributes.
        behavior.experimental_thread_pool = self.shedder.pools[role]  # type: ignore[attr-defined]
        return _replace_behavior(handler, behavior)

    def _certificate_check(self, inner: Callable, method: str, role: str) -> Callable:
        callers = self.callers
        assert callers is not None

        def checked(request, context):
            caller = callers.by_certificate(peer_identities(context))
            if caller is None:
                self._refused(context, method, "unknown_certificate", "")
            elif not _allowed(caller, role):
                self._refused(context, method, "wrong_role", caller.name)
            if isinstance(request, errors.Undecodable):
                errors.abort(context, request.error)
            return inner(request, context)

        checked.judges_caller_first = True  # type: ignore[attr-defined]
        return checked

    def _refuse(self, handler: grpc.RpcMethodHandler, method: str, reason: str, caller: str = ""):
        def refuse(_request, context):
            self._refused(context, method, reason, caller)

        refuse.judges_caller_first = True  # type: ignore[attr-defined]
        replaced = _replace_behavior(handler, refuse)
        refuse.experimental_thread_pool = self.refusal_pool  # type: ignore[attr-defined]
        return replaced

    def _refused(self, context: grpc.ServicerContext, method: str, reason: str, caller: str) -> None:
        """Count, log (sampled, never the credential) and end the call."""
        shed = reason in ("process", "role", "rank_queue")
        (self.count_shed if shed else self.count_refusal)(method, reason)
        sampler = self._samplers.setdefault((method, reason), logs.Sampler(10.0))
        held = sampler.take()
        if held is not None:
            log.warning(
                "call shed" if shed else "call refused",
                extra={"method": method, "reason": reason, "caller": caller, "peer": context.peer(), "held": held},
            )
        if shed:
            errors.abort(context, errors.Overloaded(_OVERLOADED))
        if reason == "wrong_role":
            errors.abort(context, errors.PermissionDenied(_DENIED))
        errors.abort(context, errors.Unauthenticated(_UNAUTHENTICATED))


def _forward(behavior: Callable) -> Callable:
    def run(request, context):
        return behavior(request, context)

    return run
