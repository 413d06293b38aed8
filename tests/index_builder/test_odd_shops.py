"""Shops of unusual shape: each builds a bundle the server loads and ranks from, or its bad
rows are refused by name (file, row, column) before anything is fitted.

Every case here once failed: a shop without purchases crashed the re-purchase tables, a
one-item catalogue published a bundle the server refused, an id longer than the API takes
was kept (and the bundle refused at warm-up), a rating of 1e30 made ALS fail with NaN
factors, and one event dated in the year 9999 made every real event too old to weigh.
"""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from tests_support import SMALL_BUILD

from index_builder.build import build
from index_builder.config import BuildConfig
from index_builder.io import MAX_ABS_VALUE, MAX_ID_CHARS, InputError, ReadOptions, read_events
from index_builder.repeat import repeat_tables
from ranking import Ranker, RankingModel, RankQuery, Rung

T0 = 1_700_000_000
DAY = 86_400


def _write(path, header: str, rows) -> None:
    path.write_text(header + "\n" + "".join(",".join(map(str, r)) + "\n" for r in rows))


def _shop(tmp_path, rows, items) -> dict:
    files = {"events": tmp_path / "events.csv", "items": tmp_path / "items.csv"}
    _write(files["events"], "user_id,item_id,event_type,timestamp", rows)
    _write(files["items"], "item_id,category,price", [(i, "ab"[n % 2], 5 + n % 7) for n, i in enumerate(items)])
    return files


def _random_events(rng, n_users: int, items: list[str], n: int, types, t0: int = T0, days: int = 60):
    return [
        (f"u{rng.integers(n_users)}", items[rng.integers(len(items))], types[rng.integers(len(types))], t)
        for t in sorted(t0 + rng.integers(0, days * DAY, n))
    ]


def _build(files, out):
    return build(
        files["events"], files["items"], None, out, BuildConfig.load(overrides=SMALL_BUILD), show_progress=False
    )


def _serves(path) -> Ranker:
    """The bundle loads, warms as the server does, and ranks a known customer one to one."""
    model = RankingModel(path)
    ranker = Ranker(model)
    ranker.warm()
    row = int(np.flatnonzero(np.asarray(model.user_has_history))[0])
    result = ranker.rank(RankQuery(user_id=str(model.users.ids[row]), num_results=5))
    assert result.rung == Rung.ONE_TO_ONE and result.item_ids
    return ranker


@pytest.mark.parametrize("kind", ["views only", "purchases only after the cutoff"])
def test_a_shop_without_purchases_to_fit_builds_and_serves(tmp_path, kind):
    rng = np.random.default_rng(5)
    items = [f"i{n}" for n in range(60)]
    rows = _random_events(rng, 150, items, 2_000, ["view", "click"])
    if kind != "views only":
        # Purchases only in the last days: the temporal split's earlier part holds none.
        rows += _random_events(rng, 150, items, 300, ["purchase"], t0=T0 + 59 * DAY, days=1)
    path = _build(_shop(tmp_path, rows, items), tmp_path / "art")
    _serves(path)


def test_repeat_tables_of_no_purchase_are_empty():
    n = 5
    u = np.arange(n, dtype=np.int32)
    tables = repeat_tables(
        u,
        u,
        np.full(n, T0, np.int64),
        -np.ones(n, np.int64),
        np.zeros(n, bool),
        n,
        n,
        np.arange(n + 1, dtype=np.int64),
        np.zeros(n, np.int32),
        np.array(["c"]),
        BuildConfig(),
    )
    a = tables.arrays
    assert len(a["user_buy_items"]) == 0 and (a["user_buy_indptr"] == 0).all()


def test_a_one_item_catalogue_builds_a_bundle_the_server_loads(tmp_path):
    rng = np.random.default_rng(6)
    rows = _random_events(rng, 120, ["solo"], 800, ["view", "click"])  # nothing consumed: still offered
    path = _build(_shop(tmp_path, rows, ["solo"]), tmp_path / "art")
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["evaluation"]["exact_head_first_tier"] == 1
    _serves(path)


def test_an_id_longer_than_the_api_takes_is_a_bad_row(tmp_path):
    rng = np.random.default_rng(7)
    items = [f"i{n}" for n in range(40)]
    rows = _random_events(rng, 100, items, 1_500, ["view", "purchase"])
    rows[3] = ("u" * (MAX_ID_CHARS + 1), *rows[3][1:])
    rows[9] = (rows[9][0], "i" * (MAX_ID_CHARS + 1), *rows[9][2:])
    rows[12] = ("v" * MAX_ID_CHARS, *rows[12][1:])  # at the limit: kept
    files = _shop(tmp_path, rows, items)
    with pytest.raises(InputError, match=rf"row 5, column 'user_id': user_id must be at most {MAX_ID_CHARS} char"):
        read_events(files["events"])
    table, report = read_events(files["events"], ReadOptions(on_bad_row="skip"))
    assert report.counts == {"long user_id": 1, "long item_id": 1}
    assert table.num_rows == len(rows) - 2
    assert "v" * MAX_ID_CHARS in table.column("user_id").to_pylist()
    # The items file too (the events now fine).
    _write(files["events"], "user_id,item_id,event_type,timestamp", [r for n, r in enumerate(rows) if n not in (3, 9)])
    _write(files["items"], "item_id", [(i,) for i in [*items, "x" * (MAX_ID_CHARS + 1)]])
    with pytest.raises(InputError, match=rf"row {len(items) + 2}, column 'item_id'"):
        _build(files, tmp_path / "art")
    assert not (tmp_path / "art").exists() or not list((tmp_path / "art").iterdir())


def test_a_value_beyond_any_rating_or_worth_is_a_bad_row(tmp_path):
    path = tmp_path / "events.csv"
    rows = [(f"u{n}", f"i{n % 3}", "rating", T0 + n, 4) for n in range(10)]
    rows[4] = ("u4", "i1", "rating", T0 + 4, "1e30")
    rows[6] = ("u6", "i0", "rating", T0 + 6, -MAX_ABS_VALUE)  # at the bound: kept
    _write(path, "user_id,item_id,event_type,timestamp,value", rows)
    with pytest.raises(InputError, match=r"row 6, column 'value': value must be at most 1e\+12 in magnitude"):
        read_events(path)
    table, report = read_events(path, ReadOptions(on_bad_row="skip", max_bad_fraction=0.2))
    assert report.counts == {"bad value": 1} and table.num_rows == 9


def test_an_event_dated_in_the_future_is_a_bad_row(tmp_path):
    path = tmp_path / "events.csv"
    now = int(time.time())
    rows = [(f"u{n}", "i1", "view", T0 + n) for n in range(10)]
    rows[2] = ("u2", "i1", "view", "9999-12-31T00:00:00Z")
    rows[7] = ("u7", "i1", "view", now + 3_600)  # an hour ahead: clocks disagree, kept
    _write(path, "user_id,item_id,event_type,timestamp", rows)
    with pytest.raises(InputError, match=r"row 4, column 'timestamp': '9999-12-31T00:00:00Z' is in the future \(after"):
        read_events(path)
    table, report = read_events(path, ReadOptions(on_bad_row="skip", max_bad_fraction=0.2))
    assert report.counts == {"bad timestamp": 1} and table.num_rows == 9
    # The bound is the reader's to set: an hour before now refuses the event an hour ahead too.
    _, report = read_events(path, ReadOptions(on_bad_row="skip", max_bad_fraction=0.3, latest=now - 3_600))
    assert report.counts == {"bad timestamp": 2}


def test_a_setting_naming_a_category_the_catalogue_lacks_is_refused_before_any_fit(tmp_path, caplog):
    rng = np.random.default_rng(8)
    items = [f"i{n}" for n in range(30)]
    files = _shop(tmp_path, _random_events(rng, 80, items, 900, ["view", "purchase"]), items)
    cfg = BuildConfig.load(overrides={**SMALL_BUILD, "repeat_categories": {"dairy": "always"}})
    with pytest.raises(ValueError, match=r"repeat_categories names categories the catalogue does not have: .'dairy'"):
        build(files["events"], files["items"], None, tmp_path / "art", cfg, show_progress=False)
    # Its error alone: no fit ran, so no fallback was announced first.
    assert not [r for r in caplog.records if r.levelname == "WARNING"]


def test_an_id_holding_a_nul_is_a_bad_row(tmp_path):
    # The bundle's fixed-width id arrays drop trailing NULs: "u1\0" would become "u1".
    path = tmp_path / "events.csv"
    rows = [(f"u{n}", "i1", "view", T0 + n) for n in range(10)]
    rows[3] = ("u1\x00", "i1", "view", T0)
    _write(path, "user_id,item_id,event_type,timestamp", rows)
    with pytest.raises(InputError, match=r"row 5, column 'user_id': user_id holds a NUL character"):
        read_events(path)


def test_a_session_of_items_never_seen_is_not_a_session(tmp_path):
    # Items listed in the catalogue but never in an event have no factors: a session of only
    # those gives no direction, and is served from the next rung down.
    rng = np.random.default_rng(9)
    items = [f"i{n}" for n in range(40)]
    files = _shop(tmp_path, _random_events(rng, 100, items, 1_500, ["view", "click"]), [*items, "ghost1", "ghost2"])
    ranker = _serves(_build(files, tmp_path / "art"))
    seen = ranker.rank(RankQuery(session_item_ids=["i1"], num_results=5))
    assert seen.rung == Rung.SESSION and len(seen.item_ids) == 5
    ghosts = ranker.rank(RankQuery(session_item_ids=["ghost1", "ghost2"], num_results=5))
    assert ghosts.rung == Rung.POPULAR and ghosts.fallback_reason == "no_user_id" and len(ghosts.item_ids) == 5
