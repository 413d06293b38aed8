"""The server's real-time side: the event store, customer state, rules and experiments wired
together, with their metrics (the logic lives in ranking.realtime and ranking.policy).

Two event stores (setting ``event_store``):

- ``local`` (ranking.realtime.store.LocalEventStore): each process appends to its own
  directory of the segmented event log and keeps customer state in memory, tailing the
  other processes' directories; one machine, or a customer routed to one pod.
- a ``redis://`` URL (ranking.realtime.redis_store.RedisEventStore): events, customer state,
  impressions and request→arm attribution live in Redis/Valkey, so any pod's Rank sees
  what any pod recorded.

Either way the state holds exactly the accepted events after the served bundle's data end:
older ones are logged (the next build reads them) and reported stale, not applied.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass

from ranking import (
    MANIFEST,
    NO_EXPERIMENT,
    Assignment,
    Event,
    EventLimits,
    EventLogError,
    EventStoreError,
    Experiments,
    FieldViolation,
    HeldEvents,
    InvalidRequest,
    LocalEventStore,
    OverlaySettings,
    RankingError,
    RankOverlay,
    RankQuery,
    RankResult,
    RedisEventStore,
    Rejection,
    RuleSet,
    UserStateSettings,
    build_overlay,
    parse_experiments,
    parse_rules,
    resolve_current,
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


@dataclass(frozen=True)
class Recorded:
    """What RecordEvents did with a batch: accepted (durably stored), of which stale (timed
    inside the served bundle's window: stored for the next build, not applied), and the
    rejections."""

    accepted: int
    stale: int
    rejections: list[Rejection]


def _bundle_horizon(model) -> tuple[float, tuple[str, ...]]:
    """(the bundle's data end, its consumed event types): what real-time state is relative to."""
    end = float(model.manifest.get("data_window", {}).get("end_unix", float("-inf")))
    types = tuple(model.manifest.get("config", {}).get("consumed_event_types", UserStateSettings.durable_types))
    return end, types


def current_data_end(artifacts: str) -> float | None:
    """The data end of the bundle CURRENT names, read from its manifest (None without one)."""
    try:
        path = resolve_current(artifacts)
        return float(json.loads((path / MANIFEST).read_text())["data_window"]["end_unix"])
    except (OSError, ValueError, KeyError, TypeError, RankingError):
        return None


def _observe_purchases(read: str, purchases: int, held: int) -> None:
    if purchases:  # most Ranks read none: no write to the shared metrics file for them
        metrics.child(metrics.EVENT_STORE_PURCHASES_READ, read).inc(purchases)
    metrics.EVENT_STORE_HELD_PURCHASES.set(held)


def _observe_store(op: str, seconds: float, reason: str | None) -> None:
    metrics.EVENT_STORE_ROUND_TRIP.labels(op).observe(seconds)
    if reason is None:
        metrics.EVENT_STORE_AVAILABLE.set(1)
        return
    metrics.EVENT_STORE_ERRORS.labels(op, reason).inc()
    metrics.EVENT_STORE_AVAILABLE.set(0)


class Realtime:
    """Owns the event store (ranking.realtime.store), rules and experiments, and their metrics.

    Parameters
    ----------
    config : ServerConfig

    Raises
    ------
    ValueError
        The experiments file is malformed, or a shared store was set up with other shards.
    ranking.realtime.eventlog.EventLogCorrupt
        The local event log is damaged before its tail (from :meth:`replay`).
    """

    STATS_INTERVAL_SECONDS = 15.0

    def __init__(self, config: ServerConfig):
        self.config = config
        self.experiments, self.rules = load_experiments_file(config.experiments_file)
        self.limits = EventLimits(
            event_types=config.event_type_list(),
            max_future_seconds=config.max_event_future_seconds,
            max_events_per_batch=config.max_events_per_batch,
        )
        self.settings = OverlaySettings(skip_penalty=config.skip_penalty, interest_boost=config.interest_boost)
        self._model_version: str | None = None
        self._sync_lock = threading.Lock()
        self._next_stats = 0.0
        self._checked = True
        self.store: LocalEventStore | RedisEventStore
        if config.event_store == "local":
            self.store = LocalEventStore(
                config.event_log_path(),
                fsync=config.event_log_fsync,
                segment_bytes=config.event_log_segment_bytes,
                fsync_interval_seconds=config.event_log_fsync_interval_seconds,
                max_users=config.user_state_max_users,
                max_events_per_user=config.user_state_max_events,
                attribution_max_requests=config.attribution_max_requests,
            )
            metrics.EVENT_STORE_AVAILABLE.set(1)
            metrics.EVENT_STORE_DURABLE.set(1 if config.event_log_fsync == "always" else 0)
        else:
            self.store = RedisEventStore(
                config.event_store,
                shards=config.event_store_shards,
                read_timeout_s=config.event_store_timeout_ms / 1000.0,
                write_timeout_s=config.event_store_write_timeout_ms / 1000.0,
                max_events_per_user=config.user_state_max_events,
                key_ttl_seconds=config.event_store_key_ttl_seconds,
                attribution_ttl_seconds=config.attribution_ttl_seconds,
                retry_seconds=config.event_store_retry_seconds,
                observe=_observe_store,
                held_purchases=config.event_store_held_purchases,
                observe_purchases=_observe_purchases,
            )
            for read in metrics.EVENT_STORE_PURCHASE_READS:
                metrics.EVENT_STORE_PURCHASES_READ.labels(read)
            metrics.EVENT_STORE_HELD_PURCHASES.set(0)
            self._checked = False
            self._check_shared()
        metrics.EVENT_STORE_INFO.labels(self.store.kind).set(1)
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
        for op in metrics.EVENT_STORE_OPS:
            for reason in metrics.EVENT_STORE_ERROR_REASONS:
                metrics.EVENT_STORE_ERRORS.labels(op, reason)
        metrics.EVENT_LOG_WRITABLE.set(1)

    # -- startup -----------------------------------------------------------------
    def _check_shared(self) -> None:
        """Check the shared store's shard layout and durability (again at each tick until done)."""
        store = self.store
        assert isinstance(store, RedisEventStore)
        try:
            store.check_meta()
        except EventStoreError as exc:
            log.error(
                "event store unreachable at start; Rank serves without real-time state", extra={"error": str(exc)}
            )
            metrics.EVENT_STORE_DURABLE.set(0)
            return
        d = store.durability()
        metrics.EVENT_STORE_DURABLE.set(1 if d.durable else 0)
        if d.durable:
            log.info("event store durable", extra={"store": store.url, **d.settings})
        else:
            log.error(
                "EVENT STORE NOT DURABLE: events acknowledged by RecordEvents could be lost if Redis "
                "crashes; run it with appendonly yes, appendfsync always, maxmemory-policy noeviction",
                extra={"store": store.url, "problem": d.problem, **d.settings},
            )
        self._checked = True

    def replay(self) -> dict[str, int]:
        """Read the local log back into customer state and the attribution memory; returns
        counts by kind. A shared store needs no replay: it holds the state."""
        store = self.store
        if not isinstance(store, LocalEventStore):
            return {"event": 0, "impression": 0}
        end = current_data_end(self.config.artifacts)
        since = None
        if end is not None:
            # A segment last written before the bundle's data end (less the future an event may
            # be timed at) holds nothing after it: the state would keep none of it.
            since = end - self.config.max_event_future_seconds
            store.set_bundle(end, store.state.durable_types)
        counts = store.replay(since)
        for kind, n in counts.items():
            metrics.EVENT_LOG_REPLAYED.labels(kind).inc(n)
        metrics.USER_STATE_USERS.set(len(store.state))
        log.info(
            "replayed event log",
            extra={
                "directory": str(store.root),
                "writer": store.log.directory.name,
                **counts,
                "users": len(store.state),
            },
        )
        return counts

    def sync_model(self, model) -> None:
        """Real-time state is relative to the served bundle: on a new one, drop what it holds."""
        if model is None or model.version == self._model_version:
            return
        with self._sync_lock:
            if model.version == self._model_version:
                return
            horizon, types = _bundle_horizon(model)
            dropped = self.store.set_bundle(horizon, types)
            if isinstance(self.store, LocalEventStore):
                metrics.USER_STATE_USERS.set(len(self.store.state))
                log.info("real-time state now after the bundle's data end", extra={"dropped_events": dropped})
            elif horizon < time.time() - self.config.event_store_key_ttl_seconds:
                log.warning(
                    "the served bundle's data ends before event_store_key_ttl_seconds: customers' state "
                    "in the shared store may have expired before a bundle held it; build more often "
                    "or raise the setting",
                    extra={"data_end": horizon, "event_store_key_ttl_seconds": self.config.event_store_key_ttl_seconds},
                )
            self._model_version = model.version

    def tick(self) -> None:
        """Periodic work of the serving loop: the shared store's checks and stream gauges."""
        store = self.store
        if not isinstance(store, RedisEventStore) or time.monotonic() < self._next_stats:
            return
        self._next_stats = time.monotonic() + self.STATS_INTERVAL_SECONDS
        if not self._checked:
            self._check_shared()
        try:
            length, lag = store.stream_stats()
        except EventStoreError:
            return
        metrics.EVENT_STORE_STREAM_LENGTH.set(length)
        metrics.EVENT_STORE_CONSUMER_LAG.set(lag)

    def close(self) -> None:
        self.store.close()

    # -- RecordEvents --------------------------------------------------------------
    def record(self, events: list[Event], invalid: dict[int, tuple[str, str]] | None = None, model=None) -> Recorded:
        """Validate, durably store, then apply the events after the served bundle's data end.

        ``invalid`` (index -> (field, reason)) names events the transport already found bad
        (a Timestamp that cannot be converted): they are rejected with that reason, in batch
        order with the others, and never validated or stored. ``model`` is the served bundle.

        Raises
        ------
        InvalidRequest
            The batch is empty or larger than the limit.
        ranking.realtime.eventlog.EventLogError, EventStoreError
            The store cannot be written; then nothing of the batch is applied or acknowledged.
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
        self.sync_model(model)
        now = time.time()
        invalid = invalid or {}
        keep = [i for i in range(len(events)) if i not in invalid]
        accepted, found = validate_batch([events[i] for i in keep], self.limits, now)
        rejections = sorted(
            [Rejection(keep[r.index], r.field, r.reason) for r in found]
            + [Rejection(i, name, reason) for i, (name, reason) in invalid.items()],
            key=lambda r: r.index,
        )
        horizon = self.store.horizon  # what the served bundle already holds
        stale = sum(1 for e in accepted if e.timestamp <= horizon)
        if accepted:
            self._count_attributed(accepted, self._append(accepted))
        metrics.EVENTS_RECORDED.labels("accepted").inc(len(accepted))
        metrics.EVENTS_STALE.inc(stale)
        if rejections:
            metrics.EVENTS_RECORDED.labels("rejected").inc(len(rejections))
            for r in rejections:
                metrics.EVENTS_REJECTED.labels(r.field).inc()
        return Recorded(len(accepted), stale, rejections)

    def _append(self, accepted: list[Event]) -> list[tuple[str, str] | None]:
        store = self.store
        if not isinstance(store, LocalEventStore):
            return store.append(accepted)  # its round trips are observed by the store
        t0 = time.perf_counter()
        before, evicted = store.bytes_appended, store.state.evicted_users
        arms = self._logged(lambda: store.append(accepted))
        metrics.EVENT_LOG_APPEND_DURATION.observe(time.perf_counter() - t0)
        metrics.EVENT_STORE_ROUND_TRIP.labels("record").observe(time.perf_counter() - t0)
        metrics.EVENT_LOG_BYTES.inc(store.bytes_appended - before)
        metrics.USER_STATE_EVICTIONS.inc(store.state.evicted_users - evicted)
        metrics.USER_STATE_USERS.set(len(store.state))
        return arms

    @staticmethod
    def _logged(write):
        """Run a local log write, exporting whether the log is writable (a full or read-only disk)."""
        try:
            out = write()
        except EventLogError as exc:
            metrics.EVENT_LOG_WRITABLE.set(0)
            reason = exc.reason if exc.reason in metrics.EVENT_LOG_WRITE_FAILURE_REASONS else "io_error"
            metrics.EVENT_LOG_WRITE_FAILURES.labels(reason).inc()
            raise
        metrics.EVENT_LOG_WRITABLE.set(1)
        return out

    @staticmethod
    def _count_attributed(events: list[Event], arms: list[tuple[str, str] | None]) -> None:
        for e, arm in zip(events, arms):
            if arm is None or e.event_type not in ATTRIBUTED_TYPES:
                continue
            metrics.ARM_EVENTS.labels(*arm, e.event_type).inc()
            if e.event_type == "purchase" and e.value > 0:
                metrics.ARM_REVENUE.labels(*arm).inc(e.value)

    # -- Rank ------------------------------------------------------------------------
    def user_events(self, user_id: str) -> tuple[Sequence[Event] | HeldEvents, bool]:
        """The customer's real-time events, and False when the store could not give them (then
        none: the Rank answers without real-time state, and says so)."""
        try:
            return self.store.held(user_id), True
        except EventStoreError as exc:
            if exc.reason != "skipped":
                log.warning("rank without real-time state", extra={"error": str(exc)})
            return [], False

    def assign(self, model, q: RankQuery, variant: str) -> Assignment:
        """The experiment arm (or forced variant) of one Rank request, reading no customer state.

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

        if self.experiments.experiments or variant:
            return self.experiments.assign(q.user_id, q.channel, consumed, variant)
        return NO_EXPERIMENT

    def prepare(self, model, q: RankQuery, variant: str) -> tuple[RankOverlay, Assignment, bool]:
        """The overlay and experiment assignment of one Rank request, and whether the customer's
        real-time state was read (False: the shared store failed; the Rank degrades).

        Raises
        ------
        InvalidRequest
            ``variant`` is too long or names neither an arm nor a variant.
        """
        assignment = self.assign(model, q, variant)
        self.sync_model(model)
        events, fresh = self.user_events(q.user_id)
        now = time.time()
        rules = self.rules.matching(q.channel, q.device, q.region, q.attributes) if self.rules.rules else []
        overlay = build_overlay(model, q.user_id, events, now, assignment.variant, rules, self.settings)
        return overlay, assignment, fresh

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
            metrics.ARM_IMPRESSIONS.labels(assignment.experiment, assignment.arm).inc()
        record = {
            "kind": "impression",
            "request_id": request_id,
            "user_id": q.user_id,
            "timestamp": time.time(),
            "experiment": assignment.experiment,
            "arm": assignment.arm,
            "strategy": result.rung.name,
            "items": result.item_ids,
        }
        store = self.store
        try:
            if isinstance(store, LocalEventStore):
                before = store.bytes_appended
                self._logged(lambda: store.impression(record))
                metrics.EVENT_LOG_BYTES.inc(store.bytes_appended - before)
            else:
                store.impression(record)
        except (EventLogError, EventStoreError) as exc:
            # The ranking is already made; losing its impression must not fail the request.
            metrics.EVENT_LOG_IMPRESSIONS_LOST.inc()
            log.error("impression not logged", extra={"request_id": request_id, "error": str(exc)})
