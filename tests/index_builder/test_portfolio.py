"""The portfolio run over a real bundle: the same rankings as Rank, rules and catalogue on every row,
a stable holdout and arms, real-time events, a grocery shop's due staples, and runs that are
interrupted leaving nothing half-written."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from tests_support import SMALL_BUILD

from index_builder.campaign import HOLDOUT, load_campaign
from index_builder.portfolio import PortfolioError, read_dataset, run_portfolios
from ranking import VARIANTS, Ranker, RankingModel, RankOverlay, RankQuery, open_writer

ROOT = Path(__file__).resolve().parents[2]
SEND = 1_705_737_600  # 2024-01-20T08:00:00Z, after the shop's data (60 days from 1_700_000_000)
LADDER = """
name = "week_3"
[offers]
k = 10
[context]
channel = "email"
send_time = 2024-01-20T08:00:00Z
[measurement]
holdout = 0.2
arms = [
  { name = "popular", variant = "POPULAR", weight = 1 },
  { name = "one_to_one", variant = "ONE_TO_ONE", weight = 1 },
]
"""


def _campaign(tmp_path: Path, text: str, name: str = "campaign.toml"):
    path = tmp_path / name
    path.write_text(text)
    return load_campaign(path)


def _rows(out: Path, name: str = "portfolios") -> list[dict]:
    return read_dataset(out, name).to_pylist()


def _by_user(rows: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in rows:
        out.setdefault(r["user_id"], []).append(r)
    for v in out.values():
        v.sort(key=lambda r: r["rank"])
    return out


@pytest.fixture(scope="module")
def ladder_run(artifacts, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ladder")
    campaign = _campaign(tmp, LADDER)
    out = tmp / "out"
    manifest = run_portfolios(artifacts, campaign, out, workers=2, chunk_size=37, show_progress=False)
    return campaign, out, manifest


def test_every_customer_once_in_their_arm_and_the_holdout_gets_nothing(ladder_run, bundle_path):
    campaign, out, manifest = ladder_run
    m = RankingModel(bundle_path)
    with_history = {str(u) for u in m.users.ids[np.flatnonzero(np.asarray(m.user_has_history))]}
    customers = _rows(out, "customers")
    assert sorted(c["user_id"] for c in customers) == sorted(with_history)
    for c in customers:
        assert c["arm"] == campaign.group(c["user_id"])[0]
    groups = Counter(c["arm"] for c in customers)
    n = len(customers)
    # Within 4 standard deviations of the configured shares (holdout 0.2, then half each).
    assert abs(groups[HOLDOUT] - 0.2 * n) < 4 * (n * 0.2 * 0.8) ** 0.5
    assert abs(groups["popular"] - 0.4 * n) < 4 * (n * 0.4 * 0.6) ** 0.5
    offers, ghost = _rows(out), _rows(out, "holdout")
    held = {c["user_id"] for c in customers if c["arm"] == HOLDOUT}
    assert held and not held & {r["user_id"] for r in offers}
    assert {r["user_id"] for r in ghost} == held and {r["arm"] for r in ghost} == {HOLDOUT}
    # The manifest counts what was written.
    assert manifest["customers"] == n and json.loads((out / "manifest.json").read_text()) == manifest
    for arm, a in manifest["arms"].items():
        assert a["customers"] == groups[arm]
        assert a["offers"] == sum(r["arm"] == arm for r in (ghost if arm == HOLDOUT else offers))
        assert sum(a["strategies"].values()) == groups[arm]
    assert manifest["arms"]["popular"]["strategies"] == {"POPULAR": groups["popular"]}
    assert manifest["arms"]["one_to_one"]["strategies"] == {"ONE_TO_ONE": groups["one_to_one"]}
    # One row per customer x rank, ranks 1..n, k offers each, every column filled.
    for uid, rows in _by_user(offers).items():
        assert [r["rank"] for r in rows] == list(range(1, 11)), uid
        assert len({r["item_id"] for r in rows}) == 10
        assert all(r["campaign"] == "week_3" and r["model_version"] == m.version for r in rows)
        scores = [r["score"] for r in rows]
        assert scores == sorted(scores, reverse=True)
        consumed = set(m.items.id_of(m.consumed.row(m.users.row(uid))))
        assert not consumed & {r["item_id"] for r in rows}, uid


def test_every_portfolio_is_what_rank_answers_for_its_arm(ladder_run, bundle_path):
    campaign, out, _ = ladder_run
    ranker = Ranker(RankingModel(bundle_path))
    ranker.warm()
    by_user = _by_user(_rows(out) + _rows(out, "holdout"))
    checked = Counter()
    for uid, rows in by_user.items():
        arm, variant = campaign.group(uid)
        q = RankQuery(user_id=uid, num_results=10, event_time=float(SEND), channel="email")
        res = ranker.rank(q, None, RankOverlay(variant=VARIANTS[variant]))
        assert [r["item_id"] for r in rows] == res.item_ids, uid
        np.testing.assert_allclose([r["score"] for r in rows], res.scores, rtol=1e-6)
        assert {r["strategy"] for r in rows} == {res.rung.name}
        checked[arm] += 1
    assert set(checked) == {"popular", "one_to_one", HOLDOUT}


def test_the_same_campaign_gives_the_same_output_whatever_the_workers(ladder_run, artifacts, tmp_path):
    campaign, out, _ = ladder_run
    again = tmp_path / "again"
    run_portfolios(artifacts, campaign, again, workers=1, chunk_size=1000, show_progress=False)

    def rows(where, name):
        keep = ("user_id", "rank", "item_id", "score", "strategy", "arm", "campaign", "model_version")
        return sorted(tuple(r[k] for k in keep) for r in _rows(where, name))

    for name in ("portfolios", "holdout"):
        assert rows(again, name) == rows(out, name)
    assert sorted(map(str, _rows(again, "customers"))) == sorted(map(str, _rows(out, "customers")))
    # A new salt reshuffles who is held out.
    other = _campaign(tmp_path, LADDER.replace("[measurement]\n", '[measurement]\nsalt = "other"\n'), "other.toml")
    third = tmp_path / "third"
    run_portfolios(artifacts, other, third, workers=1, show_progress=False)
    held = {c["user_id"] for c in _rows(out, "customers") if c["arm"] == HOLDOUT}
    held3 = {c["user_id"] for c in _rows(third, "customers") if c["arm"] == HOLDOUT}
    assert held != held3 and len(held & held3) < 0.5 * len(held)
    with pytest.raises(PortfolioError, match="exists; choose another --out or pass --replace"):
        run_portfolios(artifacts, campaign, again, workers=1, show_progress=False)


def test_rules_catalogue_prices_and_category_share_hold_on_every_row(artifacts, bundle_path, tmp_path, shop):
    m = RankingModel(bundle_path)
    price = dict(zip(shop.items["item_id"].to_pylist(), shop.items["price"].to_pylist()))
    category = dict(zip(shop.items["item_id"].to_pylist(), shop.items["category"].to_pylist()))
    promo = [i for i in shop.items["item_id"].to_pylist() if int(i[1:]) % 2 == 0]
    (tmp_path / "promo.txt").write_text("\n".join(promo + ["no-such-item"]))
    campaign = _campaign(
        tmp_path,
        f"""
name = "rules"
[who]
min_consumed = 2
[offers]
k = 6
catalogue = "promo.txt"
exclude_categories = ["cat0"]
max_price = 80
max_category_share = 0.34
[context]
channel = "email"
send_time = {SEND}
[[rules]]
name = "no_cat1_by_email"
when = {{ channel = "email" }}
exclude_categories = ["cat1"]
[[rules]]
name = "only_on_app"
when = {{ channel = "app" }}
suppress = true
""",
    )
    out = tmp_path / "out"
    manifest = run_portfolios(artifacts, campaign, out, workers=2, chunk_size=50, show_progress=False)
    assert manifest["campaign"]["rules"] == ["no_cat1_by_email", "only_on_app"]
    assert manifest["unknown_to_bundle"]["catalogue_unknown"] == 1
    rows = _rows(out)
    assert len(rows) > 300 and manifest["who"]["below_min_consumed"] > 0
    for r in rows:
        item = r["item_id"]
        assert item in promo and category[item] not in ("cat0", "cat1") and price[item] <= 80, r
    for uid, mine in _by_user(rows).items():
        per_cat = Counter(category[r["item_id"]] for r in mine)
        assert max(per_cat.values()) <= 2, (uid, per_cat)  # 0.34 x 6 offers
        assert m.consumed.row_len(m.users.row(uid)) >= 2
    # Three categories are left (cat2..cat4), two offers each: the cap keeps going past full ones.
    full = sum(len(v) == 6 for v in _by_user(rows).values())
    assert full > 0.5 * len(_by_user(rows))


def test_real_time_purchases_from_the_event_log_apply(ladder_run, artifacts, tmp_path):
    campaign, out, _ = ladder_run
    rows = _by_user(_rows(out))
    uid, mine = next((u, r) for u, r in rows.items() if r[0]["arm"] == "one_to_one")
    bought = mine[0]["item_id"]
    log_dir = tmp_path / "events"
    writer = open_writer(log_dir)
    for t, ts in (("purchase", SEND - 3600), ("purchase", SEND + 3600)):
        item = bought if ts < SEND else mine[1]["item_id"]  # the second is after the send: ignored
        writer.append(
            [{"kind": "event", "user_id": uid, "item_id": item, "event_type": t, "timestamp": ts, "value": 1.0}],
            durable=True,
        )
    writer.close()
    after = tmp_path / "after"
    manifest = run_portfolios(artifacts, campaign, after, workers=1, event_log=log_dir, show_progress=False)
    assert manifest["event_log"]["events_applied"] == 1
    again = _by_user(_rows(after))
    assert bought not in {r["item_id"] for r in again[uid]}
    assert mine[1]["item_id"] in {r["item_id"] for r in again[uid]}
    others = [u for u in rows if u != uid]
    assert all([r["item_id"] for r in again[u]] == [r["item_id"] for r in rows[u]] for u in others)


def _default_sigint() -> None:
    # As from a terminal: a test suite started in the background inherits SIGINT ignored,
    # and Python then installs no KeyboardInterrupt handler, so Ctrl-C would never reach the run.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _cli(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "index_builder", "portfolios", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_default_sigint,
    )


def _wait_for_part(partial_glob, parent: Path, proc: subprocess.Popen) -> Path:
    t0 = time.monotonic()
    while time.monotonic() - t0 < 60:
        for p in parent.glob(partial_glob):
            if any(p.glob("portfolios/*.parquet")):
                return p
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.002)
    raise AssertionError("the run never started writing")


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_an_interrupted_run_leaves_nothing_and_a_rerun_succeeds(artifacts, tmp_path, sig):
    # Many small chunks of one customer each: the run is still going when it is stopped.
    (tmp_path / "c.toml").write_text(LADDER.replace("k = 10", "k = 10\nmax_category_share = 0.2"))
    out = tmp_path / "out"
    args = ["--artifacts", str(artifacts), "--campaign", str(tmp_path / "c.toml"), "--out", str(out)]
    proc = _cli([*args, "--workers", "2", "--chunk-size", "1"])
    partial = _wait_for_part(".out.partial-*", tmp_path, proc)
    # Freeze the workers first, so the run is still going whatever the machine's speed: a
    # faster Rank once let a whole run finish and publish before the signal was handled.
    workers = [int(p) for p in os.popen(f"pgrep -P {proc.pid}").read().split()]
    assert workers
    for pid in workers:
        os.kill(pid, signal.SIGSTOP)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert not out.exists()
    if sig == signal.SIGINT:
        assert proc.returncode == 130 and "nothing was published" in err
        assert not partial.exists()  # the run removed its own
    else:
        assert proc.returncode == -signal.SIGKILL and partial.exists()
        # The workers die with it (no one is left writing into the partial directory).
        time.sleep(0.2)
        assert not [p for p in os.popen(f"pgrep -P {proc.pid}").read().split() if p]
    rerun = _cli([*args, "--quiet"])
    stdout, err = rerun.communicate(timeout=120)
    assert rerun.returncode == 0, err
    assert stdout.strip() == str(out) and not partial.exists()
    assert not list(tmp_path.glob(".out.partial-*"))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["customers"] == len(_rows(out, "customers"))


def test_the_cli_refuses_a_bad_campaign_naming_the_key(artifacts, tmp_path):
    (tmp_path / "c.toml").write_text('name = "x"\n[offers]\nk = 500\n')
    proc = _cli(["--artifacts", str(artifacts), "--campaign", str(tmp_path / "c.toml"), "--out", str(tmp_path / "o")])
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2 and "offers.k: must be an integer within [1, 100], got 500" in err
    assert not (tmp_path / "o").exists()
    (tmp_path / "c.toml").write_text('name = "x"\n[offers]\nk = 5\n[who]\nsegments = ["planet=mars"]\n')
    proc = _cli(["--artifacts", str(artifacts), "--campaign", str(tmp_path / "c.toml"), "--out", str(tmp_path / "o")])
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2 and "who.segments: none of ['planet=mars']" in err


# ---------------------------------------------------------------------------
# A grocery shop: the weekly portfolio offers each customer's due staples
# ---------------------------------------------------------------------------


@pytest.mark.slow
def test_grocery_portfolios_carry_due_staples_and_never_a_bought_durable(tmp_path):
    from index_builder.build import build
    from index_builder.config import BuildConfig
    from index_builder.synthetic import make_grocery, write_shop

    shop = make_grocery(n_users=200, n_items=150, n_categories=8, days=90, seed=11)
    files = write_shop(shop, tmp_path / "shop", "parquet")
    cfg = {k: v for k, v in SMALL_BUILD.items() if k != "repeat_policy"} | {"ladder_report": False}
    version = build(files["events"], files["items"], files["users"], tmp_path / "art", BuildConfig.load(overrides=cfg))
    m = RankingModel(version)
    end = int(max(shop.events["timestamp"].to_pylist()))
    campaign = _campaign(tmp_path, f'name = "weekly"\n[offers]\nk = 10\n[context]\nsend_time = {end + 7 * 86_400}\n')
    out = tmp_path / "out"
    run_portfolios(tmp_path / "art", campaign, out, workers=2, show_progress=False)
    bought: dict[str, set[str]] = {}
    for u, i, t in zip(*(shop.events[c].to_pylist() for c in ("user_id", "item_id", "event_type"))):
        if t == "purchase":
            bought.setdefault(u, set()).add(i)
    durable = {str(m.items.ids[r]) for r in np.flatnonzero(np.asarray(m.item_reoffer) == 0)}
    rows = _by_user(_rows(out))
    with_staple = 0
    for uid, mine in rows.items():
        offered = {r["item_id"] for r in mine}
        assert not offered & bought.get(uid, set()) & durable, uid
        with_staple += bool(offered & (bought.get(uid, set()) - durable))
    # A week after the data ends most customers have a staple due: the portfolio offers it again.
    assert with_staple > 0.8 * len(rows), (with_staple, len(rows))
