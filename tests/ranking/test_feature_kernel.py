"""The compiled feature kernel against its oracle, the NumPy feature code (tests/feature_oracle.py).

Randomized requests over two real bundles: a shop with request context and some items
without a price, and a grocery with repeat purchases. Every rung, unknown and
history-less customers, empty and repeated sessions, untimed requests and requests
before, inside and after the data window, context values known, unknown and absent,
and real-time purchases (some on the day of a bundle purchase) are drawn.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import pyarrow as pa
import pytest
from feature_oracle import assemble as oracle_assemble
from feature_oracle import mean_rank, oracle_tables
from tests_support import SMALL_BUILD

from index_builder.build import build
from index_builder.config import BuildConfig
from index_builder.synthetic import make_grocery, make_shop, write_shop
from ranking import FEATURE_NAMES, Ranker, RankerConfig, RankingModel, RankQuery, ServingModel, resolve_current
from ranking.bundle.schema import CONTEXT_FIELDS
from ranking.errors import BundleError
from ranking.kernels.rows import ItemScratch
from ranking.pipeline.budget import Budget
from ranking.pipeline.features import DAY, RANKED, Purchases, Request
from ranking.pipeline.overlay import RankOverlay

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
    tables = oracle_tables(ranker.tables)
    own = np.asarray(tables.bought.row(urow)) if urow >= 0 else np.zeros(0, np.int32)
    pool = np.unique(np.r_[own, np.asarray(tables.touched.row(urow)) if urow >= 0 else own])
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


def _agree(got: np.ndarray, want: np.ndarray, what: str) -> None:
    for name, j in COL.items():
        if name in RANK_COLUMNS:
            continue
        np.testing.assert_allclose(
            got[:, j], want[:, j], rtol=1e-4, atol=1e-5, equal_nan=True, err_msg=f"{name}: {what}"
        )
    # Ranks: exactly the mean ranks of the kernel's own source column (a source within
    # rounding of the oracle's may order two near-equal candidates the other way).
    for rank, source in RANKED:
        np.testing.assert_array_equal(got[:, COL[rank]], mean_rank(got[:, COL[source]]), err_msg=f"{rank}: {what}")


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


@pytest.mark.parametrize("which", ["context_bundle", "grocery_bundle"])
def test_a_candidate_s_features_do_not_depend_on_the_candidates_order(which, request):
    """Shuffling a request's candidates shuffles its rows and changes nothing else: tied
    values share their mean rank, so the order the sources were merged in is no signal."""
    m = request.getfixturevalue(which)
    ranker = Ranker(m, reranker_features=True)
    rng = np.random.default_rng(5)
    ties = 0
    for _ in range(60):
        req, cands = _random_request(m, ranker, rng)
        X = ranker.tables.assemble(req, cands)
        perm = rng.permutation(len(cands))
        np.testing.assert_array_equal(ranker.tables.assemble(req, cands[perm]), X[perm])
        ties += len(cands) - len(np.unique(X[:, COL["popularity_30d"]]))
    assert ties > 0  # the draws had tied values to rank


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


@dataclasses.dataclass(frozen=True)
class _DeadlinePassesAfterMerge(Budget):
    """A budget whose deadline reads as passed from its second reading on, with no deadline for
    the compiled loops: time was left when the Rank planned its work, none once the one
    compiled call had answered."""

    readings: list = dataclasses.field(default_factory=list)

    def expired(self) -> bool:
        self.readings.append(None)
        return len(self.readings) > 1


def test_an_answer_scored_in_the_one_call_stands_when_the_deadline_passes_during_it(grocery_bundle):
    """The call stops its own loops at the deadline (and says how far it got); a deadline that
    passes while it runs must not throw its scored answer away for retrieval order."""
    ranker = Ranker(grocery_bundle)
    for user in [str(u) for u in grocery_bundle.users.ids[:10]]:
        q = RankQuery(user_id=user, num_results=8)
        want = ranker.rank(q)
        budget = _DeadlinePassesAfterMerge(deadline_ns=0, total_ms=10.0)
        got = ranker.rank(q, budget)
        assert budget.readings, "the Rank never read its budget"
        assert "retrieval_order" not in got.degraded_stages
        assert got.item_ids == want.item_ids and got.scores == want.scores


def _random_query(m: RankingModel, rng: np.random.Generator) -> RankQuery:
    """A Rank request of any shape: every kind of customer, session, filter and time."""
    end = int(m.manifest["data_window"]["end_unix"])
    kind = rng.integers(4)
    user = ["", "nobody", str(m.users.ids[rng.integers(m.n_users)])][min(kind, 2)]
    if kind == 3:
        user = str(m.users.ids[rng.choice(np.flatnonzero(np.asarray(m.user_has_history)))])
    items = [str(i) for i in m.items.ids[rng.integers(0, m.n_items, 8)]] + ["no-such-item"]
    cats = [str(c) for c in m.category_names.ids]
    q = RankQuery(
        user_id=user,
        session_item_ids=list(rng.choice(items, int(rng.integers(0, 4)))),
        event_time=[None, float(end + 1), float(end + 5 * DAY), float(end - 20 * DAY)][rng.integers(4)],
    )
    if rng.random() < 0.15:
        q.candidate_item_ids = list(rng.choice(items, int(rng.integers(1, 8))))
    if rng.random() < 0.4:
        q.exclude_item_ids = list(rng.choice(items, int(rng.integers(1, 4))))
    if rng.random() < 0.3:
        q.include_categories = list(rng.choice(cats, int(rng.integers(1, 3)))) + ["no-such-category"]
    if rng.random() < 0.3:
        q.exclude_categories = list(rng.choice(cats + ["no-such-category"], int(rng.integers(1, 3))))
    if rng.random() < 0.3:
        prices = np.asarray(m.item_price)
        lo, hi = np.nanquantile(prices, sorted(rng.random(2)))
        q.min_price, q.max_price = [(float(lo), 0.0), (0.0, float(hi)), (float(lo), float(hi))][rng.integers(3)]
    return q


@pytest.mark.parametrize("which", ["context_bundle", "grocery_bundle"])
def test_candidates_in_one_call_equal_the_numpy_oracle(which, request):
    """The compiled candidate call merges the same sources in the same order and excludes the
    same items as the NumPy code it replaced (tests/candidate_oracle.py), on random requests:
    every rung and experiment cap, real-time vectors, purchases and exclusions, the caller's
    own candidates, category and price filters, and budget-shrunk candidate counts."""
    from candidate_oracle import candidates as oracle_candidates

    from ranking.pipeline.ranker import Rung

    m = request.getfixturevalue(which)
    # Every source smaller than the catalog, so what each contributes, and in which order, shows.
    cfg = RankerConfig(n_candidates=30, popular_candidates=8, covis_candidates=12, buy_again_candidates=6)
    ranker = Ranker(m, cfg)
    end = int(m.manifest["data_window"]["end_unix"])
    rng = np.random.default_rng(11)
    kinds = set()
    for _ in range(300):
        q = _random_query(m, rng)
        max_rung = Rung(int(rng.integers(1, 5)))
        vector = rng.standard_normal(m.item_factors.shape[1]).astype(np.float32) if rng.random() < 0.15 else None
        rung, reason, urow, qvec, seg, session = ranker._resolve(q, max_rung, vector)
        personal = -1 if reason == "variant" else urow
        purchases = None
        if personal >= 0 and rng.random() < 0.5:
            n_p = int(rng.integers(1, 6))
            rows = rng.integers(0, m.n_items, n_p).astype(np.int32)
            purchases = Purchases(rows, (end + rng.integers(-DAY, 4 * DAY, n_p)).astype(np.int64))
        exclude = rng.integers(0, m.n_items, int(rng.integers(0, 3))).astype(np.int32)
        n_cands = int(rng.choice([cfg.n_candidates, 15, 6]))
        pool = None
        if not q.candidate_item_ids and qvec is not None:
            slack = min(m.consumed.row_len(urow), ranker.config.max_consumed_slack) if urow >= 0 else 0
            pool, _ = ranker.ann.search(qvec, n_cands + slack, ranker.ann_effort)
        overlay = RankOverlay(exclude_rows=exclude, purchases=purchases)
        pool_rows, sources, _ = ranker._candidates(
            q, rung, urow, personal, qvec, seg, session, purchases, overlay, n_cands, ranker.ann_effort
        )
        got_rows, got_mask = ranker._merge(pool_rows, sources, seg, session, purchases)
        want_rows, want_mask = oracle_candidates(
            ranker, q, rung, urow, personal, seg, session, purchases, exclude, n_cands, pool
        )
        np.testing.assert_array_equal(got_rows, want_rows, err_msg=str(q))
        np.testing.assert_array_equal(got_mask, want_mask, err_msg=str(q))
        kinds.add((rung, purchases is not None, bool(q.candidate_item_ids), bool(want_mask.any())))
    # The draws reached every rung, with and without purchases, and masked something.
    assert {k[0] for k in kinds} == set(Rung) and {k[1] for k in kinds} == {True, False}
    assert any(k[2] for k in kinds) and any(k[3] for k in kinds)


def _scratch_is_clean(scratch: ItemScratch) -> bool:
    with scratch.buffers() as (slot, mark):
        return bool((slot == -1).all() and (mark == 0).all())


@pytest.mark.parametrize("which", ["context_bundle", "grocery_bundle"])
def test_one_crossing_equals_the_candidate_call_then_fill_and_score(which, request):
    """The request's one compiled call (merge, features, scores) answers what the candidate
    call followed by the feature-and-score call answers, on random requests of every shape:
    the same candidates, mask, feature rows and top-k, one phase or two, with the deadline
    already past (merged, nothing scored) and with the second phase cut to the time left."""
    from ranking.kernels.scoring import TreeCall
    from ranking.pipeline.ranker import Rung

    m = request.getfixturevalue(which)
    cfg = RankerConfig(n_candidates=30, popular_candidates=8, covis_candidates=12, buy_again_candidates=6)
    ranker = Ranker(m, cfg)
    scorer, kernel, tables, scratch = ranker.scorer, ranker.kernel, ranker.tables, ranker.scratch
    assert tables is not None and scorer.kind == "trees"
    phases = scorer.phases if scorer.phases is not None else None
    end = int(m.manifest["data_window"]["end_unix"])
    rng = np.random.default_rng(12)
    seen = set()
    for i in range(200):
        q = _random_query(m, rng)
        rung, reason, urow, qvec, seg, session = ranker._resolve(q, Rung(int(rng.integers(1, 5))))
        personal = -1 if reason == "variant" else urow
        purchases = None
        if personal >= 0 and rng.random() < 0.5:
            n_p = int(rng.integers(1, 6))
            purchases = Purchases(
                rng.integers(0, m.n_items, n_p).astype(np.int32),
                (end + rng.integers(-DAY, 4 * DAY, n_p)).astype(np.int64),
            )
        pool, sources, _ = ranker._candidates(
            q, rung, urow, personal, qvec, seg, session, purchases, None, int(rng.choice([30, 12])), ranker.ann_effort
        )
        req = Request(int(rung), personal, qvec, seg, session, q.event_time, q.channel, q.device, q.region, purchases)
        k = int(rng.choice([1, 5, 10, 100]))
        n_second = int(rng.choice([0, 4, 15])) if phases is not None else 0
        case = ["plain", "expired", "cut"][i % 3] if phases is not None else ["plain", "expired"][i % 2]
        deadline, plan = 0, None
        if case == "expired":
            deadline = 1  # long past
        elif case == "cut":
            # 10 s left, 70% of it usable, 1272.7 ms per row of the second phase: it fits 5 rows
            # for as long as the call takes under 0.9 s.
            deadline, plan, n_second = time.monotonic_ns() + 10_000_000_000, (0.0, 7000 / 5.5, 0.7), 15
        got = kernel.candidates_fill_score(
            scratch, pool, tables.request_args(req), trees=scorer.trees, phases=phases, k=k, n_second=n_second,
            deadline_ns=deadline, plan=plan, **sources,
        )  # fmt: skip
        assert _scratch_is_clean(scratch)
        rows, mask = ranker._merge(pool, sources, seg, session, purchases)
        np.testing.assert_array_equal(got.rows, rows, err_msg=str(q))
        np.testing.assert_array_equal(got.mask, mask, err_msg=str(q))
        if case == "expired":
            assert got.top is None
            continue
        want_second = 5 if case == "cut" and len(rows) > 15 else n_second
        if case == "cut" and 5 < len(rows) <= 15:
            want_second = min(5, len(rows) - 1)
        call = TreeCall.prepare(len(rows), len(FEATURE_NAMES), scorer.trees, phases, mask, k, want_second)
        X, want, _ = tables.assemble_and_score(req, rows, call)
        np.testing.assert_array_equal(got.features, X, err_msg=str(q))
        np.testing.assert_array_equal(got.top.indices, want.indices, err_msg=str(q))
        np.testing.assert_array_equal(got.top.scores, want.scores, err_msg=str(q))
        assert got.top.n_scored == want.n_scored
        assert got.n_second == call.n_second and got.second_cut == (case == "cut" and call.n_second > 0)
        seen.add((case, got.n_second > 0, len(rows) > k))
    # Every case was met, with both phases where the bundle has them, and with more candidates than k.
    cases = {"plain", "expired", "cut"} if phases is not None else {"plain", "expired"}
    assert {c for c, _, _ in seen} | {"expired"} == cases and any(more for _, _, more in seen)
    assert any(two for c, two, _ in seen if c == ("cut" if phases is not None else "plain")) == (phases is not None)


def _same_top_within(got, want, atol: float, what: str) -> None:
    """Two top-k answers whose scores differ by float32 rounding: equal scores within ``atol``,
    and the same item at every position but where two scores tie within it."""
    np.testing.assert_allclose(got.scores, want.scores, rtol=0, atol=atol, err_msg=what)
    for i, (g, w) in enumerate(zip(got.indices, want.indices)):
        if g != w:
            near = np.abs(want.scores - got.scores[i]) <= 2 * atol
            assert near.sum() > 1, f"{what}: position {i} holds candidate {g}, not {w}, and no tie explains it"


def _some_rows(rng: np.random.Generator, cands: np.ndarray, n_items: int, n_max: int) -> np.ndarray:
    """Some of the candidates themselves and some items elsewhere in the catalog, unique."""
    picks = [rng.choice(cands, int(rng.integers(0, 3))), rng.integers(0, n_items, int(rng.integers(0, n_max)))]
    return np.unique(np.concatenate(picks)).astype(np.int32)


@pytest.mark.parametrize("which", ["context_bundle", "grocery_bundle"])
def test_offsets_in_the_one_call_equal_the_overlay_s(which, request):
    """A customer's skip penalties and interest boost and the rules' demotions, computed in the
    one compiled call after the merge, equal what ``RankOverlay.offsets`` computes in NumPy on
    the same candidates (within float32 rounding of the cosines), scaled the same, and rank
    the same: skipped and recent items among the candidates and not, each offset alone or
    with others, one demotion or several (unknown categories among them), any scale, and
    returned when the deadline had passed before anything was scored."""
    from ranking import parse_rules
    from ranking.config import OverlaySettings
    from ranking.kernels.scoring import TreeCall
    from ranking.pipeline.overlay import model_cache
    from ranking.pipeline.ranker import Rung

    m = request.getfixturevalue(which)
    assert model_cache(m).ready.wait(30)
    ranker = Ranker(m, RankerConfig(n_candidates=30, popular_candidates=8, covis_candidates=12))
    scorer, kernel, tables, scratch = ranker.scorer, ranker.kernel, ranker.tables, ranker.scratch
    assert tables is not None and scorer.kind == "trees"
    rng = np.random.default_rng(13)
    cats = [str(c) for c in m.category_names.ids] + ["no-such-category"]
    seen = set()
    for i in range(200):
        q = _random_query(m, rng)
        rung, reason, urow, qvec, seg, session = ranker._resolve(q, Rung(int(rng.integers(1, 5))))
        personal = -1 if reason == "variant" else urow
        pool, sources, _ = ranker._candidates(
            q, rung, urow, personal, qvec, seg, session, None, None, 30, ranker.ann_effort
        )
        rows, mask = ranker._merge(pool, sources, seg, session, None)
        if not len(rows):
            continue

        kind = i % 4  # skips only, recent items only, both, demotions only
        skips = _some_rows(rng, rows, m.n_items, 4) if kind in (0, 2) else np.zeros(0, np.int32)
        recent = _some_rows(rng, rows, m.n_items, 8) if kind in (1, 2) else np.zeros(0, np.int32)
        settings = OverlaySettings(skip_penalty=float(rng.uniform(0.5, 4)), interest_boost=float(rng.uniform(0.5, 3)))
        docs = [
            {"name": f"d{j}", "when": {"channel": "web"}, "demote_by": float(rng.uniform(0.1, 2)),
             "demote_categories": list(rng.choice(cats, int(rng.integers(1, 4)), replace=False))}
            for j in range(int(rng.integers(1, 4)) if kind == 3 or rng.random() < 0.3 else 0)
        ]  # fmt: skip
        ov = RankOverlay(negative_rows=skips, recent_rows=recent, settings=settings, rules=parse_rules(docs, "t"))
        realtime, demotions = ov.realtime_offsets(m), ov.demotions(m)
        assert (demotions is None) == (not docs)
        if realtime is None and demotions is None:
            assert not len(skips) and not len(recent)
            continue
        scale = float(rng.choice([1.0, 0.37, 2.5]))
        req = Request(int(rung), personal, qvec, seg, session, q.event_time, q.channel, q.device, q.region, None)
        k = int(rng.choice([1, 5, 100]))
        expired = i % 5 == 4
        got = kernel.candidates_fill_score(
            scratch, pool, tables.request_args(req), trees=scorer.trees, phases=scorer.phases, k=k,
            n_second=0, deadline_ns=1 if expired else 0, realtime=realtime, offset_scale=scale,
            demotions=demotions, **sources,
        )  # fmt: skip
        assert _scratch_is_clean(scratch)
        np.testing.assert_array_equal(got.rows, rows)
        want, parts = ov.offsets(m, rows)
        assert want is not None and got.offsets is not None
        want = want * np.float32(scale)
        np.testing.assert_allclose(got.offsets, want, rtol=0, atol=1e-5, err_msg=str(q))
        assert set(got.offset_parts) == set(parts)
        for name, part in parts.items():
            np.testing.assert_allclose(got.offset_parts[name], part * np.float32(scale), rtol=0, atol=1e-5)
        if expired:
            assert got.top is None
            continue
        call = TreeCall.prepare(len(rows), len(FEATURE_NAMES), scorer.trees, scorer.phases, mask, k, 0, want)
        X, want_top, _ = tables.assemble_and_score(req, rows, call)
        np.testing.assert_array_equal(got.features, X)
        _same_top_within(got.top, want_top, 1e-5, str(q))
        demoted = any((p != 0).any() for n, p in parts.items() if n.startswith("rule:"))
        seen.add((kind, bool(np.isin(rows, skips).any()), bool(np.isin(rows, recent).any()), demoted))
    # Each kind was drawn; skipped and recent items were among the candidates, and demoted ones.
    assert {s[0] for s in seen} == {0, 1, 2, 3} and all(any(s[j] for s in seen) for j in (1, 2, 3))


def test_bad_candidate_arguments_are_refused_with_the_reason(context_bundle):
    kernel = ServingModel(context_bundle).feature_kernel()
    scratch = ItemScratch(context_bundle.n_items)
    n = context_bundle.n_items
    with pytest.raises(ValueError, match="candidate pool holds row"):
        kernel.candidates(scratch, np.array([0, n]))
    with pytest.raises(ValueError, match="candidate counts must be >= 0"):
        kernel.candidates(scratch, np.array([0]), n_covis=-1)
    with pytest.raises(ValueError, match="user row"):
        kernel.candidates(scratch, np.array([0]), mask_user=context_bundle.n_users)
    with pytest.raises(ValueError, match="one entry per category"):
        kernel.candidates(scratch, np.array([0]), category_codes=np.zeros(1, np.uint32))
    with pytest.raises(ValueError, match="price bounds"):
        kernel.candidates(scratch, np.array([0]), min_price=float("nan"))
    with pytest.raises(ValueError, match="purchases need one time"):
        kernel.candidates(scratch, np.array([0]), source_user=0, n_again=3, purchases=(np.array([1]), np.zeros(2)))
    # Nothing was left behind in the lent scratch: a good call still answers as before.
    rows, mask = kernel.candidates(scratch, np.array([3, -1, 3, 5]), exclude=np.array([5, -1]))
    assert rows.tolist() == [3, 5] and mask.tolist() == [False, True]
    with scratch.buffers() as (slot, mark):
        assert (slot == -1).all() and not mark.any()


def test_the_one_call_scores_with_the_trees_it_is_given_each_time(grocery_bundle):
    """The call binds an ensemble's arrays once and reuses them while the same trees come; other
    trees (a reloaded model) are bound anew and scored with, and trees it cannot read are refused
    even after a good pair was bound."""
    from ranking.kernels.scoring import TreeArrays, TreeCall

    m = grocery_bundle
    ranker = Ranker(m, RankerConfig(n_candidates=30))
    scorer, kernel, tables, scratch = ranker.scorer, ranker.kernel, ranker.tables, ranker.scratch
    assert tables is not None and scorer.kind == "trees"
    t = scorer.trees
    flipped = TreeArrays.checked(
        t.roots, t.feature, t.threshold, t.left, t.right, t.flags, -t.node_value, -t.leaf_value, t.n_features
    )
    row = int(np.flatnonzero(np.asarray(m.user_has_history))[0])
    prep = ranker.prepare(RankQuery(user_id=str(m.users.ids[row])), fuse=True)
    assert prep.sources is not None and prep.request is not None
    pool, sources = prep.sources
    for trees, phases in ((t, scorer.phases), (flipped, None), (t, scorer.phases), (flipped, None)):
        got = kernel.candidates_fill_score(
            scratch, pool, tables.request_args(prep.request), trees=trees, phases=phases, k=10, n_second=0, **sources
        )
        call = TreeCall.prepare(len(got.rows), len(FEATURE_NAMES), trees, None, got.mask, 10, 0)
        _, want, _ = tables.assemble_and_score(prep.request, got.rows, call)
        np.testing.assert_array_equal(got.top.indices, want.indices)
        np.testing.assert_array_equal(got.top.scores, want.scores)
    assert kernel._bound_trees is not None and kernel._bound_trees[0] is flipped
    narrow = TreeArrays.checked(
        t.roots, np.zeros_like(t.feature), t.threshold, t.left, t.right, t.flags, t.node_value, t.leaf_value, 3
    )
    with pytest.raises(ValueError, match="trees read 3 features"):
        kernel.candidates_fill_score(
            scratch, pool, tables.request_args(prep.request), trees=narrow, phases=None, k=10, n_second=0, **sources
        )
    assert _scratch_is_clean(scratch)
