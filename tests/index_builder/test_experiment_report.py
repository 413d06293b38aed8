"""The experiment report recovers a known lift from a simulated event log, and its intervals cover."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from index_builder.experiment_report import rate_lift, report, wilson
from ranking import EventLog


def simulate(log_dir, n_per_arm, rates, revenue_mean, seed):
    """Impressions for each arm, and clicks/purchases attributed by request id at known rates."""
    rng = np.random.default_rng(seed)
    log = EventLog(log_dir, fsync="never", segment_bytes=1 << 20)
    t = 1_790_000_000.0
    for arm, (click_p, buy_p) in rates.items():
        batch = []
        for k in range(n_per_arm):
            rid = f"{arm}-{k}"
            user = f"u{rng.integers(0, n_per_arm // 2)}"
            batch.append(
                {
                    "kind": "impression",
                    "request_id": rid,
                    "user_id": user,
                    "timestamp": t,
                    "experiment": "ladder",
                    "arm": arm,
                    "items": ["i1", "i2"],
                }
            )
            if rng.random() < click_p:
                batch.append(
                    {
                        "kind": "event",
                        "user_id": user,
                        "item_id": "i1",
                        "event_type": "click",
                        "timestamp": t,
                        "value": 0.0,
                        "request_id": rid,
                    }
                )
                if rng.random() < buy_p / click_p:
                    batch.append(
                        {
                            "kind": "event",
                            "user_id": user,
                            "item_id": "i1",
                            "event_type": "purchase",
                            "timestamp": t,
                            "value": float(rng.exponential(revenue_mean)),
                            "request_id": rid,
                        }
                    )
        # Noise the report must ignore: other experiments' forced variants and unknown requests.
        batch.append(
            {
                "kind": "impression",
                "request_id": "forced",
                "user_id": "x",
                "timestamp": t,
                "experiment": "",
                "arm": "popular",
                "items": [],
            }
        )
        batch.append(
            {
                "kind": "event",
                "user_id": "x",
                "item_id": "i9",
                "event_type": "purchase",
                "timestamp": t,
                "value": 5.0,
                "request_id": "never-served",
            }
        )
        log.append(batch)
    log.close()


def test_report_recovers_a_known_lift(tmp_path):
    # Control converts 5% of impressions, treatment 6.5%: a true purchase lift of +30%.
    simulate(tmp_path, 30_000, {"control": (0.20, 0.05), "one_to_one": (0.24, 0.065)}, 20.0, seed=11)
    rep = report(tmp_path)
    e = rep["experiments"]["ladder"]
    assert e["control"] == "control"
    ctrl, treat = e["arms"]
    assert ctrl["impressions"] == treat["impressions"] == 30_000
    assert rep["unattributed_events"] == 2
    lift = treat["purchase_lift"]
    assert lift["low"] < 0.30 < lift["high"]
    assert lift["low"] > 0 and lift["p_value"] < 0.01  # the effect is detected, not just bracketed
    assert abs(lift["value"] - 0.30) < 0.15
    click = treat["click_lift"]
    assert click["low"] < 0.20 < click["high"]
    for arm, p in ((ctrl, 0.05), (treat, 0.065)):
        r = arm["purchase_rate"]
        assert r["low"] < p < r["high"]
        assert arm["purchases"] == round(r["value"] * 30_000)
    rev = treat["revenue_lift"]  # revenue per impression scales with the purchase rate here
    assert rev["low"] < 0.30 < rev["high"]


@pytest.mark.slow
def test_report_without_effect_brackets_zero_and_cli_prints_it(tmp_path):
    simulate(tmp_path, 20_000, {"a": (0.1, 0.04), "b": (0.1, 0.04)}, 10.0, seed=5)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "index_builder",
            "experiment-report",
            "--log",
            str(tmp_path),
            "--control",
            "ladder=a",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    rep = json.loads(done.stdout)
    b = rep["experiments"]["ladder"]["arms"][1]
    assert b["arm"] == "b" and b["purchase_lift"]["low"] < 0 < b["purchase_lift"]["high"]
    text = subprocess.run(
        [sys.executable, "-m", "index_builder", "experiment-report", "--log", str(tmp_path), "--control", "ladder=a"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert text.returncode == 0 and "experiment ladder (control: a)" in text.stdout
    assert "a *" in text.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "index_builder", "experiment-report", "--log", str(tmp_path), "--experiment", "nope"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and "no impression of experiment 'nope'" in bad.stderr


@pytest.mark.parametrize("p,n", [(0.05, 400), (0.3, 100)])
def test_wilson_interval_covers_at_its_nominal_rate(p, n):
    rng = np.random.default_rng(1)
    trials = 2000
    hits = sum(lo <= p <= hi for lo, hi in (wilson(int(x), n, 1.959964) for x in rng.binomial(n, p, trials)))
    # 95% nominal: the count of covering trials is Binomial(2000, 0.95); 4 sd below is ~1881.
    assert hits >= 1880


def test_lift_interval_covers_the_true_lift():
    rng = np.random.default_rng(2)
    n, pc, pa = 5000, 0.05, 0.06
    covered = 0
    for _ in range(1000):
        _, lo, hi, _ = rate_lift(int(rng.binomial(n, pa)), n, int(rng.binomial(n, pc)), n, 1.959964)
        covered += lo <= pa / pc - 1 <= hi
    assert covered >= 925  # 95% nominal, Binomial(1000, 0.95) minus ~3.5 sd
