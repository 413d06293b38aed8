"""The per-request latency budget: one deadline on the monotonic clock every stage reads."""
from __future__ import annotations

import time
from dataclasses import dataclass


def effective_budget_ms(
    request_ms: int,
    default_ms: float,
    max_ms: float,
    grpc_remaining_s: float | None,
    reply_margin_ms: float,
) -> float:
    """The smallest of the request's budget (or the default), the server maximum and
    the gRPC deadline less the margin needed to send the reply.

    Parameters
    ----------
    request_ms : int
        ``RankRequest.budget_ms``; 0 means the server default.
    default_ms, max_ms : float
        Server configuration.
    grpc_remaining_s : float or None
        ``context.time_remaining()``; None when the caller set no deadline.
    reply_margin_ms : float
        Time kept back to serialise and send the reply.

    Returns
    -------
    float
        Milliseconds; may be <= 0 when the caller's deadline is already spent.
    """
    budget = float(request_ms) if request_ms > 0 else float(default_ms)
    budget = min(budget, float(max_ms))
    if grpc_remaining_s is not None:
        budget = min(budget, grpc_remaining_s * 1000.0 - reply_margin_ms)
    return budget


@dataclass(frozen=True)
class Budget:
    """A deadline in ``time.monotonic_ns()`` nanoseconds, as the Cython loop reads it."""

    deadline_ns: int
    total_ms: float

    @classmethod
    def start(cls, budget_ms: float, now_ns: int | None = None) -> "Budget":
        now = time.monotonic_ns() if now_ns is None else now_ns
        return cls(deadline_ns=now + int(budget_ms * 1e6), total_ms=budget_ms)

    @classmethod
    def unlimited(cls) -> "Budget":
        return cls(deadline_ns=0, total_ms=float("inf"))

    def remaining_ms(self) -> float:
        if self.deadline_ns == 0:
            return float("inf")
        return (self.deadline_ns - time.monotonic_ns()) / 1e6

    def expired(self) -> bool:
        return self.deadline_ns != 0 and time.monotonic_ns() >= self.deadline_ns
