"""The compiled feature kernel against its oracle, the NumPy feature code (tests/feature_oracle.py).

Randomized requests over two real bundles: a shop with request context and some items
without a price, and a grocery with repeat purchases. Every rung, unknown and
history-less customers, empty and repeated sessions, untimed requests and requests
before, inside and after the data window, context values known, unknown and absent,
and real-time purchases (some on the day of a bundle purchase) are drawn.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow as pa
import pytest
from feature_oracle import assemble as oracle_assemble
from tests_support import SMALL_BUILD

from index_builder.build import build
from index_builder.config import BuildConfig
from index_builder.synthetic import make_grocery, make_shop, write_shop
from ranking import FEATURE_NAMES, Ranker, RankerConfig, RankingModel, RankQuery, ServingModel, resolve_current
from ranking.bundle.schema import CONTEXT_FIELDS
from ranking.errors import BundleError
from ranking.pipeline.features import DAY, RANKED, Purchases, Request

COL = {n: j for j, n in enumerate(FEATURE_NAMES)}
RANK_COLUMNS = {rank for rank, _ in RANKED}
BUILD = {**SMALL_BUILD, "ladder_report": False}


def _bundle(shop, tmp_path_factory, name: str, **overrides) -> RankingModel:
    files = write_shop(shop, tmp_path_factory.mktemp(name), "parquet")
    out = tmp_path_factory.mktemp(f"{name}-art")
    build(
        files["events"], files["items"], files["users"], out, BuildConfig.load(overrides={**BUILD, **overrides}), False
    )
    return RankingModel(resolve_current(out))


@pytest.fixture(scope="module")
def context_bundle(tmp_path_factory):
    shop = make_shop(n_users=300, n_items=160, n_categories=6, events_per_user=25, seed=3, context=0.8)
    price = shop.items.column("price").to_pylist()
    price = [None if j % 7 == 0 else p for j, p in enumerate(price)]  # every seventh item has no price
    items = shop.items.set_column(shop.items.schema.get_field_index("price"), "price", pa.array(price, pa.float64()))
    return _bundle(dataclasses.replace(shop, items=items), tmp_path_factory, "ctx")


@pytest.fixture(scope="module")
def grocery_bundle(tmp_path_factory):
    shop = make_grocery(n_users=200, n_items=150, n_categories=8, days=90, seed=4)
    return _bundle(shop, tmp_path_factory, "grocery", repeat_policy="learned")


def _random_request(m: RankingModel, ranker: Ranker, rng: np.random.Generator) -> tuple[Request, np.ndarray]:
    end = int(m.manifest["data_window"]["end_unix"])
    start = int(m.manifest["data_window"]["start_unix"])
    kind = rng.integers(4)
    if kind == 0:
        urow = -1
    elif kind == 1:
        urow = int(rng.integers(m.n_users))
    else:
        urow = int(rng.choice(np.flatnonzero(np.asarray(m.user_has_history))))
    rung = int(rng.integers(1, 5))
    qvec = None
    if rung >= 3 and rng.random() < 0.8:
        qvec = rng.standard_normal(m.item_factors.shape[1]).astype(np.float32)
    seg = int(rng.integers(-1, m.segment_popular.n_rows)) if rng.random() < 0.5 else -1
    session = rng.integers(0, m.n_items, int(rng.integers(0, 6))).astype(np.int32)  # repeats allowed
    when = rng.integers(5)
    event_time = None if when == 0 else float([end + 1, end + 3 * DAY, (start + end) // 2, end - 2 * DAY][when - 1])
    values = {}
    for field in CONTEXT_FIELDS:
        known = list(ranker.tables.context[field].index)
        values[field] = str(rng.choice(known + ["", "no-such-value"])) if known else ""
    own = np.asarray(ranker.tables.bought.row(urow)) if urow >= 0 else np.zeros(0, np.int32)
    pool = np.unique(np.r_[own, np.asarray(ranker.tables.touched.row(urow)) if urow >= 0 else own])
    cands = np.unique(np.r_[pool[: rng.integers(0, len(pool) + 1)], rng.integers(0, m.n_items, 40)]).astype(np.int32)
    cands = rng.permutation(cands)[: int(rng.integers(1, len(cands) + 1))]
    purchases = None
    if rng.random() < 0.5:
        n_p = int(rng.integers(1, 8))
        rows = rng.choice(np.r_[cands, own, rng.integers(0, m.n_items, 3)], n_p).astype(np.int32)
        # Some on the bundle's last day (the same basket as a bundle purchase), some days later.
        times = end - int(rng.integers(0, DAY)) + rng.integers(0, 4, n_p) * DAY + rng.integers(0, DAY, n_p)
        purchases = Purchases(rows, times.astype(np.int64))
    req = Request(rung, urow, qvec, seg, session, event_time, values["channel"], values["device"], values["region"])
    return dataclasses.replace(req, purchases=purchases), cands


def _rank_of(v: np.ndarray) -> np.ndarray:
    if np.isnan(v).all():
        return np.full(len(v), np.nan, np.float32)
    r = np.empty(len(v), np.float32)
    r[np.argsort(-v, kind="stable")] = np.arange(len(v), dtype=np.float32) / len(v)
    return r


def _agree(got: np.ndarray, want: np.ndarray, what: str) -> None:
    for name, j in COL.items():
        if name in RANK_COLUMNS:
            continue
        np.testing.assert_allclose(
            got[:, j], want[:, j], rtol=1e-4, atol=1e-5, equal_nan=True, err_msg=f"{name}: {what}"
        )
    # Ranks: exactly the stable order of the kernel's own source column (a source within
    # rounding of the oracle's may order two near-equal candidates the other way).
    for rank, source in RANKED:
        np.testing.assert_array_equal(got[:, COL[rank]], _rank_of(got[:, COL[source]]), err_msg=f"{rank}: {what}")


@pytest.mark.parametrize("which", ["context_bundle", "grocery_bundle"])
def test_kernel_equals_the_numpy_oracle_on_random_requests(which, request):
    m = request.getfixturevalue(which)
    ranker = Ranker(m)
    rng = np.random.default_rng(11)
    seen = set()
    for i in range(300):
        req, cands = _random_request(m, ranker, rng)
        got = ranker.tables.assemble(req, cands)
        want = oracle_assemble(ranker.tables, req, cands)
        _agree(got, want, f"request {i} {req}")
        seen.add((req.urow < 0, req.qvec is None, len(req.session) > 0, req.purchases is not None, req.event_time))
    # The draws covered the cases the docstring names.
    assert {s[0] for s in seen} == {True, False} and {s[3] for s in seen} == {True, False}
    assert None in {s[4] for s in seen}
    assert not np.isnan(m.item_price).any() or which == "context_bundle"


def test_context_bundle_has_what_the_draws_need(context_bundle, grocery_bundle):
    assert np.isnan(np.asarray(context_bundle.item_price)).any()
    assert all(Ranker(context_bundle).tables.context[f].index for f in ("channel", "device"))
    assert np.asarray(grocery_bundle.bundle.array("user_buy_items")).size > 0


def test_pipeline_features_equal_the_oracle_on_every_rung(context_bundle):
    """Through Ranker.prepare: each request as the pipeline resolved it, the kernel's matrix
    against the oracle's."""
    m = context_bundle
    ranker = Ranker(m)
    seen: list[tuple[Request, np.ndarray, np.ndarray]] = []
    kernel_assemble = ranker.tables.assemble

    def recording(req, cands):
        X = kernel_assemble(req, cands)
        seen.append((req, np.array(cands), X))
        return X

    ranker.tables.assemble = recording
    users = [str(u) for u in m.users.ids[:40]]
    items = list(m.items.ids[:3])
    queries = [RankQuery(user_id=u, channel="web", device="mobile") for u in users]
    queries += [RankQuery(session_item_ids=items), RankQuery(), RankQuery(user_id="nobody", region="north")]
    # Visitors with a segment's attributes ("column=value" keys): the SEGMENT rung.
    singles = [str(k).split("=", 1) for k in m.bundle.array("segment_keys", mmap=False) if "|" not in str(k)]
    queries += [RankQuery(attributes={c: v}) for c, v in singles[:3]]
    for q in queries:
        prep = ranker.prepare(q)
        assert prep.features is not None and (prep.features[:, COL["rung"]] == prep.rung).all()
    assert len(seen) == len(queries)
    assert {1, 2, 3, 4} <= {int(req.rung) for req, _, _ in seen}
    for req, cands, X in seen:
        _agree(X, oracle_assemble(ranker.tables, req, cands), f"{req}")


def test_bad_request_arrays_are_refused_with_the_reason(context_bundle):
    ranker = Ranker(context_bundle)
    t = ranker.tables
    cands = np.arange(5, dtype=np.int32)
    bad = [
        (Request(4, context_bundle.n_users + 3, None, -1, np.zeros(0, np.int32), None), "user row"),
        (Request(3, -1, np.ones(3, np.float32), -1, np.zeros(0, np.int32), None), "query vector"),
        (Request(3, -1, None, -1, np.array([context_bundle.n_items], np.int32), None), "session"),
        (
            Request(
                4,
                0,
                None,
                -1,
                np.zeros(0, np.int32),
                None,
                purchases=Purchases(np.array([-4], np.int32), np.zeros(1, np.int64)),
            ),
            "purchases",
        ),
    ]
    for req, word in bad:
        with pytest.raises(ValueError, match=word):
            t.assemble(req, cands)
    with pytest.raises(ValueError, match="distinct"):
        t.assemble(Request(1, -1, None, -1, np.zeros(0, np.int32), None), np.array([1, 1], np.int32))
    # Nothing was left behind in the lent scratch: a good request still equals the oracle.
    req = Request(4, 0, None, -1, np.zeros(0, np.int32), None)
    _agree(t.assemble(req, cands), oracle_assemble(t, req, cands), "after refusals")


def test_an_inconsistent_bundle_is_refused_once_at_load(context_bundle, tmp_path):
    """A covisitation table naming an item outside the catalog stops the load, naming the array."""
    m = context_bundle
    real = m.bundle.array

    def broken(name, *args, **kwargs):
        arr = real(name, *args, **kwargs)
        if name == "covis_items" and arr.size:
            arr = np.array(arr)
            arr[0] = m.n_items + 5
        return arr

    m.bundle.array = broken
    try:
        with pytest.raises(BundleError, match="covis_items"):
            ServingModel(m)
    finally:
        m.bundle.array = real


@pytest.mark.parametrize("which", ["context_bundle", "grocery_bundle"])
def test_rank_in_one_crossing_equals_features_then_scoring(which, request):
    """Rank writes and scores the features in one compiled call; the answer is the one the
    two separate steps (the matrix, then the scorer over it) give, phased or not."""
    m = request.getfixturevalue(which)
    for n_second in (0, 20):
        ranker = Ranker(m, RankerConfig(second_phase_candidates=n_second))
        assert ranker.scorer.kind == "trees"
        users = [str(u) for u in m.users.ids[:30]]
        queries = [RankQuery(user_id=u, num_results=15) for u in users] + [RankQuery(), RankQuery(user_id="nobody")]
        for q in queries:
            got = ranker.rank(q)
            prep = ranker.prepare(q)
            assert prep.features is not None and prep.request is None
            want = ranker.scorer.score_topk(prep.features, prep.mask, q.num_results or 10, n_second=n_second)
            assert got.item_ids == m.items.id_of(prep.rows[want.indices]), q
            np.testing.assert_array_equal(np.asarray(got.scores, np.float32), want.scores)
            assert {"features", "score"} <= set(got.stage_seconds) and got.stage_seconds["features"] > 0
