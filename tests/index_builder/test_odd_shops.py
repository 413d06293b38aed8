"""Shops of unusual shape: each builds a bundle the server loads and ranks from.

Every case here once failed: a shop without purchases crashed the re-purchase tables, and a
one-item catalogue published a bundle the server refused.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from tests_support import SMALL_BUILD

from index_builder.build import build
from index_builder.config import BuildConfig
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
