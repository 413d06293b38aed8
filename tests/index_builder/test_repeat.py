"""Buy again: the re-purchase tables against a plain reference, the learned policy (a staple
comes back when due, a durable never does, ratings keep today's behaviour), the features,
the ``last_basket`` split and the evaluation's repeat/new split."""

from __future__ import annotations

import json
from collections import defaultdict

import numpy as np
import pyarrow as pa
import pytest
from tests_support import SMALL_BUILD

from index_builder.build import build, run_all
from index_builder.config import BuildConfig
from index_builder.evaluate import EvalConfig, repeat_new_metrics
from index_builder.fit import fit, read_inputs
from index_builder.repeat import basket_keys, rebought_pairs, repeat_tables
from index_builder.splits import Protocol, SplitError, split
from index_builder.synthetic import make_grocery, make_shop, write_shop
from ranking import FEATURE_NAMES, Ranker, RankingModel, RankQuery
from ranking.pipeline.features import Purchases, Request

DAY = 86_400
T0 = 1_700_000_000
COL = {n: j for j, n in enumerate(FEATURE_NAMES)}
GROCERY_BUILD = {k: v for k, v in SMALL_BUILD.items() if k != "repeat_policy"} | {"ladder_report": False}


def _events(rows: list[tuple]) -> pa.Table:
    """(user, item, type, unix seconds, order id or None) rows as the reader's table."""
    u, i, t, ts, o = zip(*rows)
    return pa.table(
        {
            "user_id": pa.array(u, pa.string()),
            "item_id": pa.array(i, pa.string()),
            "event_type": pa.array(t, pa.string()),
            "timestamp": pa.array(ts, pa.int64()),
            "order_id": pa.array(o, pa.string()).dictionary_encode(),
        }
    )


# ---------------------------------------------------------------------------
# The tables against a plain reference
# ---------------------------------------------------------------------------


def _reference(rows, n_items, item_cat, n_cat, m):
    """Plain-Python re-purchase figures of purchase rows (user, item, ts, basket key)."""
    baskets = defaultdict(dict)  # user -> basket key -> start
    for u, _, t, b in rows:
        baskets[u][b] = min(baskets[u].get(b, t), t)
    lines = defaultdict(dict)  # (u, i) -> basket -> last ts in it
    for u, i, t, b in rows:
        lines[(u, i)][b] = max(lines[(u, i)].get(b, t), t)
    pair = {}
    for (u, i), per in lines.items():
        starts = sorted(baskets[u][b] for b in per)
        last_b = max(baskets[u], key=lambda b: (baskets[u][b], -1))
        n = len(per)
        pair[(u, i)] = {
            "count": n,
            "last": max(per.values()),
            "interval": (starts[-1] - starts[0]) / DAY / (n - 1) if n > 1 else np.nan,
            "in_last": baskets[u][last_b] in [baskets[u][b] for b in per],
        }
    buyers, repeaters = np.zeros(n_items), np.zeros(n_items)
    for (_, i), p in pair.items():
        buyers[i] += 1
        repeaters[i] += p["count"] > 1
    shop = repeaters.sum() / buyers.sum()
    cat_b = np.bincount(item_cat, weights=buyers, minlength=n_cat)
    cat_r = np.bincount(item_cat, weights=repeaters, minlength=n_cat)
    cat_rate = (cat_r + m * shop) / (cat_b + m)
    rate = (repeaters + m * cat_rate[item_cat]) / (buyers + m)
    return pair, rate


def test_tables_match_a_plain_reference_with_orders_and_days():
    rng = np.random.default_rng(3)
    n_users, n_items, n_cat = 12, 9, 3
    item_cat = np.arange(n_items) % n_cat
    rows = []
    for _ in range(300):
        u, i = int(rng.integers(n_users)), int(rng.integers(n_items))
        day = int(rng.integers(0, 40))
        # Half the purchases carry an order id (several orders a day possible), half are day baskets.
        order = f"o{u}-{day}-{int(rng.integers(2))}" if rng.random() < 0.5 else None
        rows.append((f"u{u}", f"i{i}", "purchase", T0 + day * DAY + int(rng.integers(0, 3600)), order))
    rows.append(("u0", "i0", "view", T0, None))  # not a purchase: no line
    ev = _events(rows)
    keys = basket_keys(ev)
    u = np.array([int(r[0][1:]) for r in rows])
    i = np.array([int(r[1][1:]) for r in rows])
    ts = ev["timestamp"].to_numpy()
    bought = np.array([r[2] == "purchase" for r in rows])
    cfg = BuildConfig(repeat_shrink=5.0)
    cat_indptr = np.arange(n_items + 1, dtype=np.int64)
    cat_names = np.array([f"c{c}" for c in range(n_cat)])
    tables = repeat_tables(
        u, i, ts, keys, bought, n_users, n_items, cat_indptr, item_cat.astype(np.int32), cat_names, cfg
    )
    a = tables.arrays
    pair, rate = _reference(
        [(uu, ii, tt, kk) for uu, ii, tt, kk, b in zip(u, i, ts, keys, bought) if b], n_items, item_cat, n_cat, 5.0
    )
    np.testing.assert_allclose(a["item_repeat_rate"], rate, rtol=1e-5)
    got = {}
    for r in range(n_users):
        for j in range(a["user_buy_indptr"][r], a["user_buy_indptr"][r + 1]):
            got[(r, int(a["user_buy_items"][j]))] = j
    assert set(got) == set(pair)
    for key, j in got.items():
        ref = pair[key]
        assert a["user_buy_baskets"][j] == ref["count"], key
        assert a["user_buy_last"][j] == ref["last"], key
        assert a["user_buy_in_last"][j] == ref["in_last"], key
        np.testing.assert_allclose(a["user_buy_interval"][j], ref["interval"], rtol=1e-5, equal_nan=True)
    for r in range(n_users):
        mine = [p for k, p in pair.items() if k[0] == r]
        lines = sum(p["count"] for p in mine)
        np.testing.assert_allclose(a["user_repeat_share"][r], (lines - len(mine)) / lines, rtol=1e-6)
    # Day baskets and order baskets never merge: a day key is negative, an order code not.
    assert ((keys < 0) == np.array([r[4] is None for r in rows])).all()


def test_last_basket_split_holds_out_from_the_last_basket_on():
    rows = [
        ("a", "i1", "purchase", T0, "o1"),
        ("a", "i2", "view", T0 + 5 * DAY, None),
        ("a", "i1", "purchase", T0 + 10 * DAY, "o2"),
        ("a", "i5", "view", T0 + 9 * DAY + 60, None),  # the day before: kept
        ("a", "i3", "view", T0 + 10 * DAY - 60, None),  # browsing the same visit before paying: held out
        ("a", "i3", "purchase", T0 + 10 * DAY + 30, "o2"),
        ("a", "i4", "view", T0 + 11 * DAY, None),  # after it: held out with it
        ("b", "i1", "purchase", T0 + 3 * DAY, "o3"),  # one basket only: stays in training
        # Two orders on one day: the cut falls just after the earlier one.
        ("c", "i1", "purchase", T0 + 20 * DAY + 100, "o4"),
        ("c", "i2", "view", T0 + 20 * DAY + 150, None),
        ("c", "i2", "purchase", T0 + 20 * DAY + 200, "o5"),
    ]
    train, test = split(_events(rows), Protocol("last_basket"), BuildConfig())
    assert sorted(zip(test["user_id"].to_pylist(), test["item_id"].to_pylist(), test["event_type"].to_pylist())) == [
        ("a", "i1", "purchase"),
        ("a", "i3", "purchase"),
        ("a", "i3", "view"),
        ("a", "i4", "view"),
        ("c", "i2", "purchase"),
        ("c", "i2", "view"),
    ]
    assert train.num_rows == 5
    with pytest.raises(SplitError, match="two baskets or more"):
        split(_events([r for r in rows if r[0] == "b"]), Protocol("last_basket"), BuildConfig())


def test_repeat_new_metrics_split_the_truth_by_what_was_bought_before():
    import scipy.sparse as sp

    bought = sp.csr_matrix((np.ones(2), ([0, 0], [1, 2])), shape=(1, 6))
    lists = {"A": [np.array([1, 5, 3])], "B": [np.array([3, 4, 0])]}
    truth = {0: {1, 3}}  # 1 bought before (repeat), 3 new
    out = repeat_new_metrics(lists, ["A", "B"], truth, np.array([0]), bought, (2,))
    assert out["users"] == {"repeat": 1, "new": 1}
    assert out["A"]["repeat"][2]["ndcg"] == pytest.approx(1.0)
    assert out["A"]["new"][2]["hits"] == 0 and out["B"]["new"][2]["hits"] == 1
    assert out["B"]["repeat"][2]["ndcg"] == 0.0 and out["B"]["new"][2]["ndcg"] == pytest.approx(1.0)


# ---------------------------------------------------------------------------
# The learned policy
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def grocery():
    return make_grocery(n_users=300, n_items=200, n_categories=8, days=120, seed=5)


@pytest.fixture(scope="module")
def grocery_files(grocery, tmp_path_factory):
    return write_shop(grocery, tmp_path_factory.mktemp("grocery"), "parquet")


@pytest.fixture(scope="module")
def grocery_bundle(grocery_files, tmp_path_factory):
    out = tmp_path_factory.mktemp("grocery_art")
    f = grocery_files
    version = build(f["events"], f["items"], f["users"], out, BuildConfig.load(overrides=GROCERY_BUILD), False)
    return RankingModel(version)


def _fit(files, **settings):
    cfg = BuildConfig.load(overrides={**GROCERY_BUILD, **settings})
    return fit(read_inputs(files["events"], files["items"], files["users"], cfg), cfg)


@pytest.mark.slow
def test_learned_policy_keeps_durables_excluded_and_offers_staples_again(grocery, grocery_bundle):
    reoffer = np.asarray(grocery_bundle.item_reoffer) > 0
    names = grocery_bundle.category_names
    durable = np.array([str(names.ids[c]).startswith("durable") for c in grocery_bundle.item_categories.indices])
    assert durable.any() and not reoffer[durable].any()
    assert reoffer[~durable].mean() > 0.9
    prof = grocery_bundle.manifest["repeat"]
    assert 0.5 < prof["repeat_share"] < 0.9 and prof["basket_from"] == "order_id"
    assert prof["least_replenished_categories"][0]["category"].startswith("durable")
    assert prof["most_replenished_categories"][0]["category"].startswith("fresh")


@pytest.mark.slow
def test_fixed_policies_and_category_overrides(grocery_files):
    never = _fit(grocery_files, repeat_policy="never").arrays
    always = _fit(grocery_files, repeat_policy="always").arrays
    assert not never["item_reoffer"].any() and always["item_reoffer"].all()
    assert len(always["consumed_indices"]) == 0
    # `never` excludes every bought pair, as before this policy existed.
    assert len(never["consumed_indices"]) == len(never["user_buy_items"])
    names = [str(n) for n in never["category_names"]]
    fresh = next(n for n in names if n.startswith("fresh"))
    over = _fit(grocery_files, repeat_categories={fresh: "never"}).arrays
    in_fresh = np.zeros(len(over["item_reoffer"]), bool)
    owner = np.repeat(np.arange(len(in_fresh)), np.diff(over["item_cat_indptr"]))
    in_fresh[owner[over["item_cat_ids"] == names.index(fresh)]] = True
    assert not over["item_reoffer"][in_fresh].any() and over["item_reoffer"][~in_fresh].any()
    with pytest.raises(ValueError, match="no-such-aisle"):
        _fit(grocery_files, repeat_categories={"no-such-aisle": "always"})


@pytest.mark.slow
def test_ratings_keep_todays_behaviour_exactly(tmp_path):
    """Nobody rates a film twice: the learned policy offers nothing again, and a purchase
    excludes exactly what it always did (MovieLens' case)."""
    shop = make_shop(n_users=150, n_items=120, seed=2)
    ev = shop.events
    first = np.unique(
        np.char.add(
            ev["user_id"].to_numpy(zero_copy_only=False).astype(str),
            ev["item_id"].to_numpy(zero_copy_only=False).astype(str),
        ),
        return_index=True,
    )[1]
    ratings = ev.take(np.sort(first)).set_column(2, "event_type", pa.array(["rating"] * len(first)))
    shop.events = ratings
    files = write_shop(shop, tmp_path, "csv")
    cfg = BuildConfig()
    assert rebought_pairs(read_inputs(files["events"], files["items"], None, cfg).events, cfg) == 0
    learned, never = _fit(files).arrays, _fit(files, repeat_policy="never").arrays
    assert not learned["item_reoffer"].any()
    for name in ("consumed_indptr", "consumed_indices"):
        np.testing.assert_array_equal(learned[name], never[name])
    assert not learned["item_repeat_rate"].any()


# ---------------------------------------------------------------------------
# Serving: candidates, features, due-ness
# ---------------------------------------------------------------------------


def _purchases(grocery, model):
    """Per user row: (item row, unix seconds, basket) of every purchase in the shop's log."""
    ev = grocery.events
    out = defaultdict(list)
    for u, i, t, kind, o in zip(
        ev["user_id"].to_pylist(),
        ev["item_id"].to_pylist(),
        ev["timestamp"].to_pylist(),
        ev["event_type"].to_pylist(),
        ev["order_id"].to_pylist(),
    ):
        if kind == "purchase":
            out[model.users.row(u)].append((model.items.row(i), t, o))
    return out


@pytest.mark.slow
def test_features_match_a_plain_reference_with_real_time_purchases(grocery, grocery_bundle):
    m = grocery_bundle
    ranker = Ranker(m)
    tables = ranker.tables
    log = _purchases(grocery, m)
    rng = np.random.default_rng(0)
    end = int(m.manifest["data_window"]["end_unix"])
    for urow in rng.choice(m.n_users, 15, replace=False):
        mine = log[urow]
        own_items = sorted({i for i, _, _ in mine})
        cands = np.unique(np.r_[own_items[:8], rng.choice(m.n_items, 10)]).astype(np.int32)
        live = None
        extra = []
        if urow % 2:  # real-time purchases two and five days after the data, one of an item bought before
            extra = [(own_items[0], end + 2 * DAY + 100), (int(cands[-1]), end + 5 * DAY)]
            live = Purchases(np.array([r for r, _ in extra], np.int32), np.array([t for _, t in extra], np.int64))
        t = end + 9 * DAY
        X = tables.assemble(Request(4, int(urow), None, -1, np.zeros(0, np.int32), float(t), purchases=live), cands)
        # The reference: baskets are orders in the log, days in real time.
        baskets = defaultdict(set)
        starts = {}
        for i, ts_, o in mine:
            baskets[i].add(o)
            starts[o] = min(starts.get(o, ts_), ts_)
        for i, ts_ in extra:
            key = f"day{ts_ // DAY}"
            baskets[i].add(key)
            starts[key] = ts_
        all_baskets = set(starts)
        last_basket = max(all_baskets, key=starts.get)
        for j, item in enumerate(cands):
            b = baskets.get(int(item), set())
            times = [ts_ for i, ts_, _ in mine if i == item] + [ts_ for i, ts_ in extra if i == item]
            row = X[j]
            assert row[COL["buy_count"]] == len(b)
            assert row[COL["buy_share"]] == pytest.approx(len(b) / len(all_baskets))
            assert row[COL["item_repeat_rate"]] == pytest.approx(float(m.bundle.array("item_repeat_rate")[item]))
            assert row[COL["in_last_basket"]] == float(last_basket in b)
            if not b:
                assert np.isnan(row[COL["days_since_bought"]]) and np.isnan(row[COL["buy_due"]])
                continue
            since = (t - max(times)) / DAY
            assert row[COL["days_since_bought"]] == pytest.approx(since, rel=1e-5)
            s = sorted(starts[k] for k in b)
            own = (
                (s[-1] - s[0]) / DAY / (len(b) - 1)
                if len(b) > 1
                else float(m.bundle.array("item_repeat_interval")[item])
            )
            # The bundle keeps basket starts; a real-time purchase counts at its own time.
            assert row[COL["buy_interval_days"]] == pytest.approx(own, rel=1e-3, abs=0.05)
            assert row[COL["buy_due"]] == pytest.approx(since / max(own, 1.0), rel=1e-3, abs=0.01)


@pytest.mark.slow
def test_a_staple_comes_back_when_due_and_a_durable_never(grocery, grocery_bundle):
    m = grocery_bundle
    ranker = Ranker(m)
    reoffer = np.asarray(m.item_reoffer) > 0
    log = _purchases(grocery, m)
    checked = 0
    for urow, mine in sorted(log.items(), key=lambda kv: -len(kv[1]))[:40]:
        counts = defaultdict(set)
        for i, _, o in mine:
            counts[i].add(o)
        staple = max((i for i in counts if reoffer[i]), key=lambda i: len(counts[i]), default=None)
        durables = [i for i in counts if not reoffer[i]]
        if staple is None or len(counts[staple]) < 4 or not durables:
            continue
        last = max(t for i, t, _ in mine if i == staple)
        times = sorted({t for i, t, _ in mine if i == staple})
        cycle = (times[-1] - times[0]) / (len(times) - 1)
        uid = str(m.users.ids[urow])
        due = ranker.rank(RankQuery(user_id=uid, num_results=10, event_time=float(last + cycle)))
        just = ranker.rank(RankQuery(user_id=uid, num_results=10, event_time=float(last + 600)))
        sid = str(m.items.ids[staple])
        assert sid in due.item_ids, (uid, sid, due.item_ids)
        rank_due = due.item_ids.index(sid)
        assert sid not in just.item_ids or just.item_ids.index(sid) > rank_due
        for when in (last + 600, last + cycle, last + 30 * cycle):
            res = ranker.rank(RankQuery(user_id=uid, num_results=50, event_time=float(when)))
            assert not set(m.items.id_of(np.array(durables))) & set(res.item_ids)
        checked += 1
        if checked == 5:
            break
    assert checked == 5


@pytest.mark.slow
def test_ladder_measures_buy_again_and_the_repeat_new_split(grocery_files, tmp_path):
    from index_builder.report import write_report

    f = grocery_files
    ecfg = EvalConfig(protocols=("last_basket",), ks=(10,), build=BuildConfig.load(overrides=GROCERY_BUILD))
    results = run_all(f["events"], f["items"], f["users"], ecfg)
    p = results["protocols"]["last_basket"]
    all_ = p["groups"]["all"]
    assert "BUY_AGAIN" in p["rungs"]
    assert all_["BUY_AGAIN"][10]["ndcg"] > 2 * all_["POPULAR"][10]["ndcg"]
    split_ = p["repeat_new"]
    assert split_["users"]["repeat"] > 0.8 * p["n_test_users"]
    assert split_["ONE2ONE"]["new"][10]["hits"] > split_["BUY_AGAIN"]["new"][10]["hits"]
    assert results["profile"]["repeat"]["repeat_share"] > 0.5
    report = write_report(results, tmp_path).read_text()
    assert "Repeat and new items" in report and "re-purchase" in report
    json.dumps(results, default=str)


@pytest.mark.slow
def test_explain_shows_the_re_purchase_contributions(grocery_bundle):
    m = grocery_bundle
    uid = str(m.users.ids[int(np.argmax(np.diff(m.bundle.array("user_buy_indptr"))))])
    res = Ranker(m).rank(RankQuery(user_id=uid, num_results=5, explain=True))
    names = ("buy_count", "buy_share", "days_since_bought", "buy_interval_days", "buy_due", "in_last_basket")
    for score, contrib in zip(res.scores, res.contributions):
        assert set(names) <= set(contrib)
        assert sum(contrib.values()) == pytest.approx(score, abs=1e-4)
    # The learned trees use them: on a grocery shop they carry much of the score.
    assert any(abs(c[n]) > 0.01 for c in res.contributions for n in names)
