"""RankingService: proto <-> domain translation around the ranking core, nothing more."""

from __future__ import annotations

import logging
import os
import time
from typing import TYPE_CHECKING

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from one2one.v1 import ranking_pb2, ranking_pb2_grpc
from ranking import (
    LATE_ALLOWANCE_MS,
    Budget,
    Event,
    EventLogError,
    EventStoreError,
    FieldViolation,
    InvalidRequest,
    QueryLimits,
    Ranker,
    RankingError,
    RankQuery,
    RankResult,
    Unavailable,
    effective_budget_ms,
)
from server import errors, logs, metrics
from server.admission import Admission
from server.config import ServerConfig
from server.interceptors import call_arrived_ns
from server.model_manager import ModelManager

if TYPE_CHECKING:
    from server.realtime import Realtime

log = logging.getLogger(__name__)
SERVER_TIME_KEY = "one2one-server-ms"
_LATE_LOG = logs.Sampler(1.0)
_LOG_FAILURE_LOG = logs.Sampler(1.0)


# google.protobuf.Timestamp's valid range (timestamp.proto): 0001-01-01T00:00:00Z to
# 9999-12-31T23:59:59.999999999Z. Outside it the protobuf runtime raises ValueError on any
# conversion, which answered UNKNOWN before this check (issue 22).
TIMESTAMP_MIN_SECONDS = -62_135_596_800
TIMESTAMP_MAX_SECONDS = 253_402_300_799


def timestamp_problem(ts: Timestamp) -> str | None:
    """Why a Timestamp is outside protobuf's valid range, or None when it is valid."""
    if not TIMESTAMP_MIN_SECONDS <= ts.seconds <= TIMESTAMP_MAX_SECONDS:
        return (
            f"seconds {ts.seconds} is outside the Timestamp range "
            f"[{TIMESTAMP_MIN_SECONDS}, {TIMESTAMP_MAX_SECONDS}] (years 0001 to 9999)"
        )
    if not 0 <= ts.nanos <= 999_999_999:
        return f"nanos {ts.nanos} is outside [0, 999999999]"
    return None


def _trimmed(ids) -> list[str]:
    return [x.strip() for x in ids] if ids else []


def query_from_proto(
    req: ranking_pb2.RankRequest, now: float | None = None, problems: list[FieldViolation] | None = None
) -> RankQuery:
    """The domain query of a RankRequest (no validation; the pipeline validates).

    An untimed request happens now, by the server's clock (``now``, default the current
    time), as the API documents: the reranker learned from queries asked at the time of
    each user's later event, days after its training data ended, so taking an untimed live
    request to come just after the bundle's data end would make every feature of elapsed
    time (``days_after_data_end``, recency, the hour and weekday lifts) disagree with
    training once the bundle is a day old.

    Raises
    ------
    InvalidRequest
        ``context.event_time`` is not a valid Timestamp, unless ``problems`` is given: the
        violation is then added to it and the query takes the time as untimed.
    """
    ctx = req.context
    timed = ctx.HasField("event_time")
    if timed and (problem := timestamp_problem(ctx.event_time)) is not None:
        violation = FieldViolation("context.event_time", problem)
        if problems is None:
            raise InvalidRequest([violation])
        problems.append(violation)
        timed = False
    # Ids are trimmed as RecordEvents and the builder trim them (ranking.realtime.events.normalise),
    # so " u1 " ranks with the events recorded for it.
    return RankQuery(
        user_id=req.user_id.strip(),
        num_results=req.num_results,
        event_time=ctx.event_time.ToSeconds() if timed else (time.time() if now is None else now),
        channel=ctx.channel,
        device=ctx.device,
        region=ctx.region,
        session_item_ids=_trimmed(ctx.session_item_ids),
        attributes=dict(ctx.attributes),
        candidate_item_ids=_trimmed(req.candidate_item_ids),
        exclude_item_ids=_trimmed(req.exclude_item_ids),
        include_categories=list(req.filter.include_categories),
        exclude_categories=list(req.filter.exclude_categories),
        min_price=req.filter.min_price,
        max_price=req.filter.max_price,
        budget_ms=req.budget_ms,
        explain=req.explain,
    )


def response_from_result(result: RankResult, request_id: str) -> ranking_pb2.RankResponse:
    """The RankResponse for a pipeline result."""
    response = ranking_pb2.RankResponse(
        request_id=request_id,
        model_version=result.model_version,
        strategy=result.rung.name,  # Rung's names are Strategy's (tests/server/test_servicer_units.py)
        degraded=result.degraded,
    )
    # The fields most answers leave empty are set only when they are not (each costs a call).
    if result.degraded_stages:
        response.degraded_stages.extend(result.degraded_stages)
    if result.fallback_reason:
        response.fallback_reason = result.fallback_reason
    if result.applied_rules:
        response.applied_rules.extend(result.applied_rules)
    # Each item written in place (a list of RankedItems passed in is copied once more).
    add = response.items.add
    if result.contributions is None:
        for item_id, score in zip(result.item_ids, result.scores):
            add(item_id=item_id, score=score)
    else:
        for item_id, score, contributions in zip(result.item_ids, result.scores, result.contributions):
            add(item_id=item_id, score=score).contributions.update(contributions)
    return response


def events_from_proto(
    req: ranking_pb2.RecordEventsRequest, now: float, limits: QueryLimits | None = None
) -> tuple[list[Event], dict[int, tuple[str, str]]]:
    """The domain events of a RecordEventsRequest, and the events whose Timestamps are invalid.

    Only the Timestamps are checked here (they cannot even be converted); everything else is
    validated by ranking.realtime.events. An event with an invalid Timestamp is in the list
    with the arrival time and in the second result, index -> (field, reason), to be rejected
    on its own while the rest of the batch is kept.
    """
    limits = limits or QueryLimits()
    out: list[Event] = []
    invalid: dict[int, tuple[str, str]] = {}
    for i, ev in enumerate(req.events):
        ctx = ev.context
        for name, ts, present in (
            ("event_time", ev.event_time, ev.HasField("event_time")),
            ("context.event_time", ctx.event_time, ctx.HasField("event_time")),
        ):
            if present and (problem := timestamp_problem(ts)) is not None:
                invalid.setdefault(i, (name, problem))
        # Not used for an event (nor logged), but bounded like every repeated field of the API.
        if len(ctx.session_item_ids) > limits.max_session_items:
            invalid.setdefault(
                i,
                (
                    "context.session_item_ids",
                    f"has {len(ctx.session_item_ids)} entries; at most {limits.max_session_items} are allowed",
                ),
            )
        elif any(len(x) > limits.max_id_chars for x in ctx.session_item_ids):
            invalid.setdefault(
                i, ("context.session_item_ids", f"an id is longer than {limits.max_id_chars} characters")
            )
        timed = ev.HasField("event_time") and i not in invalid
        out.append(
            Event(
                user_id=ev.user_id,
                item_id=ev.item_id,
                event_type=ev.event_type,
                timestamp=ev.event_time.ToNanoseconds() / 1e9 if timed else now,
                value=ev.value,
                request_id=ev.request_id,
                channel=ctx.channel,
                device=ctx.device,
                region=ctx.region,
                attributes=dict(ctx.attributes),
            )
        )
    return out, invalid


def observe(result: RankResult) -> None:
    """Record a served ranking in the metrics."""
    child = metrics.child
    child(metrics.RANK_RESPONSES, result.rung.name).inc()
    if result.fallback_reason:
        child(metrics.RANK_FALLBACKS, result.fallback_reason).inc()
    for stage in result.degraded_stages:
        child(metrics.RANK_DEGRADED, stage).inc()
    child(metrics.RANK_RETRIEVAL, result.retrieval).inc()
    if not result.item_ids:
        metrics.RANK_EMPTY.inc()
    metrics.RANK_CANDIDATES.observe(result.n_candidates)
    metrics.RANK_SCORED.observe(result.n_scored)
    for stage, seconds in result.stage_seconds.items():
        child(metrics.STAGE_DURATION, stage).observe(seconds)


def late(result: RankResult, server_ms: float, budget_ms: float) -> None:
    """Count a response sent after its budget and the allowance; log one such a second.

    The line says where the time went: each stage, and the time outside every stage
    (waiting for the GIL or a core between stages, translating the request before the
    pipeline), so the late tail can be told apart from a slow stage.
    """
    metrics.RANK_LATE.inc()
    held = _LATE_LOG.take()
    if held is None:
        return
    stages_ms = {stage: round(seconds * 1000.0, 3) for stage, seconds in result.stage_seconds.items()}
    log.warning(
        "rank answered late",
        extra={
            "server_ms": round(server_ms, 3),
            "budget_ms": round(budget_ms, 3),
            "stages_ms": stages_ms,
            "outside_stages_ms": round(server_ms - sum(stages_ms.values()), 3),
            "degraded_stages": result.degraded_stages,
            "late_not_logged": held,
        },
    )


class RankingServicer(ranking_pb2_grpc.RankingServiceServicer):
    """Thin servicer: translate, call the ranker, translate back; errors map in one place."""

    def __init__(self, models: ModelManager, config: ServerConfig, realtime: Realtime | None = None):
        self.models = models
        self.config = config
        self.realtime = realtime
        self.admission = Admission(config.max_concurrent_ranks)
        self.limits = config.ranker_config().limits

    def Rank(self, request: ranking_pb2.RankRequest, context: grpc.ServicerContext) -> ranking_pb2.RankResponse:
        # The budget and the server's time run from the call's arrival, so the wait for a
        # handler thread counts (stage "queue"); the time a deadline had left on arrival is
        # the time it has left now plus that wait.
        started = time.monotonic_ns()
        arrived = call_arrived_ns() or started
        thread_wait = (started - arrived) / 1e9
        # 128 random bits in hex, as uuid4().hex without its version bits, at a fifth of its cost.
        request_id = os.urandom(16).hex()
        with logs.request_context(request_id):
            try:
                ranker = self.models.current()
                deadline_left = context.time_remaining()
                budget_ms = effective_budget_ms(
                    request.budget_ms,
                    self.config.default_budget_ms,
                    self.config.max_budget_ms,
                    None if deadline_left is None else deadline_left + thread_wait,
                    self.config.reply_margin_ms,
                )
                budget = Budget.start(max(budget_ms, 0.0), now_ns=arrived)
                if self.config.debug_rank_delay_ms > 0:
                    # Test/debug only (default 0): a slow dependency eating the budget, so the
                    # drain test can hold a request in flight and the alert tests can make
                    # Rank slow and degraded on purpose.
                    time.sleep(self.config.debug_rank_delay_ms / 1000.0)
                problems: list[FieldViolation] = []
                q = query_from_proto(request, problems=problems)
                if problems:  # refused, naming every bad field, before it takes a slot
                    raise InvalidRequest(problems + self._violations(ranker, q, request.variant))
                with self.admission.slot(budget) as (waited, admitted):
                    overlay, fresh, t0 = None, True, time.perf_counter()
                    if self.realtime is not None:
                        try:
                            overlay, assignment, fresh = self.realtime.prepare(ranker.model, q, request.variant)
                        except InvalidRequest as exc:  # the variant's: named with every other bad field
                            raise InvalidRequest(exc.violations + ranker.violations(q)) from None
                    realtime_seconds = time.perf_counter() - t0
                    result = ranker.rank(q, budget, overlay, cheapest=not admitted)
                if not fresh:
                    # The shared event store failed: ranked without the customer's real-time state.
                    result.degraded_stages.insert(0, "realtime")
                result.stage_seconds["queue"] = thread_wait + waited
                if not admitted:
                    # Waited out its pipeline slot: say so, ahead of what the cheapest path cut.
                    result.degraded_stages.insert(0, "queue")
                if self.realtime is not None:
                    result.stage_seconds["realtime"] = realtime_seconds
            except RankingError as exc:
                log.debug("rank refused", extra={"error": str(exc)})
                errors.abort(context, exc)
            t0 = time.perf_counter()
            response = response_from_result(result, request_id)
            if self.realtime is not None and overlay is not None:
                self.realtime.served(request_id, q, assignment, overlay, result)
                response.experiment, response.arm = assignment.experiment, assignment.arm
            result.stage_seconds["respond"] = time.perf_counter() - t0
            observe(result)
            log.debug(
                "ranked",
                extra={
                    "strategy": result.rung.name,
                    "items": len(result.item_ids),
                    "model_version": result.model_version,
                    "degraded": result.degraded,
                },
            )
            server_ms = (time.monotonic_ns() - arrived) / 1e6
            if server_ms > budget.total_ms + LATE_ALLOWANCE_MS:
                late(result, server_ms, budget.total_ms)
            # Server time of this call, for clients and load tests checking the budget.
            context.set_trailing_metadata(((SERVER_TIME_KEY, f"{server_ms:.3f}"),))
            return response

    def _violations(self, ranker: Ranker, q: RankQuery, variant: str) -> list[FieldViolation]:
        """Every problem of a request besides those its translation found: the query's own
        and its variant's."""
        out = ranker.violations(q)
        if self.realtime is not None:
            try:
                self.realtime.assign(ranker.model, q, variant)
            except InvalidRequest as exc:
                out.extend(exc.violations)
        return out

    def RecordEvents(
        self, request: ranking_pb2.RecordEventsRequest, context: grpc.ServicerContext
    ) -> ranking_pb2.RecordEventsResponse:
        try:
            if self.realtime is None:
                raise Unavailable("this server runs without an event log")
            events, invalid = events_from_proto(request, time.time(), self.limits)
            model = self.models.current().model if self.models.loaded else None
            recorded = self.realtime.record(events, invalid, model)
        except (EventLogError, EventStoreError) as exc:
            # The operator's side of the UNAVAILABLE (the client's message names no file); one a second.
            held = _LOG_FAILURE_LOG.take()
            if held is not None:
                log.error("events not recorded", extra={"error": str(exc), "not_logged": held})
            errors.abort(context, exc)
        except RankingError as exc:
            log.debug("record events refused", extra={"error": str(exc)})
            errors.abort(context, exc)
        return ranking_pb2.RecordEventsResponse(
            accepted_count=recorded.accepted,
            stale_count=recorded.stale,
            rejections=[
                ranking_pb2.EventRejection(index=r.index, field=r.field, reason=r.reason) for r in recorded.rejections
            ],
        )
