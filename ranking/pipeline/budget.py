"""The per-request latency budget: one deadline on the monotonic clock every stage reads."""

from __future__ import annotations

import time
from dataclasses import dataclass

# How far past its budget a Rank may answer and still count as on time: the server's
# promise is "never more than budget + 1 ms" (docs/operations.md, "The request budget"). Later
# answers are counted (``one2one_rank_late_total``) and logged.
LATE_ALLOWANCE_MS = 1.0


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
    def start(cls, budget_ms: float, now_ns: int | None = None) -> Budget:
        now = time.monotonic_ns() if now_ns is None else now_ns
        return cls(deadline_ns=now + int(budget_ms * 1e6), total_ms=budget_ms)

    @classmethod
    def unlimited(cls) -> Budget:
        return cls(deadline_ns=0, total_ms=float("inf"))

    def remaining_ms(self) -> float:
        if self.deadline_ns == 0:
            return float("inf")
        return (self.deadline_ns - time.monotonic_ns()) / 1e6

    def expired(self) -> bool:
        return self.deadline_ns != 0 and time.monotonic_ns() >= self.deadline_ns


@dataclass
class RetrievalPlan:
    """How much candidate work a request can afford: what the planner decided."""

    n_candidates: int
    effort: int
    cut: bool  # True when the plan is smaller than the configured one
    # False when even the smallest candidate set cannot be scored in time: the features
    # and scoring stages are skipped and the answer is in retrieval order.
    score: bool = True


class CostModel:
    """Learns what a candidate costs and plans a request's work to fit its budget.

    The time spent after resolving a user (retrieve + features + score) is modelled as
    ``fixed + per_candidate * n``; both terms are exponentially weighted averages of
    what complete requests took, so the plan follows the machine's current speed.
    Plain float updates: a lost update under concurrency only delays learning a little.

    Parameters
    ----------
    alpha : float
        Weight of the newest observation.
    safety : float
        Fraction of the remaining budget the plan may use; the rest absorbs noise.
    min_candidates : int
        Never plan fewer candidates than this (the scoring loop still guards the deadline).
    """

    def __init__(self, alpha: float = 0.1, safety: float = 0.7, min_candidates: int = 20):
        self.alpha = alpha
        self.safety = safety
        self.min_candidates = min_candidates
        self.fixed_ms: float | None = None
        self.per_candidate_ms: float | None = None

    def observe(self, n_candidates: int, fixed_ms: float, variable_ms: float) -> None:
        """Record one request: ``fixed_ms`` independent of the candidate count, ``variable_ms`` proportional."""
        per = variable_ms / max(n_candidates, 1)
        if self.fixed_ms is None or self.per_candidate_ms is None:
            self.fixed_ms, self.per_candidate_ms = fixed_ms, per
            return
        a = self.alpha
        self.fixed_ms += a * (fixed_ms - self.fixed_ms)
        self.per_candidate_ms += a * (per - self.per_candidate_ms)

    def plan(self, remaining_ms: float, n_candidates: int, effort: int) -> RetrievalPlan:
        """Shrink the candidate count (and search effort with it) until the estimate fits."""
        if self.per_candidate_ms is None or self.fixed_ms is None or remaining_ms == float("inf"):
            return RetrievalPlan(n_candidates, effort, False)
        usable = remaining_ms * self.safety - self.fixed_ms
        need = self.per_candidate_ms * n_candidates
        if need <= usable:
            return RetrievalPlan(n_candidates, effort, False)
        n = int(usable / self.per_candidate_ms) if self.per_candidate_ms > 0 else n_candidates
        affordable = n >= self.min_candidates
        n = max(self.min_candidates, min(n, n_candidates))
        scaled_effort = max(n, int(effort * n / max(n_candidates, 1)))
        return RetrievalPlan(n, scaled_effort, True, score=affordable)

    def plan_second_phase(
        self, remaining_ms: float, n: int, n_second: int, first_ms: float, rest_ms: float
    ) -> tuple[int, bool]:
        """Shrink the second phase of a phased scoring until its estimate fits ``remaining_ms``.

        The scoring of ``n`` candidates costs ``first_ms * n + rest_ms * m`` where ``m`` is the rows
        the full model completes (``n`` when ``n_second`` is 0 or at least ``n``: one phase);
        it may use the same ``safety`` share of what remains as :meth:`plan` gives the rest.

        Parameters
        ----------
        remaining_ms : float
            What is left of the budget for scoring (``inf``: no budget).
        n : int
            Candidates to score.
        n_second : int
            Rows the second phase would complete (0: every row, one phase).
        first_ms, rest_ms : float
            Milliseconds per row of the first phase and of the trees the second phase adds.

        Returns
        -------
        (int, bool)
            The second phase's rows (at least 1) and whether that is fewer than asked.
        """
        m = n if n_second <= 0 or n_second >= n else n_second
        if remaining_ms == float("inf") or m <= 1:
            return n_second, False
        usable = remaining_ms * self.safety
        if first_ms * n + rest_ms * m <= usable:
            return n_second, False
        fit = int((usable - first_ms * n) / rest_ms) if rest_ms > 0 else m
        return max(1, min(fit, m - 1)), True
