"""The server's real-time side: event log, user state, rules and experiments wired together,
with their metrics (the logic lives in ranking.realtime.eventlog/user_state/overlay/rules/experiments)."""

from __future__ import annotations

import collections
import logging
import threading
import time
import tomllib

from ranking import (
    NO_EXPERIMENT,
    Assignment,
    Event,
    EventLimits,
    EventLogError,
    Experiments,
    FieldViolation,
    InvalidRequest,
    LogTailer,
    OverlaySettings,
    RankOverlay,
    RankQuery,
    RankResult,
    Rejection,
    RuleSet,
    build_overlay,
    open_writer,
    parse_experiments,
    parse_rules,
    validate_batch,
)
from server import metrics
from server.config import ServerConfig

log = logging.getLogger(__name__)
ATTRIBUTED_TYPES = ("click", "add_to_cart", "purchase")
MAX_VARIANT_CHARS = 64


def load_experiments_file(path: str) -> tuple[Experiments, RuleSet]:
    """The ``[[experiments]]`` and ``[[rules]]`` of a TOML file; raises ValueError naming what is wrong."""
    if not path:
        return Experiments(), RuleSet()
    with open(path, "rb") as fh:
        try:
            doc = tomllib.load(fh)
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"{path}: not valid TOML: {exc}") from None
    unknown = sorted(set(doc) - {"experiments", "rules"})
    if unknown:
        raise ValueError(f"{path}: unknown table(s) {', '.join(unknown)}; expected [[experiments]] and [[rules]]")
    return (
        Experiments(parse_experiments(doc.get("experiments", []), path)),
        RuleSet(parse_rules(doc.get("rules", []), path)),
    )


class Realtime:
    """Owns the event log writer, the user state and the request→arm attribution memory.

    Parameters
    ----------
    config : ServerConfig

    Raises
    ------
    ValueError
        The experiments file is malformed.
    ranking.realtime.eventlog.EventLogCorrupt
        The event log is damaged before its tail.
    """

    def __init__(self, config: ServerConfig):
        self.config = config
        self.experiments, self.rules = load_experiments_file(config.experiments_file)
        self.limits = EventLimits(
            event_types=config.event_type_list(),
            max_future_seconds=config.max_event_future_seconds,
            max_events_per_batch=config.max_events_per_batch,
        )
        from ranking import UserStateStore

        self.state = UserStateStore(
            config.user_state_ttl_seconds, config.user_state_max_users, config.user_state_max_events
        )
        self.settings = OverlaySettings(skip_penalty=config.skip_penalty, interest_boost=config.interest_boost)
        self._arms: collections.OrderedDict[str, tuple[str, str]] = collections.OrderedDict()
        self._arms_lock = threading.Lock()
        # One writer directory per process (worker processes each get their own), and a tailer
        # that brings in what the other processes' writers appended.
        self.log = open_writer(
            config.event_log_path(),
            fsync=config.event_log_fsync,
            segment_bytes=config.event_log_segment_bytes,
            fsync_interval_seconds=config.event_log_fsync_interval_seconds,
        )
        self.tailer = LogTailer(config.event_log_path())
        self._tail_lock = threading.Lock()
        # Fixed label sets: create every series up front so dashboards see zeros, not gaps.
        for exp, arm in self.experiments.arm_names():
            metrics.ARM_IMPRESSIONS.labels(exp, arm)
            metrics.ARM_REVENUE.labels(exp, arm)
            for t in ATTRIBUTED_TYPES:
                metrics.ARM_EVENTS.labels(exp, arm, t)
        for rule in self.rules.rules:
            metrics.RULE_APPLICATIONS.labels(rule.name)
        for reason in metrics.EVENT_LOG_WRITE_FAILURE_REASONS:
            metrics.EVENT_LOG_WRITE_FAILURES.labels(reason)
        metrics.EVENT_LOG_WRITABLE.set(1)

    # -- startup -----------------------------------------------------------------
    def replay(self) -> dict[str, int]:
        """Read every writer's log back into user state and the attribution memory (this
        process's own directory included: it may hold what a crashed predecessor wrote);
        returns counts by kind."""
        now = time.time()
        # A segment last written before the TTL horizon holds nothing the state would keep.
        with self._tail_lock:
            counts = self._apply(
                self.tailer.poll(modified_since=now - self.config.user_state_ttl_seconds, strict=True), now
            )
            # From now on this process applies its own writes directly.
            self.tailer.skip = self.log.directory.resolve()
        for kind, n in counts.items():
            metrics.EVENT_LOG_REPLAYED.labels(kind).inc(n)
        log.info(
            "replayed event log",
            extra={
                "directory": str(self.tailer.root),
                "writer": self.log.directory.name,
                **counts,
                "users": len(self.state),
            },
        )
        return counts

    def catch_up(self) -> None:
        """Apply what other processes' writers appended since the last call (before each Rank)."""
        with self._tail_lock:
            self._apply(self.tailer.poll(), time.time())

    def _apply(self, records: list[dict], now: float) -> dict[str, int]:
        counts = {"event": 0, "impression": 0}
        events: list[Event] = []
        for rec in records:
            kind = rec.get("kind", "")
            if kind == "event":
                events.append(Event.from_record(rec))
            elif kind == "impression" and rec.get("experiment"):
                self._remember(rec["request_id"], rec["experiment"], rec["arm"])
            counts[kind] = counts.get(kind, 0) + 1
        if events:
            self.state.add(events, now)
            metrics.USER_STATE_USERS.set(len(self.state))
        return counts

    def close(self) -> None:
        self.log.close()

    # -- RecordEvents --------------------------------------------------------------
    def record(
        self, events: list[Event], invalid: dict[int, tuple[str, str]] | None = None
    ) -> tuple[int, list[Rejection]]:
        """Validate, durably append, then apply; returns (accepted count, rejections).

        ``invalid`` (index -> (field, reason)) names events the transport already found bad
        (a Timestamp that cannot be converted): they are rejected with that reason, in batch
        order with the others, and never validated or logged.

        Raises
        ------
        InvalidRequest
            The batch is empty or larger than the limit.
        ranking.realtime.eventlog.EventLogError
            The log cannot be written; then nothing of the batch is applied.
        """
        if not events:
            raise InvalidRequest([FieldViolation("events", "is empty; send at least one event")])
        if len(events) > self.limits.max_events_per_batch:
            raise InvalidRequest(
                [
                    FieldViolation(
                        "events", f"has {len(events)} entries; at most {self.limits.max_events_per_batch} are allowed"
                    )
                ]
            )
        now = time.time()
        invalid = invalid or {}
        keep = [i for i in range(len(events)) if i not in invalid]
        accepted, found = validate_batch([events[i] for i in keep], self.limits, now)
        rejections = sorted(
            [Rejection(keep[r.index], r.field, r.reason) for r in found]
            + [Rejection(i, name, reason) for i, (name, reason) in invalid.items()],
            key=lambda r: r.index,
        )
        if accepted:
            t0 = time.perf_counter()
            before = self.log.bytes_appended
            self._append([{"kind": "event", **e.to_record()} for e in accepted], durable=True)
            metrics.EVENT_LOG_APPEND_DURATION.observe(time.perf_counter() - t0)
            metrics.EVENT_LOG_BYTES.inc(self.log.bytes_appended - before)
            # Applied only once on disk: what a Rank reflects is never more than what a restart keeps.
            evicted = self.state.evicted_users
            self.state.add(accepted, now)
            metrics.USER_STATE_EVICTIONS.inc(self.state.evicted_users - evicted)
            metrics.USER_STATE_USERS.set(len(self.state))
            self._count_attributed(accepted)
        metrics.EVENTS_RECORDED.labels("accepted").inc(len(accepted))
        if rejections:
            metrics.EVENTS_RECORDED.labels("rejected").inc(len(rejections))
            for r in rejections:
                metrics.EVENTS_REJECTED.labels(r.field).inc()
        return len(accepted), rejections

    def _append(self, records: list[dict], durable: bool) -> None:
        """Append to the log, exporting whether it is writable (a full or read-only disk)."""
        try:
            self.log.append(records, durable=durable)
        except EventLogError as exc:
            metrics.EVENT_LOG_WRITABLE.set(0)
            reason = exc.reason if exc.reason in metrics.EVENT_LOG_WRITE_FAILURE_REASONS else "io_error"
            metrics.EVENT_LOG_WRITE_FAILURES.labels(reason).inc()
            raise
        metrics.EVENT_LOG_WRITABLE.set(1)

    def _count_attributed(self, events: list[Event]) -> None:
        with self._arms_lock:
            arms = [self._arms.get(e.request_id) if e.request_id else None for e in events]
        for e, arm in zip(events, arms):
            if arm is None or e.event_type not in ATTRIBUTED_TYPES:
                continue
            metrics.ARM_EVENTS.labels(*arm, e.event_type).inc()
            if e.event_type == "purchase" and e.value > 0:
                metrics.ARM_REVENUE.labels(*arm).inc(e.value)

    def _remember(self, request_id: str, experiment: str, arm: str) -> None:
        with self._arms_lock:
            self._arms[request_id] = (experiment, arm)
            while len(self._arms) > self.config.attribution_max_requests:
                self._arms.popitem(last=False)

    # -- Rank ------------------------------------------------------------------------
    def prepare(self, model, q: RankQuery, variant: str) -> tuple[RankOverlay, Assignment]:
        """The overlay and experiment assignment of one Rank request.

        Raises
        ------
        InvalidRequest
            ``variant`` is too long or names neither an arm nor a variant.
        """
        if len(variant) > MAX_VARIANT_CHARS:
            raise InvalidRequest([FieldViolation("variant", f"is longer than {MAX_VARIANT_CHARS} characters")])

        def consumed() -> int:
            urow = model.users.row(q.user_id)
            return model.consumed.row_len(urow) if urow >= 0 else 0

        assignment = (
            self.experiments.assign(q.user_id, q.channel, consumed, variant)
            if (self.experiments.experiments or variant)
            else NO_EXPERIMENT
        )
        self.catch_up()
        now = time.time()
        rules = self.rules.matching(q.channel, q.device, q.region, q.attributes) if self.rules.rules else []
        overlay = build_overlay(
            model, q.user_id, self.state.events(q.user_id, now), now, assignment.variant, rules, self.settings
        )
        return overlay, assignment

    def served(
        self, request_id: str, q: RankQuery, assignment: Assignment, overlay: RankOverlay, result: RankResult
    ) -> None:
        """Log the impression (for attribution and the experiment report) and count it."""
        for name in result.applied_rules:
            metrics.RULE_APPLICATIONS.labels(name).inc()
        if overlay.user_vector is not None and result.rung == 4:
            metrics.RANK_REALTIME.inc()
        if not assignment.experiment and not self.config.log_all_impressions:
            return
        if assignment.experiment:
            self._remember(request_id, assignment.experiment, assignment.arm)
            metrics.ARM_IMPRESSIONS.labels(assignment.experiment, assignment.arm).inc()
        before = self.log.bytes_appended
        try:
            # Not fsynced on its own (an fsync per Rank would cost more than the ranking); it is
            # written at once, so only a machine crash, not a process crash, can lose it.
            self._append(
                [
                    {
                        "kind": "impression",
                        "request_id": request_id,
                        "user_id": q.user_id,
                        "timestamp": time.time(),
                        "experiment": assignment.experiment,
                        "arm": assignment.arm,
                        "strategy": result.rung.name,
                        "items": result.item_ids,
                    }
                ],
                durable=False,
            )
        except EventLogError as exc:
            # The ranking is already made; losing its impression must not fail the request.
            metrics.EVENT_LOG_IMPRESSIONS_LOST.inc()
            log.error("impression not logged", extra={"request_id": request_id, "error": str(exc)})
            return
        metrics.EVENT_LOG_BYTES.inc(self.log.bytes_appended - before)
