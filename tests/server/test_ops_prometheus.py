"""A real Prometheus on loopback scrapes real servers under a small load; every PromQL
expression of the dashboard and of the rules must evaluate without error and return data.

Conditions that only exist when something is wrong are created for real: one server
serves from an empty directory (not serving, errors), the other is made slow with the
test-only ``debug_rank_delay_ms`` (over budget, degraded), is told that a bundle is stale
after a second, and is handed a corrupt bundle (a refused reload).
"""

from __future__ import annotations

import importlib.util
import json
import re
import signal
import time

import grpc
import pytest
import yaml
from ops_tools import (
    DEPLOY,
    Prometheus,
    RankLoad,
    corrupt_an_array,
    publish_copy,
    sample,
    scrape,
    start_one_process,
    wait_for,
    write_config,
)

from one2one.v1 import ranking_pb2 as pb
from server.demo import wait_serving
from server.security import hash_token

RULES = DEPLOY / "prometheus" / "rules.yml"
LOAD_TOKEN = "prometheus-stack-load-token-0123"
DASHBOARD = DEPLOY / "grafana" / "one2one.json"
# What Grafana would put for its variables; 20 s windows hold ~20 one-second scrapes.
GRAFANA_VARS = {"$__rate_interval": "20s", "$job": "one2one"}
# The fallback spike compares 5 minutes with 6 hours of history: a Prometheus started
# seconds ago has one window, not two, so here its two sides must return data instead
# (promtool test rules shows it firing on 8 hours of series).
NEEDS_HISTORY = {
    "One2oneFallbackRatioSpike": ["one2one:rank_fallbacks:ratio_rate5m", "one2one:rank_fallbacks:ratio_rate6h"]
}
# The event log's full disk needs a mount (created on a real tmpfs in
# tests/server/test_faults_e2e.py): here its metric side must return data.
NEEDS_HISTORY["One2oneEventLogUnwritable"] = ["min by (job, instance) (one2one_event_log_writable)"]
# The shared event store's rules: the servers here run the local log, so the rules over the
# store's own series must evaluate but may return nothing; the real-time degraded share is 0.
NEEDS_HISTORY["One2oneRealtimeDegradedHigh"] = ["one2one:rank_realtime_degraded:ratio_rate5m"]
EVENT_STORE_ONLY = {
    "one2one:event_store_round_trip_seconds:p99_5m",
    "one2one:event_store_consumer_lag_entries:max",
    "One2oneEventStoreUnavailable",
    "One2oneEventStoreNotDurable",
    "One2oneEventStoreSlow",
    "One2oneEventStoreNotConsumed",
}
# Alerts whose condition the setup creates: each must be pending or firing.
CREATED = {
    "One2oneErrorRatioHigh",
    "One2oneRankP99OverBudget",
    "One2oneRankAnsweredLate",
    "One2oneDegradedRatioHigh",
    "One2oneBundleStale",
    "One2oneBundleReloadFailed",
    "One2oneNotServing",
}


def _dashboard_module():
    spec = importlib.util.spec_from_file_location("build_dashboard", DEPLOY / "grafana" / "build_dashboard.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def dashboard_exprs() -> list[tuple[str, str]]:
    doc = json.loads(DASHBOARD.read_text())
    out = [(f"panel {p['title']!r} {t['refId']}", t["expr"]) for p in doc["panels"] for t in p.get("targets", [])]
    out += [(f"annotation {a['name']!r}", a["expr"]) for a in doc["annotations"]["list"]]
    return out


def rule_exprs() -> list[tuple[str, str]]:
    rules = [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]
    return [(r.get("record") or r["alert"], r["expr"]) for r in rules]


def substitute(expr: str) -> str:
    for var, value in GRAFANA_VARS.items():
        expr = expr.replace(var, value)
    assert "$" not in expr, f"unsubstituted Grafana variable in {expr}"
    return expr


def test_committed_dashboard_is_what_the_builder_writes():
    assert DASHBOARD.read_text() == _dashboard_module().render()


@pytest.fixture(scope="module")
def stack(bundle_path, tmp_path_factory):
    """Server A serves (slowly, stale, reloads once, then refuses a bundle); server B has nothing to serve."""
    work = tmp_path_factory.mktemp("prom-stack")
    (work / "a").mkdir()
    (work / "b").mkdir()
    art_a, art_b = work / "a" / "artifacts", work / "b" / "artifacts"
    art_a.mkdir()
    art_b.mkdir()
    publish_copy(bundle_path, art_a, "v-served")
    # Server A checks its callers, so the refusal series exist (and one refusal is made below).
    (work / "a" / "callers.toml").write_text(
        f'[[callers]]\nname = "load"\nroles = ["rank"]\ntoken_sha256 = "{hash_token(LOAD_TOKEN)}"\n'
    )
    cfg_a = write_config(
        work / "a" / "server.toml",
        reload_interval_seconds=0.3,
        debug_rank_delay_ms=60,
        bundle_max_age_hours=0.0003,
        auth_tokens_file=str(work / "a" / "callers.toml"),
    )
    procs = []
    prom = None
    loads = []
    try:
        proc_a, ready_a = start_one_process(art_a, work / "a", cfg_a)
        procs.append(proc_a)
        proc_b, ready_b = start_one_process(art_b, work / "b")
        procs.append(proc_b)
        channel = grpc.insecure_channel(f"127.0.0.1:{ready_a['grpc_port']}")
        wait_serving(channel)
        channel.close()
        prom = Prometheus(
            work / "prometheus",
            {"one2one": [f"127.0.0.1:{ready_a['metrics_port']}", f"127.0.0.1:{ready_b['metrics_port']}"]},
            [RULES],
        )
        prom.wait_targets_up(2)
        mix = [pb.RankRequest(user_id=f"u{i}", num_results=10) for i in range(12)] + [
            pb.RankRequest(user_id="nobody", num_results=5),  # unknown_user
            pb.RankRequest(num_results=5, context=pb.Context(session_item_ids=["i1", "i2"])),  # no_user_id
            pb.RankRequest(user_id="ghost", context=pb.Context(attributes={"region": "R0"})),  # SEGMENT
            pb.RankRequest(user_id="u3", candidate_item_ids=["no-such-item"]),  # empty
            pb.RankRequest(num_results=-1),  # INVALID_ARGUMENT
        ]
        bearer = (("authorization", f"Bearer {LOAD_TOKEN}"),)
        loads.append(
            RankLoad(
                f"127.0.0.1:{ready_a['grpc_port']}", mix, threads=3, max_requests=4000, metadata=bearer
            ).__enter__()
        )
        # And a caller without a token, refused (the refusals panel).
        loads.append(
            RankLoad(
                f"127.0.0.1:{ready_a['grpc_port']}",
                [pb.RankRequest(user_id="u1")],
                threads=1,
                max_requests=50,
                pause=0.2,
            ).__enter__()
        )
        loads.append(
            RankLoad(
                f"127.0.0.1:{ready_b['grpc_port']}",
                [pb.RankRequest(user_id="u1")],
                threads=1,
                max_requests=1000,
                pause=0.05,
            ).__enter__()
        )
        # A hot reload Prometheus sees (reload panels, the "bundle loaded" annotation),
        # then a corrupt bundle that is refused while v-second keeps serving.
        time.sleep(3.0)
        publish_copy(bundle_path, art_a, "v-second")
        wait_for(
            lambda: sample(scrape(ready_a["metrics_port"]), 'one2one_bundle_info{version="v-second"}', 0) == 1,
            30,
            "the second bundle to serve",
        )
        time.sleep(2.0)
        publish_copy(bundle_path, art_a, "v-corrupt", mutate=corrupt_an_array)
        wait_for(
            lambda: sample(scrape(ready_a["metrics_port"]), "one2one_bundle_refused") == 1,
            30,
            "the corrupt bundle to be refused",
        )
        yield {"prom": prom, "a": ready_a, "b": ready_b, "loads": loads}
    finally:
        for load in loads:
            load.stop()
        if prom is not None:
            prom.close()
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=60)


def _evaluate_all(prom: Prometheus, exprs: list[tuple[str, str]], allowed_empty, timeout: float = 90.0):
    """Evaluate until every expression returns data (rules need a few evaluations first).

    A PromQL error fails at once; an empty result is retried until ``timeout``.
    """
    pending = dict(exprs)
    deadline = time.monotonic() + timeout
    while True:
        for name, expr in list(pending.items()):
            answer = prom.query(expr)
            assert answer["status"] == "success", f"{name}: {expr}\n-> {answer.get('error')}"
            if answer["data"]["result"] or allowed_empty(expr):
                del pending[name]
        if not pending or time.monotonic() > deadline:
            return pending
        time.sleep(1.0)


def test_every_rule_expression_evaluates_and_returns_data(stack):
    prom = stack["prom"]
    exprs = [(n, e) for n, e in rule_exprs() if n not in NEEDS_HISTORY]
    exprs += [(f"{alert} side {i}", e) for alert, sides in NEEDS_HISTORY.items() for i, e in enumerate(sides)]
    store_only = {e for n, e in rule_exprs() if n in EVENT_STORE_ONLY}
    empty = _evaluate_all(prom, exprs, allowed_empty=lambda e: e in store_only)
    assert not empty, f"no data for: {sorted(empty)}"
    # Prometheus itself evaluates the loaded rules without error.
    rules = [r for g in prom.api("rules")["data"]["groups"] for r in g["rules"]]
    assert len(rules) == len(rule_exprs())
    assert all(r["health"] == "ok" for r in rules), [(r["name"], r.get("lastError")) for r in rules]
    # The conditions the setup created show as pending or firing alerts; nothing else does.
    active = wait_for(
        lambda: (
            {a["labels"]["alertname"] for a in prom.api("alerts")["data"]["alerts"]} >= CREATED
            and {a["labels"]["alertname"] for a in prom.api("alerts")["data"]["alerts"]}
        ),
        60,
        f"alerts {sorted(CREATED)} to be active",
    )
    assert active == CREATED


def test_every_dashboard_expression_evaluates_and_returns_data(stack):
    prom = stack["prom"]
    live = scrape(stack["a"]["metrics_port"])
    exported = {m.group(1) for m in re.finditer(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)[{ ]", live, re.M)}
    module = _dashboard_module()
    experiment = set(module.EXPERIMENT_SERIES) | set(module.EVENT_STORE_SERIES)

    def other_branch_only(expr: str) -> bool:
        # Panels for series the experiments change adds, or only a server with a shared event
        # store exports: they must parse and evaluate, and may be empty here. Nothing else may be.
        names = set(re.findall(r"\b(one2one_[a-z_]+)\{", expr))
        missing = names - exported
        return bool(missing) and missing <= experiment

    exprs = [(n, substitute(e)) for n, e in dashboard_exprs()]
    unknown = {
        name
        for _, e in exprs
        for name in re.findall(r"\b(one2one_[a-z_]+)\{", e)
        if name not in exported and name not in experiment
    }
    assert not unknown, f"dashboard uses series no server exports: {unknown}"
    empty = _evaluate_all(prom, exprs, allowed_empty=other_branch_only)
    assert not empty, f"no data for: {sorted(empty)}"
    outcomes = [o for load in stack["loads"] for o in load.snapshot()]
    print(
        f"\nprometheus integration: {len(exprs)} dashboard expressions and {len(rule_exprs())} rule "
        f"expressions checked; load sent {len(outcomes)} Rank calls "
        f"({sum(o[2] == 'OK' for o in outcomes)} OK)"
    )
