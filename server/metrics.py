"""Every Prometheus metric of the server, in one place (names: one2one_<noun>_<unit>[_total]).

Gauges name their multiprocess mode: with several worker processes the supervisor
aggregates the workers' files, and "livemin" on one2one_serving reads 1 only while
every live worker serves.
"""
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
    "one2one_bundle_info", "The bundle being served (value 1), labelled by version.", ["version"], multiprocess_mode="livemax")
BUNDLE_BUILD_TIME = Gauge(
    "one2one_bundle_build_timestamp_seconds", "Unix time the served bundle was built.", multiprocess_mode="livemax")
BUNDLE_LOAD_TIME = Gauge(
    "one2one_bundle_load_timestamp_seconds", "Unix time the served bundle was loaded.", multiprocess_mode="livemax")
BUNDLE_LOAD_DURATION = Gauge(
    "one2one_bundle_load_duration_seconds", "How long loading and verifying the served bundle took.", multiprocess_mode="livemax")
BUNDLE_LOAD_FAILURES = Counter(
    "one2one_bundle_load_failures", "Bundles refused because they were missing, corrupt or incompatible.")
SERVING = Gauge(
    "one2one_serving", "1 while a bundle is loaded and the server answers Rank, else 0.", multiprocess_mode="livemin")
