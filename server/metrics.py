"""Every Prometheus metric of the server, in one place (names: one2one_<noun>_<unit>[_total]).

Labels are small fixed sets: ``method`` (the service's RPCs), ``code`` (gRPC status
names), ``stage`` (:data:`STAGES`), ``strategy`` (the rungs), ``reason`` (fallback
reasons of the ladder, or :data:`LOAD_FAILURE_REASONS`), ``result`` and ``trigger``
of reloads, ``version`` on the single info series of the bundle being served, and
``generation`` (0, 1, 2) of the garbage collector.
The ``process_*`` and ``python_*`` series come from prometheus_client's default
collectors on the same registry. Gauges name their multiprocess mode, for when several
worker processes write their metrics to one directory: "livemin" on one2one_serving
reads 1 only while every live worker serves, "livesum" adds in-flight requests up.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import Counter, Gauge, Histogram, disable_created_metrics

from server import _metric_values
from server.config import ServerConfig

# The *_created series double every counter and histogram for a timestamp no
# dashboard or rule here reads.
disable_created_metrics()
# Every value below is one of server._metric_values': the same files and formats, a change
# in one compiled step instead of a lock, a process check and a struct pack.
_metric_values.install()

# The stages of a Rank, in pipeline order; "respond" is the servicer building the reply.
STAGES = ("queue", "realtime", "resolve", "retrieve", "features", "score", "respond")
RETRIEVAL_PATHS = ("exact_head", "ann", "none")
LOAD_FAILURE_REASONS = ("missing", "corrupt", "incompatible", "warmup")
RELOAD_TRIGGERS = ("startup", "poll", "signal", "admin")
GC_GENERATIONS = ("0", "1", "2")


def budget_boundaries_seconds(config: ServerConfig | None = None) -> tuple[float, ...]:
    """The latency budget boundaries every histogram must have as exact bucket bounds.

    The default budget, the same less the reply margin (the part the pipeline may
    spend), and the maximum budget, in seconds, from the configuration defaults:
    "p99 over budget" is then read off a bucket edge, not interpolated across one.
    """
    c = config or ServerConfig()
    ms = {c.default_budget_ms, c.default_budget_ms - c.reply_margin_ms, c.max_budget_ms}
    return tuple(sorted(round(v / 1000.0, 6) for v in ms if v > 0))


def latency_buckets(config: ServerConfig | None = None) -> tuple[float, ...]:
    """Roughly logarithmic buckets from 0.5 ms to 2.5 s, plus the budget boundaries."""
    base = (0.0005, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.2, 0.5, 1.0, 2.5)
    return tuple(sorted(set(base) | set(budget_boundaries_seconds(config))))


LATENCY_BUCKETS = latency_buckets()
CANDIDATE_BUCKETS = (0, 10, 50, 100, 200, 400, 800, 1600, 3200, 10000)
# Young collections take tens of microseconds, a full one of an unfrozen worker tens of ms.
GC_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)

# -- RED: every RPC, by method and final status code ----------------------------------
RPC_REQUESTS = Counter("one2one_rpc_requests", "gRPC requests handled, by method and status code.", ["method", "code"])
RPC_DURATION = Histogram(
    "one2one_rpc_duration_seconds",
    "Server-side gRPC handling time, by method: from the call's arrival "
    "at the server (its wait for a handler thread included) to its reply.",
    ["method"],
    buckets=LATENCY_BUCKETS,
)
RPC_IN_FLIGHT = Gauge(
    "one2one_rpc_in_flight_requests",
    "gRPC requests being handled right now, by method.",
    ["method"],
    multiprocess_mode="livesum",
)
RPC_STALLED = Counter(
    "one2one_rpc_stalled_requests",
    "Calls cancelled because their request message had not fully arrived request_read_timeout_seconds "
    "after their headers (a stalled or hostile client holding a handler thread).",
)

# -- Rank: where the time goes and what was served -----------------------------------
STAGE_DURATION = Histogram(
    "one2one_rank_stage_duration_seconds", "Time spent in each Rank stage.", ["stage"], buckets=LATENCY_BUCKETS
)
RANK_RESPONSES = Counter(
    "one2one_rank_responses", "Rank responses by the rung of the ladder that served them.", ["strategy"]
)
RANK_FALLBACKS = Counter("one2one_rank_fallbacks", "Rank requests served below ONE_TO_ONE, by reason.", ["reason"])
RANK_DEGRADED = Counter(
    "one2one_rank_degraded", "Rank responses that cut work to meet the budget, by stage.", ["stage"]
)
RANK_LATE = Counter(
    "one2one_rank_late",
    "Rank responses sent more than 1 ms after their own budget ran out "
    "(server time; the budget is the request's, the deadline's or the default, whichever is least).",
)
RANK_RETRIEVAL = Counter(
    "one2one_rank_retrieval",
    "Rank responses by how the embedding search found their candidates: "
    "exact_head (the largest-norm items, provably the exact top k), ann (the ANN index), none (no "
    "embedding search: popular or segment lists, explicit candidates).",
    ["path"],
)
RANK_EMPTY = Counter("one2one_rank_empty_results", "Rank responses with no item (filters or exclusions left nothing).")
RANK_CANDIDATES = Histogram(
    "one2one_rank_candidates", "Candidates retrieved per Rank request.", buckets=CANDIDATE_BUCKETS
)
RANK_SCORED = Histogram(
    "one2one_rank_scored_candidates",
    "Candidates scored per Rank request (fewer than retrieved when the budget ran out).",
    buckets=CANDIDATE_BUCKETS,
)

# -- The Python runtime of each worker ------------------------------------------------
GC_PAUSES = Histogram(
    "one2one_gc_pause_seconds",
    "Time a worker stood still in Python's cyclic garbage collector, by "
    "generation (2: a full collection). The collector holds the GIL: every request in flight on "
    "that worker waits as long.",
    ["generation"],
    buckets=GC_BUCKETS,
)

# -- The bundle being served and its reloads -------------------------------------------
BUNDLE_INFO = Gauge(
    "one2one_bundle_info",
    "The bundle being served (value 1), labelled by version.",
    ["version"],
    multiprocess_mode="livemax",
)
BUNDLE_BUILD_TIME = Gauge(
    "one2one_bundle_build_timestamp_seconds", "Unix time the served bundle was built.", multiprocess_mode="livemax"
)
BUNDLE_LOAD_TIME = Gauge(
    "one2one_bundle_load_timestamp_seconds", "Unix time the served bundle was loaded.", multiprocess_mode="livemax"
)
BUNDLE_LOAD_DURATION = Gauge(
    "one2one_bundle_load_duration_seconds",
    "How long loading, verifying and warming the served bundle took.",
    multiprocess_mode="livemax",
)
WORKER_REPLACEMENTS = Counter(
    "one2one_worker_replacements",
    "Worker processes started to replace one that died (killed, crashed); 0 with a single process.",
)
BUNDLE_LOAD_FAILURES = Counter(
    "one2one_bundle_load_failures", "Bundles refused, by reason (missing, corrupt, incompatible, warmup).", ["reason"]
)
BUNDLE_RELOADS = Counter(
    "one2one_bundle_reloads",
    "Bundle load attempts, by what triggered them and their result (loaded, refused).",
    ["trigger", "result"],
)
BUNDLE_REFUSED = Gauge(
    "one2one_bundle_refused",
    "1 while CURRENT names a bundle that was refused (the old one keeps serving), else 0.",
    multiprocess_mode="livemax",
)
BUNDLE_MAX_AGE = Gauge(
    "one2one_bundle_max_age_seconds",
    "The configured age (bundle_max_age_hours) after which the served "
    "bundle counts as stale; the stale-bundle alert compares against it.",
    multiprocess_mode="livemax",
)
ANN_EFFORT = Gauge(
    "one2one_ann_effort",
    "Search effort of the served bundle's ANN index (HNSW efSearch, IVF nprobe), labelled by where it "
    "came from: bundle (the builder's tuned choice), config (the operator's ann_effort) or default.",
    ["source"],
    multiprocess_mode="livemax",
)
ANN_REFINE = Gauge(
    "one2one_ann_refine",
    "Refine factor of the served bundle's ANN search (the index is asked for n_candidates times this "
    "many, re-ranked exactly; 1: none), labelled by where it came from: bundle (the builder's tuned "
    "choice), config (the operator's ann_refine) or default.",
    ["source"],
    multiprocess_mode="livemax",
)
SCORING_CANDIDATE_SECONDS = Gauge(
    "one2one_scoring_candidate_seconds",
    "The served bundle's scoring cost: seconds to score one candidate, measured at warm-up "
    "(multiply by n_candidates for a request's scoring stage).",
    multiprocess_mode="livemax",
)
SCORING_TREES = Gauge(
    "one2one_scoring_trees",
    "Trees the served bundle's reranker walks per candidate (0: the linear scorer).",
    multiprocess_mode="livemax",
)
SECOND_PHASE_CANDIDATES = Gauge(
    "one2one_second_phase_candidates",
    "Candidates the served bundle's full reranker scores after the first phase ranked them all "
    "(0: one phase, the full model over every candidate), after any cut to fit the budget.",
    multiprocess_mode="livemax",
)
FIRST_PHASE_TREES = Gauge(
    "one2one_first_phase_trees",
    "Trees the first phase of phased scoring walks per candidate (0: the bundle records no phases).",
    multiprocess_mode="livemax",
)
PHASE_CANDIDATE_SECONDS = Gauge(
    "one2one_phase_candidate_seconds",
    "The served bundle's scoring cost per candidate in each phase (first: the prefix every candidate "
    "gets; second: the trees the second phase adds), measured at warm-up.",
    ["phase"],
    multiprocess_mode="livemax",
)
SECOND_PHASE_CUT = Gauge(
    "one2one_second_phase_cut",
    "1 when the served bundle's measured scoring cost was over its share of default_budget_ms and its "
    "second phase was cut to fit, else 0.",
    multiprocess_mode="livemax",
)
RANK_BUDGET = Gauge(
    "one2one_rank_budget_seconds",
    "The configured Rank budgets (kind: default, max), for dashboards.",
    ["kind"],
    multiprocess_mode="livemax",
)
SERVING = Gauge(
    "one2one_serving", "1 while a bundle is loaded and the server answers Rank, else 0.", multiprocess_mode="livemin"
)


# (metric, label values) -> its child: ``labels()`` checks and joins the values under a lock
# each time, a microsecond or more, and a Rank records a dozen labelled series.
_CHILDREN: dict[tuple[Any, tuple[str, ...]], Any] = {}


def child(metric: Any, *values: str) -> Any:
    """``metric.labels(*values)``, looked up once per label set (the sets are small and fixed).

    Only for metrics whose series are never removed: a removed child would keep being written.
    """
    key = (metric, values)
    found = _CHILDREN.get(key)
    if found is None:
        found = _CHILDREN.setdefault(key, metric.labels(*values))
    return found


def init_label_sets() -> None:
    """Create the fixed label combinations at zero so rates exist before the first event.

    Without this, ``rate(one2one_bundle_load_failures_total[5m])`` has no series until
    the first failure, and a dashboard or alert cannot tell "none" from "not scraped".
    """
    for reason in LOAD_FAILURE_REASONS:
        BUNDLE_LOAD_FAILURES.labels(reason)
    for trigger in RELOAD_TRIGGERS:
        for result in ("loaded", "refused"):
            BUNDLE_RELOADS.labels(trigger, result)
    for stage in STAGES:
        STAGE_DURATION.labels(stage)
    for stage in ("queue", "retrieve", "second_phase", "score", "retrieval_order"):
        RANK_DEGRADED.labels(stage)
    for path in RETRIEVAL_PATHS:
        RANK_RETRIEVAL.labels(path)
    for generation in GC_GENERATIONS:
        GC_PAUSES.labels(generation)
    BUNDLE_REFUSED.set(0)
    SERVING.set(0)


init_label_sets()


def set_config(config: ServerConfig) -> None:
    """Export the settings dashboards and alerts compare against."""
    RANK_BUDGET.labels("default").set(config.default_budget_ms / 1000.0)
    RANK_BUDGET.labels("max").set(config.max_budget_ms / 1000.0)
    BUNDLE_MAX_AGE.set(config.bundle_max_age_hours * 3600.0)


# -- Appended by other areas of the server (keep each block commented with its owner) --
# --- Real-time events, context rules and experiments (owner: server/realtime.py) ---
# Label values are fixed at startup: event results and types come from the configured event
# types, rule names and experiment/arm names from the experiments file. Never ids.
EVENTS_RECORDED = Counter(
    "one2one_events_recorded", "Events received by RecordEvents, by result (accepted, rejected).", ["result"]
)
EVENTS_REJECTED = Counter(
    "one2one_events_rejected", "Events rejected by RecordEvents, by the offending field.", ["field"]
)
EVENT_LOG_APPEND_DURATION = Histogram(
    "one2one_event_log_append_duration_seconds",
    "Time to append a batch to the event log, fsync included under the 'always' policy.",
    buckets=LATENCY_BUCKETS,
)
EVENT_LOG_BYTES = Counter(
    "one2one_event_log_appended_bytes", "Bytes appended to the event log (events and impressions)."
)
EVENT_LOG_WRITE_FAILURE_REASONS = ("no_space", "read_only", "io_error")
EVENT_LOG_WRITABLE = Gauge(
    "one2one_event_log_writable",
    "1 while the last append to this worker's event log succeeded, 0 after one failed (disk full, "
    "read-only, I/O error): RecordEvents answers UNAVAILABLE until an append succeeds again.",
    multiprocess_mode="livemin",
)
EVENT_LOG_WRITE_FAILURES = Counter(
    "one2one_event_log_write_failures",
    "Appends to the event log that failed and were taken back, by reason (no_space, read_only, io_error).",
    ["reason"],
)
EVENT_LOG_IMPRESSIONS_LOST = Counter(
    "one2one_event_log_impressions_lost", "Rank impressions that could not be written to the event log."
)
EVENT_LOG_REPLAYED = Counter(
    "one2one_event_log_replayed_records", "Records read back from the event log at startup, by kind.", ["kind"]
)
USER_STATE_USERS = Gauge(
    "one2one_user_state_users",
    "Users with real-time events held in memory (per worker process).",
    multiprocess_mode="liveall",
)
USER_STATE_EVICTIONS = Counter(
    "one2one_user_state_evictions", "Users evicted from real-time state by the memory bound (LRU)."
)
# -- the event store (config event_store: "local" or a redis:// URL) ------------------------
EVENT_STORE_OPS = ("rank_read", "record", "impression", "meta", "config", "stats", "read", "ack")
EVENT_STORE_ERROR_REASONS = ("timeout", "connection", "error")
EVENT_STORE_INFO = Gauge(
    "one2one_event_store_info",
    "1 on the series naming the event store this server writes to (store: local or redis).",
    ["store"],
    multiprocess_mode="livemax",
)
EVENT_STORE_ROUND_TRIP = Histogram(
    "one2one_event_store_round_trip_seconds",
    "Round trips to the shared event store, by operation (rank_read: a customer's real-time "
    "state for one Rank; record: a RecordEvents batch, its state update and its arm lookup in one "
    "transaction; impression; meta, config: start-up checks; stats: stream length and lag; read, "
    "ack: the builder's).",
    ["op"],
    buckets=LATENCY_BUCKETS,
)
EVENT_STORE_ERRORS = Counter(
    "one2one_event_store_errors",
    "Failed round trips to the shared event store, by operation and reason (timeout, connection, error).",
    ["op", "reason"],
)
EVENT_STORE_AVAILABLE = Gauge(
    "one2one_event_store_available",
    "1 while the last round trip to the shared event store succeeded, 0 after one failed: Rank "
    "answers without real-time state and RecordEvents is UNAVAILABLE until it is back.",
    multiprocess_mode="livemin",
)
EVENT_STORE_DURABLE = Gauge(
    "one2one_event_store_durable",
    "1 when an acknowledged event survives a crash of the store (the local log fsyncs every "
    "append; Redis has appendonly yes and appendfsync always), 0 when it could be lost or the "
    "settings cannot be read.",
    multiprocess_mode="livemin",
)
EVENT_STORE_STREAM_LENGTH = Gauge(
    "one2one_event_store_stream_entries",
    "Entries held in the shared event store's streams (all shards), sampled by the server.",
    multiprocess_mode="livemax",
)
EVENT_STORE_CONSUMER_LAG = Gauge(
    "one2one_event_store_consumer_lag_entries",
    "Stream entries the builder's consumer group has not yet acknowledged (read but unpublished, "
    "or not read), sampled by the server.",
    multiprocess_mode="livemax",
)
EVENT_STORE_PURCHASE_READS = ("whole", "rest")
EVENT_STORE_PURCHASES_READ = Counter(
    "one2one_event_store_purchases_read",
    "Purchases Ranks read from the shared event store, by read: whole (a customer's purchases since "
    "the bundle, on a pod's first Rank of them, after their set changed other than by growing, or "
    "for customers too light to keep) or rest (only those written since the pod's previous Rank).",
    ["read"],
)
EVENT_STORE_HELD_PURCHASES = Gauge(
    "one2one_event_store_held_purchases",
    "Purchases of heavy buyers the server's processes keep between Ranks (event_store_held_purchases each at most).",
    multiprocess_mode="livesum",
)
EVENTS_STALE = Counter(
    "one2one_events_stale",
    "Accepted events timed at or before the served bundle's data end: logged, already in the "
    "bundle's window, so not applied to real-time state.",
)
RANK_REALTIME = Counter("one2one_rank_realtime", "Rank requests whose user vector was re-solved from real-time events.")
RULE_APPLICATIONS = Counter(
    "one2one_rule_applications", "Rank requests restricted by a context rule, by rule.", ["rule"]
)
ARM_IMPRESSIONS = Counter(
    "one2one_experiment_impressions",
    "Rank responses served in an experiment, by experiment and arm.",
    ["experiment", "arm"],
)
ARM_EVENTS = Counter(
    "one2one_experiment_events",
    "Events attributed (by request_id) to an experiment arm, by experiment, arm and event type "
    "(click, add_to_cart, purchase).",
    ["experiment", "arm", "event_type"],
)
ARM_REVENUE = Counter(
    "one2one_experiment_revenue",
    "Purchase value attributed (by request_id) to an experiment arm.",
    ["experiment", "arm"],
)

# --- Security and load shedding (owner: server/guard.py, server/security.py, server/shedding.py) ---
# Never labelled by caller, token or peer: refusals are logged (sampled) with the caller's name.
GUARDED_METHODS = (
    "one2one.v1.RankingService/Rank",
    "one2one.v1.RankingService/RecordEvents",
    "one2one.v1.AdminService/ReloadBundle",
    "one2one.v1.AdminService/GetStatus",
)
AUTH_REFUSALS = Counter(
    "one2one_auth_refusals",
    "Calls refused for their credentials, by method and reason: missing (no credential), bad_token, "
    "unknown_certificate (UNAUTHENTICATED), wrong_role (PERMISSION_DENIED).",
    ["method", "reason"],
)
RPC_SHED = Counter(
    "one2one_rpc_shed",
    "Calls answered RESOURCE_EXHAUSTED on arrival, by method and the bound that was full: process "
    "(max_concurrent_calls), role (max_calls_per_role), rank_queue (max_queued_ranks).",
    ["method", "reason"],
)
SECURITY_FILE_RELOADS = Counter(
    "one2one_security_file_reloads",
    "New versions of the TLS and callers files seen by a worker, by file (tls, callers) and result "
    "(loaded; refused: unreadable or invalid, the last good version kept).",
    ["file", "result"],
)


def init_security_label_sets(auth: bool) -> None:
    """Zero series for the refusal and shedding counters (``auth``: the server checks callers)."""
    from server.guard import AUTH_REASONS
    from server.shedding import SHED_REASONS

    for method in GUARDED_METHODS:
        for reason in SHED_REASONS:
            RPC_SHED.labels(method, reason)
        if auth:
            for reason in AUTH_REASONS:
                AUTH_REFUSALS.labels(method, reason)
    for file in ("tls", "callers"):
        for result in ("loaded", "refused"):
            SECURITY_FILE_RELOADS.labels(file, result)
