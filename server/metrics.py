"""Every Prometheus metric of the server, in one place (names: one2one_<noun>_<unit>[_total])."""
from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

# Latency buckets include the default (50 ms) and maximum (500 ms) request budgets exactly.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.2, 0.5, 1.0, 2.5)

RPC_REQUESTS = Counter(
    "one2one_rpc_requests", "gRPC requests handled, by method and status code.", ["method", "code"])
RPC_DURATION = Histogram(
    "one2one_rpc_duration_seconds", "Server-side gRPC handling time, by method.", ["method"],
    buckets=LATENCY_BUCKETS)
STAGE_DURATION = Histogram(
    "one2one_rank_stage_duration_seconds", "Time spent in each Rank stage.", ["stage"],
    buckets=LATENCY_BUCKETS)
RANK_RESPONSES = Counter(
    "one2one_rank_responses", "Rank responses by the rung of the ladder that served them.", ["strategy"])
RANK_FALLBACKS = Counter(
    "one2one_rank_fallbacks", "Rank requests served below ONE_TO_ONE, by reason.", ["reason"])
RANK_DEGRADED = Counter(
    "one2one_rank_degraded", "Rank responses that cut work to meet the budget, by stage.", ["stage"])
RANK_EMPTY = Counter(
    "one2one_rank_empty_results", "Rank responses with no item (filters or exclusions left nothing).")
RANK_CANDIDATES = Histogram(
    "one2one_rank_candidates", "Candidates retrieved per Rank request.",
    buckets=(0, 10, 50, 100, 200, 400, 800, 1600, 3200, 10000))
BUNDLE_INFO = Gauge(
    "one2one_bundle_info", "The bundle being served (value 1), labelled by version.", ["version"])
BUNDLE_BUILD_TIME = Gauge(
    "one2one_bundle_build_timestamp_seconds", "Unix time the served bundle was built.")
BUNDLE_LOAD_TIME = Gauge(
    "one2one_bundle_load_timestamp_seconds", "Unix time the served bundle was loaded.")
BUNDLE_LOAD_DURATION = Gauge(
    "one2one_bundle_load_duration_seconds", "How long loading and verifying the served bundle took.")
BUNDLE_LOAD_FAILURES = Counter(
    "one2one_bundle_load_failures", "Bundles refused because they were missing, corrupt or incompatible.")
SERVING = Gauge(
    "one2one_serving", "1 while a bundle is loaded and the server answers Rank, else 0.")

# --- Real-time events, context rules and experiments (RecordEvents, user state, arms) -------
# Label values are fixed at startup: event results and types come from the configured event
# types, rule names and experiment/arm names from the experiments file. Never ids.
EVENTS_RECORDED = Counter(
    "one2one_events_recorded", "Events received by RecordEvents, by result (accepted, rejected).",
    ["result"])
EVENTS_REJECTED = Counter(
    "one2one_events_rejected", "Events rejected by RecordEvents, by the offending field.", ["field"])
EVENT_LOG_APPEND_DURATION = Histogram(
    "one2one_event_log_append_duration_seconds",
    "Time to append a batch to the event log, fsync included under the 'always' policy.",
    buckets=LATENCY_BUCKETS)
EVENT_LOG_BYTES = Counter(
    "one2one_event_log_appended_bytes", "Bytes appended to the event log (events and impressions).")
EVENT_LOG_IMPRESSIONS_LOST = Counter(
    "one2one_event_log_impressions_lost", "Rank impressions that could not be written to the event log.")
EVENT_LOG_REPLAYED = Counter(
    "one2one_event_log_replayed_records", "Records read back from the event log at startup, by kind.",
    ["kind"])
USER_STATE_USERS = Gauge(
    "one2one_user_state_users", "Users with real-time events held in memory.")
USER_STATE_EVICTIONS = Counter(
    "one2one_user_state_evictions", "Users evicted from real-time state by the memory bound (LRU).")
RANK_REALTIME = Counter(
    "one2one_rank_realtime", "Rank requests whose user vector was re-solved from real-time events.")
RULE_APPLICATIONS = Counter(
    "one2one_rule_applications", "Rank requests restricted by a context rule, by rule.", ["rule"])
ARM_IMPRESSIONS = Counter(
    "one2one_experiment_impressions", "Rank responses served in an experiment, by experiment and arm.",
    ["experiment", "arm"])
ARM_EVENTS = Counter(
    "one2one_experiment_events",
    "Events attributed (by request_id) to an experiment arm, by experiment, arm and event type "
    "(click, add_to_cart, purchase).", ["experiment", "arm", "event_type"])
ARM_REVENUE = Counter(
    "one2one_experiment_revenue", "Purchase value attributed (by request_id) to an experiment arm.",
    ["experiment", "arm"])
