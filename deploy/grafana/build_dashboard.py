"""Builds deploy/grafana/one2one.json, the Grafana dashboard, with Grafana's own
dashboards-as-code library (grafana-foundation-sdk, pinned to a Grafana 11 build).

Run ``python deploy/grafana/build_dashboard.py`` after editing. Tests check that the
committed JSON is what this script writes, that it type-checks against Grafana's
published schema types (``@grafana/schema`` with ``tsc``, tests/deploy/test_grafana_dashboard.py),
and that every expression evaluates against a real Prometheus scraping a real server
(tests/server/test_ops_prometheus.py).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

from grafana_foundation_sdk.builders import common as common_builder
from grafana_foundation_sdk.builders import dashboard as dash
from grafana_foundation_sdk.builders import prometheus, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models import dashboard as model

OUT = Path(__file__).with_name("one2one.json")
J = 'job=~"$job"'
RI = "$__rate_interval"
RANK = 'method="one2one.v1.RankingService/Rank"'
REALTIME = J + ', stage="realtime"'
CLIENT_CODES = "INVALID_ARGUMENT|NOT_FOUND|RESOURCE_EXHAUSTED|CANCELLED|UNAUTHENTICATED|PERMISSION_DENIED"
# Every query goes to the data source the dashboard's variable picks.
DATASOURCE = model.DataSourceRef(type_val="prometheus", uid="${datasource}")
PANEL_HEIGHT, PANEL_WIDTH = 8, 12  # two panels a row of the 24-column grid

# Series that the experiments and real-time events change adds (RecordEvents, arms);
# panels using them show "No data" until that change is deployed.
EXPERIMENT_SERIES = (
    "one2one_experiment_impressions_total",
    "one2one_experiment_events_total",
    "one2one_events_recorded_total",
    "one2one_events_rejected_total",
    "one2one_user_state_users",
)

# Series only a server whose event_store is a Redis/Valkey URL exports (one2one_event_store_*);
# with the local log their panels show "No data".
EVENT_STORE_SERIES = (
    "one2one_event_store_info",
    "one2one_event_store_round_trip_seconds_bucket",
    "one2one_event_store_errors_total",
    "one2one_event_store_available",
    "one2one_event_store_durable",
    "one2one_event_store_stream_entries",
    "one2one_event_store_consumer_lag_entries",
    "one2one_event_store_purchases_read_total",
    "one2one_event_store_held_purchases",
)


def rate(metric: str, selector: str = J, by: str = "", window: str = RI) -> str:
    agg = f"sum by ({by}) " if by else "sum "
    return f"{agg}(rate({metric}{{{selector}}}[{window}]))"


def quantile(q: float, metric: str, selector: str = J, by: str = "") -> str:
    labels = f"{by}, le" if by else "le"
    return f"histogram_quantile({q}, sum by ({labels}) (rate({metric}_bucket{{{selector}}}[{RI}])))"


def share(metric: str, by: str) -> str:
    """Per-``by`` share of Rank responses, e.g. the fallback ratio by reason."""
    return f"{rate(metric, by=by)}\n/ ignoring ({by}) group_left\n{rate('one2one_rank_responses_total')}"


def target(expr: str, legend: str, ref: str) -> prometheus.Dataquery:
    return prometheus.Dataquery().datasource(DATASOURCE).expr(expr).legend_format(legend).ref_id(ref).range()


def panel(
    title: str,
    targets: list[tuple[str, str]],
    unit: str = "short",
    description: str = "",
    thresholds: list[tuple[str, float | None]] | None = None,
) -> timeseries.Panel:
    """A time series panel: one Prometheus query per ``(expr, legend)``, refIds A, B, ...

    ``thresholds`` are ``(color, value)`` steps (the first with value None), drawn as lines.
    """
    p = (
        timeseries.Panel()
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .unit(unit)
        .height(PANEL_HEIGHT)
        .span(PANEL_WIDTH)
        .legend(
            common_builder.VizLegendOptions()
            .display_mode(common.LegendDisplayMode.LIST)
            .placement(common.LegendPlacement.BOTTOM)
            .show_legend(True)
        )
        .tooltip(
            common_builder.VizTooltipOptions().mode(common.TooltipDisplayMode.MULTI).sort(common.SortOrder.DESCENDING)
        )
    )
    for i, (expr, legend) in enumerate(targets):
        p = p.with_target(target(expr, legend, chr(ord("A") + i)))
    if thresholds:
        steps = [model.Threshold(color=c, value=v) for c, v in thresholds]
        p = p.thresholds(dash.ThresholdsConfig().mode(model.ThresholdsMode.ABSOLUTE).steps(steps))
        p = p.thresholds_style(common_builder.GraphThresholdsStyleConfig().mode(common.GraphThresholdsStyleMode.LINE))
    return p


def budget_line(legend: str = "default budget") -> tuple[str, str]:
    return (f'max(one2one_rank_budget_seconds{{{J}, kind="default"}})', legend)


ROWS: list[tuple[str, list[timeseries.Panel]]] = [
    (
        "Traffic and errors",
        [
            panel(
                "Requests per second by method and code",
                [(rate("one2one_rpc_requests_total", by="method, code"), "{{method}} {{code}}")],
                "reqps",
            ),
            panel(
                "Server error ratio (alert above 1%)",
                [(f"one2one:rpc_errors:ratio_rate5m{{{J}}}", "{{method}}")],
                "percentunit",
                description="Calls ending in a server-side error; bad requests are the caller's and excluded.",
                thresholds=[("green", None), ("red", 0.01)],
            ),
            panel(
                "Client errors per second by code",
                [(rate("one2one_rpc_requests_total", f'{J}, code=~"{CLIENT_CODES}"', by="code"), "{{code}}")],
                "reqps",
                description="Refused requests: INVALID_ARGUMENT names the bad field in its details; "
                "UNAUTHENTICATED and PERMISSION_DENIED are callers' credentials or roles (see Security and faults).",
            ),
            panel(
                "Requests in flight by instance",
                [(f"sum by (instance) (one2one_rpc_in_flight_requests{{{J}}})", "{{instance}}")],
            ),
        ],
    ),
    (
        "Latency against the budget",
        [
            panel(
                "Rank latency percentiles (server side)",
                [
                    (quantile(0.5, "one2one_rpc_duration_seconds", f"{J}, {RANK}"), "p50"),
                    (quantile(0.9, "one2one_rpc_duration_seconds", f"{J}, {RANK}"), "p90"),
                    (quantile(0.99, "one2one_rpc_duration_seconds", f"{J}, {RANK}"), "p99"),
                    budget_line(),
                ],
                "s",
            ),
            panel(
                "Rank p99 by stage",
                [(quantile(0.99, "one2one_rank_stage_duration_seconds", by="stage"), "{{stage}}"), budget_line()],
                "s",
                description="queue (waiting for a pipeline slot), realtime (events since the bundle, rules, "
                "experiment arm), resolve, retrieve, features, score, respond; "
                "the budget is an exact bucket edge.",
            ),
            panel(
                "Share of Rank calls over the default budget (alert above 1%)",
                [(f"one2one:rank_over_budget:ratio_rate5m{{{J}}}", "{{job}}")],
                "percentunit",
                thresholds=[("green", None), ("red", 0.01)],
            ),
            panel(
                "Share of Rank responses sent after their own budget + 1 ms (alert above 0.1%)",
                [(f"one2one:rank_late:ratio_rate5m{{{J}}}", "{{job}}")],
                "percentunit",
                thresholds=[("green", None), ("orange", 0.001)],
                description="Exact, per request: each request's own budget against the server's clock. "
                "The server logs one 'rank answered late' line a second with the stage times.",
            ),
            panel(
                "Candidates retrieved and scored per request (median)",
                [
                    (quantile(0.5, "one2one_rank_candidates"), "retrieved"),
                    (quantile(0.5, "one2one_rank_scored_candidates"), "scored"),
                ],
            ),
        ],
    ),
    (
        "Ladder: rungs, fallbacks, degraded, empty",
        [
            panel(
                "Rung mix",
                [(share("one2one_rank_responses_total", "strategy"), "{{strategy}}")],
                "percentunit",
                description="Share of Rank responses served by each rung of the ladder.",
            ),
            panel(
                "Fallback ratio by reason",
                [(share("one2one_rank_fallbacks_total", "reason"), "{{reason}}")],
                "percentunit",
                description="Served below ONE_TO_ONE: unknown_user, no_history, no_user_id.",
            ),
            panel(
                "Degraded ratio by stage (alert above 5%)",
                [(share("one2one_rank_degraded_total", "stage"), "{{stage}}")],
                "percentunit",
                thresholds=[("green", None), ("orange", 0.05)],
            ),
            panel(
                "Embedding searches answered exactly by the head",
                [
                    (
                        rate("one2one_rank_retrieval_total", J + ', path="exact_head"')
                        + "\n/\n"
                        + rate("one2one_rank_retrieval_total", J + ', path=~"exact_head|ann"'),
                        "exact head",
                    )
                ],
                "percentunit",
                description="Share of embedding searches the exact head (the exact_head_items largest-norm items) "
                "proved exact; the rest searched the ANN index, slower and approximate. A falling share "
                "means the new bundle's popular items no longer dominate: raise exact_head_items.",
            ),
            panel(
                "Empty results ratio",
                [(f"{rate('one2one_rank_empty_results_total')}\n/\n{rate('one2one_rank_responses_total')}", "empty")],
                "percentunit",
            ),
        ],
    ),
    (
        "Experiments and events",
        [
            panel(
                "Arm mix",
                [
                    (
                        f"{rate('one2one_experiment_impressions_total', by='experiment, arm')}\n"
                        f"/ ignoring (arm) group_left\n"
                        f"{rate('one2one_experiment_impressions_total', by='experiment')}",
                        "{{experiment}} {{arm}}",
                    )
                ],
                "percentunit",
                description="Rank responses per arm (one2one_experiment_impressions_total{experiment, arm}).",
            ),
            panel(
                "Per-arm conversion (attributed purchases per impression)",
                [
                    (
                        rate("one2one_experiment_events_total", J + ', event_type="purchase"', by="experiment, arm")
                        + "\n/\n"
                        + rate("one2one_experiment_impressions_total", by="experiment, arm"),
                        "{{experiment}} {{arm}}",
                    )
                ],
                "percentunit",
                description="Events carrying a request_id of the arm's responses; intervals and lift: "
                "python -m index_builder experiment-report.",
            ),
            panel(
                "Events accepted and rejected per second",
                [
                    (rate("one2one_events_recorded_total", J + ', result="accepted"'), "accepted"),
                    (rate("one2one_events_rejected_total", by="field"), "rejected: {{field}}"),
                ],
                "reqps",
                description="Needs the RecordEvents metrics.",
            ),
            panel(
                "Users with real-time state",
                [(f"sum(one2one_user_state_users{{{J}}})", "users")],
                description="Needs the RecordEvents metrics.",
            ),
        ],
    ),
    (
        "Event store",
        [
            panel(
                "Event store round trip p50 and p99 by operation",
                [
                    (quantile(0.5, "one2one_event_store_round_trip_seconds", by="op"), "p50 {{op}}"),
                    (quantile(0.99, "one2one_event_store_round_trip_seconds", by="op"), "p99 {{op}}"),
                ],
                "s",
                description="Round trips to the shared Redis/Valkey: rank_read (a customer's real-time state, "
                "one per Rank), record (a RecordEvents batch and its state update), impression, attribution. "
                "Alert One2oneEventStoreSlow above 10 ms at the p99.",
                thresholds=[("green", None), ("orange", 0.01)],
            ),
            panel(
                "Event store errors per second by operation and reason",
                [(rate("one2one_event_store_errors_total", by="op, reason"), "{{op}} {{reason}}")],
                "reqps",
                description="timeout, connection or error. A failed rank_read serves the Rank without real-time "
                "state; a failed record answers UNAVAILABLE and acknowledges nothing.",
            ),
            panel(
                "Share of Rank responses without real-time state (alert above 1%)",
                [
                    (
                        f"({rate('one2one_rank_degraded_total', REALTIME)} or vector(0))"
                        f"\n/\n{rate('one2one_rank_responses_total')}",
                        "without real-time state",
                    )
                ],
                "percentunit",
                description="Degraded stage realtime: the store was slow or down, so the customer's events since "
                "the bundle were not applied.",
                thresholds=[("green", None), ("orange", 0.01)],
            ),
            panel(
                "Event store available and durable, by instance",
                [
                    (f"min by (instance) (one2one_event_store_available{{{J}}})", "available {{instance}}"),
                    (f"min by (instance) (one2one_event_store_durable{{{J}}})", "durable {{instance}}"),
                    (f"count by (store) (one2one_event_store_info{{{J}}} == 1)", "instances on {{store}}"),
                ],
                description="available 0: the last round trip failed (alert One2oneEventStoreUnavailable). "
                "durable 0: the store does not fsync every write to its append-only file, so an acknowledged "
                "event could be lost in a crash (alert One2oneEventStoreNotDurable).",
            ),
            panel(
                "Stream entries and the builder's consumer lag",
                [
                    (f"max(one2one_event_store_stream_entries{{{J}}})", "entries in the streams"),
                    (f"max(one2one_event_store_consumer_lag_entries{{{J}}})", "not yet acknowledged by a build"),
                ],
                description="The lag grows between builds and falls when a build publishes and acknowledges "
                "(index_builder build --events redis://...); alert One2oneEventStoreNotConsumed when it has not "
                "fallen below a million in 26 hours.",
            ),
            panel(
                "Purchases read per second by Ranks, and heavy buyers' purchases held",
                [
                    (rate("one2one_event_store_purchases_read_total", by="read"), "read {{read}} /s"),
                    (f"sum(one2one_event_store_held_purchases{{{J}}})", "held between Ranks"),
                ],
                description="whole: a customer's purchases read in full (a pod's first Rank of them, a set "
                "changed other than by growing, or a customer under 64 purchases); rest: only those since "
                "the pod's previous Rank. Whole reads of thousands take tens of ms: if they climb while "
                "held sits at event_store_held_purchases times the processes, raise that setting.",
            ),
        ],
    ),
    (
        "Bundle and reloads",
        [
            panel(
                "Bundle age by instance",
                [
                    (f"time() - (one2one_bundle_build_timestamp_seconds{{{J}}} > 0)", "{{instance}}"),
                    (f"max(one2one_bundle_max_age_seconds{{{J}}})", "stale after"),
                ],
                "s",
                description="Since the served bundle was built; "
                "the stale-bundle alert fires past bundle_max_age_hours.",
            ),
            panel(
                "Instances per bundle version",
                [(f"count by (version) (one2one_bundle_info{{{J}}} == 1)", "{{version}}")],
                description="During a rollout two versions show; afterwards one.",
            ),
            panel(
                "Serving instances and refused bundles",
                [
                    (f"sum(one2one_serving{{{J}}})", "serving"),
                    (f"sum(one2one_bundle_refused{{{J}}})", "refusing a new bundle"),
                    (f"count(up{{{J}}} == 1)", "scraped"),
                ],
            ),
            panel(
                "Reloads by trigger and result",
                [
                    (
                        f"sum by (trigger, result) (increase(one2one_bundle_reloads_total{{{J}}}[{RI}]))",
                        "{{trigger}} {{result}}",
                    ),
                    (
                        f"sum by (reason) (increase(one2one_bundle_load_failures_total{{{J}}}[{RI}]))",
                        "refused: {{reason}}",
                    ),
                ],
            ),
            panel(
                "Bundle load duration and time since load",
                [
                    (f"max by (instance) (one2one_bundle_load_duration_seconds{{{J}}})", "load {{instance}}"),
                    (f"time() - (one2one_bundle_load_timestamp_seconds{{{J}}} > 0)", "since load {{instance}}"),
                ],
                "s",
                description="Load covers opening, checksum verification and warm-up, off the request path.",
            ),
        ],
    ),
    (
        "Security and faults",
        [
            panel(
                "Calls refused for their credentials, by method and reason",
                [(rate("one2one_auth_refusals_total", by="method, reason"), "{{method}} {{reason}}")],
                "reqps",
                description="UNAUTHENTICATED (missing, bad_token, unknown_certificate) and PERMISSION_DENIED "
                "(wrong_role); the log line `call refused` names the caller, never the token.",
            ),
            panel(
                "Calls shed on arrival, by method and bound",
                [(rate("one2one_rpc_shed_total", by="method, reason"), "{{method}} {{reason}}")],
                "reqps",
                description="RESOURCE_EXHAUSTED before queueing: process (max_concurrent_calls), role "
                "(max_calls_per_role), rank_queue (max_queued_ranks). Sustained shedding wants more pods.",
            ),
            panel(
                "Stalled requests cancelled, by instance",
                [(rate("one2one_rpc_stalled_requests_total", by="instance"), "{{instance}}")],
                "reqps",
                description="Calls whose request did not arrive within request_read_timeout_seconds of its "
                "headers: a slow or hostile client, cancelled so it cannot hold a handler thread.",
            ),
            panel(
                "Event log writable, and failed appends by reason",
                [
                    (f"min by (instance) (one2one_event_log_writable{{{J}}})", "writable {{instance}}"),
                    (
                        f"sum by (reason) (increase(one2one_event_log_write_failures_total{{{J}}}[{RI}]))",
                        "failed: {{reason}}",
                    ),
                ],
                description="0 while RecordEvents answers UNAVAILABLE because the log cannot be written (disk "
                "full, read-only, I/O error); alert One2oneEventLogUnwritable.",
            ),
            panel(
                "Worker replacements and security file reloads",
                [
                    (
                        f"sum by (instance) (increase(one2one_worker_replacements_total{{{J}}}[{RI}]))",
                        "workers replaced {{instance}}",
                    ),
                    (
                        f"sum by (file, result) (increase(one2one_security_file_reloads_total{{{J}}}[{RI}]))",
                        "{{file}} {{result}}",
                    ),
                ],
                description="A worker that died and was started again; TLS and callers files re-read after a "
                "change (refused: the last good version still serves).",
            ),
        ],
    ),
    (
        "Process",
        [
            panel(
                "CPU by instance",
                [(f"sum by (instance) (rate(process_cpu_seconds_total{{{J}}}[{RI}]))", "{{instance}}")],
                "percentunit",
            ),
            panel("Resident memory by instance", [(f"process_resident_memory_bytes{{{J}}}", "{{instance}}")], "bytes"),
            panel("Open file descriptors by instance", [(f"process_open_fds{{{J}}}", "{{instance}}")]),
            panel(
                "Time stood still in garbage collection, by generation",
                [
                    (
                        f"sum by (generation) (rate(one2one_gc_pause_seconds_sum{{{J}}}[{RI}]))",
                        "generation {{generation}}",
                    )
                ],
                "percentunit",
                description="Share of wall time worker processes spent in Python's cyclic collector, summed over "
                "workers; every request in flight on a worker waits meanwhile. Long-lived objects are "
                "frozen at start and after each reload, so full collections (generation 2) stay rare "
                "and short.",
            ),
            panel(
                "Garbage-collection pause p99 by generation",
                [(quantile(0.99, "one2one_gc_pause_seconds", by="generation"), "generation {{generation}}")],
                "s",
            ),
        ],
    ),
]


def dashboard() -> model.Dashboard:
    """The dashboard model; panel ids run 1, 2, ... in reading order, rows included."""
    builder = (
        dash.Dashboard("one2one ranking service")
        .uid("one2one-ops")
        .description(
            "Traffic, errors, latency per stage against the budget, the ladder, experiments, the shared "
            "event store, bundle freshness and reloads, refusals, shedding and faults. "
            "Alerts: deploy/prometheus/rules.yml."
        )
        .tags(["one2one", "grpc", "ranking"])
        .timezone("utc")
        .editable()
        .refresh("30s")
        .time("now-6h", "now")
        .with_variable(dash.DatasourceVariable("datasource").label("Data source").type("prometheus"))
        .with_variable(
            dash.QueryVariable("job")
            .label("Job")
            .datasource(DATASOURCE)
            .query("label_values(one2one_serving, job)")
            .refresh(model.VariableRefresh.ON_TIME_RANGE_CHANGED)
            .include_all(True)
            .multi(True)
        )
        .annotation(
            dash.AnnotationQuery()
            .name("Bundle loaded")
            .enable(True)
            .icon_color("blue")
            .datasource(DATASOURCE)
            .expr(f"changes(one2one_bundle_load_timestamp_seconds{{{J}}}[1m]) > 0")
        )
    )
    pid = 1
    # Builders are mutable and with_panel() places panels on the grid: work on a copy so
    # that every call builds the same dashboard.
    for title, row in copy.deepcopy(ROWS):
        builder = builder.with_row(dash.Row(title).id(pid))
        pid += 1
        for p in row:
            builder = builder.with_panel(p.id(pid))
            pid += 1
    return builder.build()


def render() -> str:
    return json.dumps(dashboard(), cls=JSONEncoder, indent=2, sort_keys=False) + "\n"


if __name__ == "__main__":
    OUT.write_text(render())
    print(f"wrote {OUT}")
