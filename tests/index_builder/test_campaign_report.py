"""The campaign report against a hand computation, from a file and from a server's event log, and a
planted redemption lift recovered within its interval."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from index_builder.campaign import HOLDOUT, load_campaign
from index_builder.campaign_report import report
from index_builder.portfolio import read_dataset, run_portfolios
from ranking import open_writer

ROOT = Path(__file__).resolve().parents[2]
SEND = 1_705_737_600
DAY = 86_400
CAMPAIGN = f"""
name = "week_3"
[offers]
k = 5
[context]
send_time = {SEND}
[measurement]
holdout = 0.25
arms = [
  {{ name = "popular", variant = "POPULAR", weight = 1 }},
  {{ name = "one_to_one", variant = "ONE_TO_ONE", weight = 1 }},
]
"""


def _write_events(path: Path, rows: list[tuple]) -> Path:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["user_id", "item_id", "event_type", "timestamp", "value"])
        w.writerows(rows)
    return path


@pytest.fixture(scope="module")
def run(artifacts, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("campaign_report")
    (tmp / "c.toml").write_text(CAMPAIGN)
    out = tmp / "out"
    run_portfolios(artifacts, load_campaign(tmp / "c.toml"), out, workers=2, show_progress=False)
    return out


def test_figures_match_a_hand_computation_from_a_file_and_from_an_event_log(run, tmp_path):
    customers = read_dataset(run, "customers").to_pylist()
    n = {arm: sum(c["arm"] == arm for c in customers) for arm in ("popular", "one_to_one", HOLDOUT)}
    offers = read_dataset(run, "portfolios").to_pylist() + read_dataset(run, "holdout").to_pylist()

    def first(arm: str) -> tuple[str, list[str]]:
        uid = next(c["user_id"] for c in customers if c["arm"] == arm and c["offers"] >= 2)
        return uid, [r["item_id"] for r in sorted(offers, key=lambda r: r["rank"]) if r["user_id"] == uid]

    a, a_offers = first("one_to_one")
    b, b_offers = first("popular")
    h, h_offers = first(HOLDOUT)
    other = next(i for i in (f"i{j}" for j in range(200)) if i not in a_offers + b_offers + h_offers)
    rows = [
        (a, a_offers[0], "purchase", SEND + 3600, 10.0),  # offered, in the window
        (a, a_offers[0], "purchase", SEND + 2 * DAY, 5.0),  # the same offer again: one item bought
        (a, other, "purchase", SEND + DAY, 7.0),  # not offered: total revenue only
        (a, a_offers[1], "purchase", SEND + 8 * DAY, 100.0),  # after the 7-day window
        (a, a_offers[1], "purchase", SEND - 60, 100.0),  # before the send
        (a, a_offers[1], "click", SEND + 60, 0.0),  # not a purchase
        (b, other, "purchase", SEND + 3 * DAY, 3.0),
        (h, h_offers[1], "purchase", SEND + 6 * DAY, 4.0),  # the holdout's would-be offer
        ("not-a-customer", a_offers[0], "purchase", SEND + 60, 50.0),
    ]
    events = _write_events(tmp_path / "events.csv", rows)
    rep = report(run, events, window_days=7)
    by = {r["arm"]: r for r in rep["arms"]}
    assert [r["arm"] for r in rep["arms"]] == ["popular", "one_to_one", HOLDOUT]
    assert rep["purchases_in_window"] == 5
    expected = {
        "one_to_one": dict(buyers=1, redeemers=1, offered_items_bought=1, offered_revenue=15.0, revenue=22.0),
        "popular": dict(buyers=1, redeemers=0, offered_items_bought=0, offered_revenue=0.0, revenue=3.0),
        HOLDOUT: dict(buyers=1, redeemers=1, offered_items_bought=1, offered_revenue=4.0, revenue=4.0),
    }
    for arm, want in expected.items():
        assert by[arm]["customers"] == n[arm]
        assert {k: by[arm][k] for k in want} == want, arm
    # Redemption lift of one_to_one over the holdout, by hand: rates 1/n1 and 1/nh, Katz interval.
    n1, nh = n["one_to_one"], n[HOLDOUT]
    lift = by["one_to_one"]["redemption_lift"]
    assert lift["value"] == pytest.approx(nh / n1 - 1)
    se = math.sqrt((1 - 1 / n1) + (1 - 1 / nh))
    assert lift["low"] == pytest.approx(math.exp(math.log(nh / n1) - 1.959964 * se) - 1, rel=1e-5)
    assert lift["high"] == pytest.approx(math.exp(math.log(nh / n1) + 1.959964 * se) - 1, rel=1e-5)
    assert 0 < lift["p_value"] <= 1
    # Revenue per customer: 22/n1 against 4/nh.
    rev = by["one_to_one"]["revenue_lift"]
    assert rev["value"] == pytest.approx((22 / n1) / (4 / nh) - 1)
    assert rev["low"] < rev["value"] < rev["high"]
    assert by["popular"]["redemption_lift"]["value"] != by["popular"]["redemption_lift"]["value"]  # NaN: none
    assert by["one_to_one"]["redemption_rate"]["value"] == pytest.approx(1 / n1)

    # The same events from a server's event log give the same figures.
    log_dir = tmp_path / "log"
    writer = open_writer(log_dir)
    writer.append(
        [
            {"kind": "event", "user_id": u, "item_id": i, "event_type": t, "timestamp": ts, "value": v}
            for u, i, t, ts, v in rows
        ],
        durable=True,
    )
    writer.close()
    from_log = report(run, log_dir, window_days=7)
    assert json.dumps(from_log["arms"]) == json.dumps(rep["arms"])  # NaN lifts compare as text
    # A shorter window drops the holdout's day-6 purchase.
    short = {r["arm"]: r for r in report(run, events, window_days=5)["arms"]}
    assert short[HOLDOUT]["redeemers"] == 0 and short["one_to_one"]["revenue"] == 22.0


def test_the_cli_prints_the_table(run, tmp_path):
    events = _write_events(tmp_path / "e.csv", [("u1", "i1", "purchase", SEND + 5, 2.0)])
    done = subprocess.run(
        [sys.executable, "-m", "index_builder", "campaign-report", "--portfolios", str(run), "--events", str(events)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert "campaign week_3" in lines[0] and "within 7 days: " in lines[0]
    assert [ln.split()[0] for ln in lines[2:5]] == ["popular", "one_to_one", HOLDOUT]
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "index_builder",
            "campaign-report",
            "--portfolios",
            str(tmp_path),
            "--events",
            str(events),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and "not the output of a finished portfolio run" in bad.stderr


def test_a_planted_redemption_lift_is_recovered(artifacts, tmp_path):
    # 6000 listed customers (unknown to the bundle: each gets the popular fallback, quick to rank),
    # half held out; the arm redeems its first offer at 13%, the holdout at 10% (+30%).
    ids = [f"c{i}" for i in range(6000)]
    (tmp_path / "list.txt").write_text("\n".join(ids))
    (tmp_path / "c.toml").write_text(
        f'name = "planted"\n[who]\nlist = "list.txt"\n[offers]\nk = 3\n[context]\nsend_time = {SEND}\n'
        "[measurement]\nholdout = 0.5\n"
    )
    out = tmp_path / "out"
    run_portfolios(artifacts, load_campaign(tmp_path / "c.toml"), out, workers=2, show_progress=False)
    arm_of = {c["user_id"]: c["arm"] for c in read_dataset(out, "customers").to_pylist()}
    top = {
        r["user_id"]: r["item_id"]
        for r in read_dataset(out, "portfolios").to_pylist() + read_dataset(out, "holdout").to_pylist()
        if r["rank"] == 1
    }
    rng = np.random.default_rng(4)
    rows = []
    for uid in ids:
        p = 0.10 if arm_of[uid] == HOLDOUT else 0.13
        if rng.random() < p:
            rows.append((uid, top[uid], "purchase", SEND + int(rng.integers(0, 7 * DAY)), 20.0))
        if rng.random() < 0.3:  # unrelated shopping, the same in both groups
            rows.append((uid, "not-offered", "purchase", SEND + int(rng.integers(0, 7 * DAY)), 10.0))
    rep = report(out, _write_events(tmp_path / "e.csv", rows))
    arm = next(r for r in rep["arms"] if r["arm"] == "one_to_one")
    lift = arm["redemption_lift"]
    assert lift["low"] < 0.30 < lift["high"] and lift["low"] > 0 and lift["p_value"] < 0.05, lift
    assert 0.1 < lift["value"] < 0.5
    # Offered revenue follows; the unrelated shopping shows no lift of its own.
    assert arm["offered_revenue_lift"]["low"] > 0
    buyers = arm["buyer_lift"]
    assert buyers["low"] < 0.3
