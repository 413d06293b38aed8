"""Request-context features (channel, device, region): the reader's optional columns, the bundle's
tables, and a reranker that learns a planted context effect and serves it through ``Ranker``."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tests_support import SMALL_BUILD

from index_builder.build import build
from index_builder.config import BuildConfig
from index_builder.feature_tables import context_codes, context_tables
from index_builder.io import InputError, ReadOptions, read_events
from index_builder.synthetic import DEVICES, make_shop, write_shop
from ranking import FEATURE_NAMES, BundleError, EventLog, Ranker, RankingModel, RankQuery, resolve_current

COL = {n: j for j, n in enumerate(FEATURE_NAMES)}
CONTEXT_FEATURES = [f"{f}_{kind}" for kind in ("item_lift", "user_share") for f in ("channel", "device", "region")]
HEADER = "user_id,item_id,event_type,timestamp"


# --- the reader ------------------------------------------------------------------------


def test_context_columns_are_trimmed_blank_is_unknown_and_dictionary_encoded(tmp_path):
    path = tmp_path / "events.csv"
    path.write_text(
        f"{HEADER},device,channel,region\n"
        "u1,i1,view,10, mobile ,app,R1\n"
        "u2,i2,view,20,,web,\n"
        "u3,i1,view,30,desktop,app,R1\n",
        encoding="utf-8",
    )
    table, report = read_events(path)
    assert report.total == 0
    assert table["device"].to_pylist() == ["mobile", None, "desktop"]
    assert table["channel"].to_pylist() == ["app", "web", "app"]
    assert table["region"].to_pylist() == ["R1", None, "R1"]
    for name in ("channel", "device", "region"):
        assert pa.types.is_dictionary(table[name].type), name


def test_missing_context_columns_read_as_unknown(tmp_path):
    path = tmp_path / "events.csv"
    path.write_text(f"{HEADER},device\nu1,i1,view,10,mobile\n", encoding="utf-8")
    table, _ = read_events(path)
    assert table["device"].to_pylist() == ["mobile"]
    assert table["channel"].to_pylist() == [None] and table["region"].to_pylist() == [None]


def test_parquet_context_of_any_scalar_type_is_read_as_text(tmp_path):
    path = tmp_path / "events.parquet"
    pq.write_table(
        pa.table(
            {
                "user_id": ["u1", "u2"],
                "item_id": ["i1", "i2"],
                "event_type": ["view", "view"],
                "timestamp": [10, 20],
                "region": pa.array([7, None], pa.int64()),
                "channel": pa.array(["app", "web"]).dictionary_encode(),
            }
        ),
        path,
    )
    table, _ = read_events(path)
    assert table["region"].to_pylist() == ["7", None]
    assert table["channel"].to_pylist() == ["app", "web"]


def test_too_long_context_value_names_file_row_and_column(tmp_path):
    path = tmp_path / "events.csv"
    path.write_text(f"{HEADER},channel\nu1,i1,view,10,app\nu2,i1,view,11,{'x' * 65}\n", encoding="utf-8")
    with pytest.raises(InputError) as err:
        read_events(path)
    assert (err.value.row, err.value.column) == (3, "channel")
    assert "at most 64 characters" in str(err.value) and str(path) in str(err.value)
    table, report = read_events(path, ReadOptions(on_bad_row="skip", max_bad_fraction=0.5))
    assert table["channel"].to_pylist() == ["app"] and report.counts == {"bad channel": 1}


def test_event_log_context_fields_become_the_columns(tmp_path):
    log = EventLog(tmp_path / "log", fsync="never")
    log.append(
        [
            {
                "kind": "event",
                "user_id": "u1",
                "item_id": "i1",
                "event_type": "view",
                "timestamp": 10.0,
                "value": 0.0,
                "channel": "app",
                "device": "mobile",
            },
            {"kind": "event", "user_id": "u2", "item_id": "i2", "event_type": "view", "timestamp": 11.0, "value": 0.0},
        ]
    )
    log.close()
    table, _ = read_events(tmp_path / "log")
    assert table["channel"].to_pylist() == ["app", None]
    assert table["device"].to_pylist() == ["mobile", None]
    assert table["region"].to_pylist() == [None, None]


# --- the tables --------------------------------------------------------------------------


def test_vocabulary_keeps_the_most_frequent_values_and_pools_the_rest():
    column = pa.chunked_array([pa.array(["a", "b", "c", "a", "d", None, "c", "a", "b", "e"]).dictionary_encode()])
    positive = np.array([1, 1, 1, 1, 1, 1, 1, 1, 1, 0], bool)  # "e" only on an event that is not positive
    codes, values, other = context_codes(column, positive, cap=2)
    assert values.tolist() == ["a", "b"] and other  # b and c tie at 2: by name
    assert codes.tolist() == [0, 1, 2, 0, 2, -1, 2, 0, 1, 2]
    codes, values, other = context_codes(column, positive, cap=16)
    assert values.tolist() == ["a", "b", "c", "d"] and not other
    assert codes.tolist() == [0, 1, 2, 0, 3, -1, 2, 0, 1, -1]


def test_item_lift_and_user_share_by_hand():
    # u0 buys i0 twice on mobile; u1 buys i0 and i1 on desktop, and i1 once more with no device.
    u = np.array([0, 0, 1, 1, 1])
    i = np.array([0, 0, 0, 1, 1])
    column = pa.array(["mobile", "mobile", "desktop", "desktop", None]).dictionary_encode()
    positive = np.ones(5, bool)
    codes = {"device": context_codes(column, positive, 16)}
    out = context_tables(u, i, positive, codes, n_users=3, n_items=2)
    assert out["context_device_values"].tolist() == ["desktop", "mobile"]
    # Everyone: desktop (2 + 1) / (4 + 2) = 0.5, mobile the same. i0: desktop (1 + 2 * 0.5) / (3 + 2) = 0.4.
    np.testing.assert_allclose(out["item_device_lift"].astype(float), [[0.8, 1.2], [4 / 3, 2 / 3]], rtol=1e-3)
    share = out["user_device_share"].astype(float)
    np.testing.assert_allclose(share[:2], [[0.0, 1.0], [1.0, 0.0]])
    assert np.isnan(share[2]).all()  # no event with a known device
    assert out["item_device_lift"].dtype == np.float16


# --- end to end: a planted effect learned and served -------------------------------------


@pytest.fixture(scope="module")
def context_shop():
    return make_shop(n_users=400, n_items=200, n_categories=6, events_per_user=30, seed=11, context=0.8)


def _build(shop, tmp_path_factory, name: str, **overrides) -> RankingModel:
    files = write_shop(shop, tmp_path_factory.mktemp(name), "csv")
    out = tmp_path_factory.mktemp(f"{name}-art")
    cfg = BuildConfig.load(overrides={**SMALL_BUILD, "ladder_report": False, **overrides})
    build(files["events"], files["items"], files["users"], out, cfg, show_progress=False)
    return RankingModel(resolve_current(out))


@pytest.fixture(scope="module")
def context_model(context_shop, tmp_path_factory):
    return _build(context_shop, tmp_path_factory, "ctx")


@pytest.fixture(scope="module")
def blind_model(context_shop, tmp_path_factory):
    """The same shop built without the context tables."""
    return _build(context_shop, tmp_path_factory, "blind", context_features=False)


def _device_preference(model: RankingModel, shop, users: list[int]) -> np.ndarray:
    """Per user and device asked: how many of the top 10 are in the favourite category of each device."""
    ranker = Ranker(model)
    out = np.zeros((len(users), len(DEVICES), len(DEVICES)))
    for j, u in enumerate(users):
        for d, device in enumerate(DEVICES):
            res = ranker.rank(RankQuery(user_id=f"u{u}", device=device, num_results=10))
            cats = shop.item_category[model.items.lookup(res.item_ids)]
            for k in range(len(DEVICES)):
                out[j, d, k] = np.sum(cats == shop.device_favourite[u, k])
    return out


def test_reranker_learns_the_planted_device_and_channel_effects(context_model):
    gain = context_model.manifest["scoring"]["training"]["feature_importance_gain"]
    assert gain["device_item_lift"] > 0
    assert sum(gain[f] for f in CONTEXT_FEATURES) > 0.05 * sum(gain.values())
    values = [str(v) for v in context_model.bundle.array("context_device_values")]
    assert sorted(values) == sorted(DEVICES.tolist())
    assert context_model.bundle.array("item_device_lift").shape == (context_model.n_items, 2)


def test_same_user_gets_the_favourite_of_the_device_they_are_on(context_model, context_shop):
    # Users whose two device favourites differ, so the device decides what they want now.
    users = [u for u in range(60) if context_shop.device_favourite[u, 0] != context_shop.device_favourite[u, 1]]
    pref = _device_preference(context_model, context_shop, users)
    # pref[:, asked, favourite of]: asked on desktop, desktop's favourite leads; on mobile, mobile's.
    on_desktop = pref[:, 0, 0] - pref[:, 0, 1]
    on_mobile = pref[:, 1, 1] - pref[:, 1, 0]
    assert on_desktop.mean() > 1.0 and on_mobile.mean() > 1.0
    # The shift comes from the request's device: the same user, asked on the other device, gets the other list.
    assert (pref[:, 1, 1] - pref[:, 0, 1]).mean() > 1.0


def test_email_visitors_see_the_newsletter(context_model, context_shop):
    ranker = Ranker(context_model)
    news = set(context_shop.newsletter_items.tolist())
    counts = {}
    for channel in ("web", "email"):
        counts[channel] = sum(
            len(
                news
                & set(
                    context_model.items.lookup(
                        ranker.rank(RankQuery(user_id=f"u{u}", channel=channel, num_results=10)).item_ids
                    ).tolist()
                )
            )
            for u in range(40)
        )
    assert counts["email"] > counts["web"] + 20


def test_without_context_tables_the_device_changes_nothing(blind_model, context_shop):
    assert blind_model.bundle.array("item_device_lift").shape == (blind_model.n_items, 0)
    gain = blind_model.manifest["scoring"]["training"]["feature_importance_gain"]
    assert all(gain[f] == 0 for f in CONTEXT_FEATURES)
    ranker = Ranker(blind_model)
    for u in range(10):
        a = ranker.rank(RankQuery(user_id=f"u{u}", device="desktop", channel="email"))
        b = ranker.rank(RankQuery(user_id=f"u{u}", device="mobile", channel="web"))
        assert a.item_ids == b.item_ids and a.scores == b.scores


def test_shop_without_context_columns_has_unknown_context_features(bundle_path):
    model = RankingModel(bundle_path)
    assert model.manifest["data_profile"]["context"]["device"] == {
        "share_of_events_with_value": 0.0,
        "distinct_values": 0,
    }
    ranker = Ranker(model)
    prep = ranker.prepare(RankQuery(user_id="u1", device="mobile", channel="app", region="R1"))
    assert np.isnan(prep.features[:, [COL[f] for f in CONTEXT_FEATURES]]).all()
    plain = ranker.rank(RankQuery(user_id="u1"))
    asked = ranker.rank(RankQuery(user_id="u1", device="mobile", channel="app", region="R1"))
    assert plain.item_ids == asked.item_ids and plain.scores == asked.scores


def test_unknown_or_missing_request_value_gives_nan(context_model):
    ranker = Ranker(context_model)
    X = ranker.prepare(RankQuery(user_id="u3", device="tv", channel="")).features
    for name in ("device_item_lift", "device_user_share", "channel_item_lift", "channel_user_share"):
        assert np.isnan(X[:, COL[name]]).all(), name
    X = ranker.prepare(RankQuery(user_id="u3", device=" mobile ")).features
    assert not np.isnan(X[:, COL["device_item_lift"]]).any()
    assert not np.isnan(X[:, COL["device_user_share"]]).any()
    X = ranker.prepare(RankQuery(user_id="nobody", device="mobile")).features
    assert np.isnan(X[:, COL["device_user_share"]]).all() and not np.isnan(X[:, COL["device_item_lift"]]).any()


def _strip_context(path, names):
    """Make ``path`` look like a bundle built before the context tables existed."""
    doc = json.loads((path / "manifest.json").read_text())
    for name in names:
        (path / f"{name}.npy").unlink()
        del doc["files"][f"{name}.npy"]
    doc["scoring"]["features"] = [f for f in doc["scoring"]["features"] if f not in CONTEXT_FEATURES]
    (path / "manifest.json").write_text(json.dumps(doc))


def test_bundles_from_before_the_context_tables_ask_for_a_rebuild(blind_model, tmp_path):
    import shutil

    # The blind bundle's trees never split on the (all-NaN) context columns, so without
    # them it is what a build of the older code wrote: 28 features and no context tables.
    old = tmp_path / "old"
    shutil.copytree(blind_model.bundle.path, old)
    _strip_context(
        old,
        [
            f"{kind}_{f}_{what}"
            for f in ("channel", "device", "region")
            for kind, what in (("context", "values"), ("item", "lift"), ("user", "share"))
        ],
    )
    # The loader refuses it by the declared schema (ranking.bundle.schema), naming what is missing.
    with pytest.raises(BundleError, match=r"context_channel_values is missing.*rebuild"):
        RankingModel(old)


def test_evaluation_asks_in_the_context_of_the_first_test_event(context_shop, tmp_path):
    import pyarrow.parquet as pq

    from index_builder.build import run_all
    from index_builder.evaluate import EvalConfig
    from index_builder.feature_tables import context_of

    files = write_shop(context_shop, tmp_path / "shop", "csv")
    events, _ = read_events(files["events"])
    ecfg = EvalConfig(
        protocols=("temporal",),
        max_users=40,
        build=BuildConfig.load(overrides={**SMALL_BUILD, "rerank": False, "ladder_report": False}),
    )
    result = run_all(files["events"], files["items"], files["users"], ecfg)["protocols"]["temporal"]
    n = result["n_test_users"]
    assert n == 40
    assert result["requests_with_context"] == {"channel": n, "device": n, "region": n}
    blind = events.drop_columns(["device"]).append_column("device", pa.nulls(events.num_rows, events["device"].type))
    pq.write_table(blind, tmp_path / "blind.parquet")
    result = run_all(tmp_path / "blind.parquet", files["items"], files["users"], ecfg)["protocols"]["temporal"]
    assert result["requests_with_context"]["device"] == 0 and result["requests_with_context"]["channel"] == n
    assert context_of(events, [1, 0]) == {
        f: [events[f][1].as_py(), events[f][0].as_py()] for f in ("channel", "device", "region")
    }
