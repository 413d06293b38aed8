"""Retrieval: the exact head answers exactly when it proves its answer, the ANN index otherwise."""

import itertools

import faiss
import numpy as np
import pytest

from ranking import (
    ExactHead,
    Ranker,
    RankerConfig,
    RankingModel,
    RankQuery,
    Retriever,
    ServingModel,
    ann_search,
    choose_first_tier,
)
from ranking.errors import BundleError
from ranking.kernels.search import FlatScan
from ranking.realtime.user_state import row_norms
from ranking.retrieval.search import first_tier_shares

D = 24


@pytest.fixture(scope="module")
def items():
    rng = np.random.default_rng(11)
    n = 20000
    # Norms falling off like popularity does in factors trained on implicit feedback.
    scale = (1.0 / np.arange(1, n + 1) ** 0.8)[rng.permutation(n)]
    return (rng.standard_normal((n, D)) * scale[:, None]).astype(np.float32)


@pytest.fixture(scope="module")
def queries():
    return np.random.default_rng(12).standard_normal((300, D)).astype(np.float32)


@pytest.fixture(scope="module")
def exact(items):
    idx = faiss.IndexFlatIP(D)
    idx.add(items)
    return idx


@pytest.fixture(scope="module")
def hnsw(items):
    idx = faiss.IndexHNSWFlat(D, 16, faiss.METRIC_INNER_PRODUCT)
    idx.add(items)
    return idx


def test_the_head_holds_the_largest_norms_and_bounds_every_other_item(items):
    head = ExactHead(items, 500)
    norms = row_norms(items)
    outside = np.setdiff1d(np.arange(len(items)), head.rows)
    assert head.size == 500 and len(np.unique(head.rows)) == 500
    assert norms[head.rows].min() >= norms[outside].max()
    assert norms[outside].max() <= head.bound <= norms[outside].max() * 1.001
    np.testing.assert_allclose(row_norms(items[:3]), np.linalg.norm(items[:3].astype(np.float64), axis=1))


def test_the_head_is_scanned_in_tiers_of_falling_norm_each_bounding_what_follows(items):
    head = ExactHead(items, 1000)
    norms = row_norms(items)
    (lo1, first, after1), (lo2, second, after2) = head.tiers
    assert (lo1, first.ntotal, lo2, second.ntotal) == (0, 500, 500, 500)
    assert np.all(np.diff(norms[head.rows]) <= 0)  # largest norm first
    assert norms[head.rows[500:]].max() <= after1 <= norms[head.rows[500]] * 1.001
    assert after2 == head.bound


@pytest.mark.parametrize("k", [50, 100])
def test_a_query_the_first_tier_cannot_prove_gets_one_scan_of_the_whole_head(items, queries, k):
    head = ExactHead(items, 1800)
    want_scores, want_pos = FlatScan(items[head.rows]).search(queries, k)
    qnorm = np.linalg.norm(queries.astype(np.float64), axis=1)
    _, first, after1 = head.tiers[0]
    by_first = first.search(queries, k)[0][:, k - 1] >= qnorm * after1
    if k == 50:
        assert 0.05 < by_first.mean() < 0.95  # both ways through the tiers are exercised

    scores, rows, proven = head.search(queries, k)
    np.testing.assert_array_equal(scores, want_scores)
    for got, want in zip(rows, head.rows[want_pos]):
        assert set(got) == set(want)
    np.testing.assert_array_equal(proven, want_scores[:, k - 1] >= qnorm * head.bound)
    assert proven[by_first].all()
    if k == 100:
        assert 0.05 < proven.mean() < 0.95  # and some stay unproven after both tiers
    # One query at a time answers as the batch does.
    for i in (*np.flatnonzero(by_first)[:1], *np.flatnonzero(~by_first)[:1], *np.flatnonzero(~proven)[:1]):
        s1, r1, p1 = head.search(queries[i : i + 1], k)
        np.testing.assert_array_equal(s1[0], scores[i])
        assert set(r1[0]) == set(rows[i]) and p1[0] == proven[i]


@pytest.mark.parametrize("first_tier, k", [(None, 50), (None, 100), (300, 50), (1800, 50), (None, 1500)])
def test_one_query_alone_gets_the_batch_answer(items, queries, first_tier, k):
    # The server's lone search: through the first tier alone, on to the second, unproven after
    # both, and k beyond the first tier (which then is not scanned alone).
    head = ExactHead(items, 1800, first_tier=first_tier)
    _, rows, proven = head.search(queries, k)
    if first_tier is None and k == 100:
        assert 0.05 < proven.mean() < 0.95
    for i in range(len(queries)):
        got, exact = head.search_one(queries[i], k)
        assert got.dtype == np.int64 and got.shape == (k,)
        np.testing.assert_array_equal(got, rows[i])
        assert exact is bool(proven[i])


def test_the_retrievers_lone_search_gets_its_batch_answer(items, queries, hnsw):
    cases = [
        (Retriever(hnsw, ExactHead(items, 1800)), 100),  # proven by the head, or by the index
        (Retriever(hnsw, ExactHead(items, 200)), 300),  # k beyond the head: the index
        (Retriever(hnsw, None), 50),  # no head
    ]
    for retriever, k in cases:
        rows, proven = retriever.search(queries[:60], k, 64)
        if retriever.head is not None and k == 100:
            assert 0 < proven.mean() < 1
        for i in range(60):
            got, exact = retriever.search_one(queries[i], k, 64)
            np.testing.assert_array_equal(got, rows[i])
            assert exact is bool(proven[i])


def test_a_first_tier_of_any_size_answers_as_the_halves_do(items, queries):
    halves = ExactHead(items, 1800)
    assert halves.first_tier == 900
    want_scores, want_rows, want_proven = halves.search(queries, 50)
    for first in (300, 600, 1200, 1800):
        head = ExactHead(items, 1800, first_tier=first)
        assert head.first_tier == first and [t[1].ntotal for t in head.tiers] == (
            [first, 1800 - first] if first < 1800 else [1800]
        )
        scores, rows, proven = head.search(queries, 50)
        np.testing.assert_array_equal(scores, want_scores)
        np.testing.assert_array_equal(proven, want_proven)
        for got, want in zip(rows, want_rows):
            assert set(got) == set(want)
        for i in range(3):  # one query at a time, as the server searches
            r1, p1 = head.search_one(queries[i], 50)
            assert set(r1) == set(want_rows[i]) and p1 == want_proven[i]


def test_a_first_tier_outside_the_head_is_refused(items):
    for bad in (0, -3, 1801):
        with pytest.raises(ValueError, match=rf"first tier must be 1..1800 items \(its size\), got {bad}"):
            ExactHead(items, 1800, first_tier=bad)


def test_the_chosen_first_tier_is_the_smallest_proving_nearly_what_the_half_proves(items, queries):
    k = 50
    tier, shares = choose_first_tier(items, queries, k, 4000)
    assert sorted(shares) == list(range(250, 2001, 250))  # sixteenths of the head up to its half
    # Each share is what a head split there proves by its first tier alone.
    qnorm = np.linalg.norm(queries.astype(np.float64), axis=1)
    for m in (1000, 2000):
        _, first, after = ExactHead(items, 4000, first_tier=m).tiers[0]
        assert shares[m] == pytest.approx(np.mean(first.search(queries, k)[0][:, k - 1] >= qnorm * after))
    assert shares[tier] >= 0.999 * shares[2000]
    assert all(shares[m] < 0.999 * shares[2000] for m in shares if m < tier)
    assert shares[2000] > 0.5 and tier < 2000  # this catalogue's norms fall fast: a smaller tier serves
    # A head whose half proves only some queries keeps its half when nothing smaller comes close.
    assert choose_first_tier(items, queries, k, 1800)[0] == 900
    # One whose half proves none keeps it too, though every smaller tier proves as much (nothing).
    tier, shares = choose_first_tier(items, queries, k, 1000)
    assert shares[500] == 0.0 and tier == 500
    # Nothing smaller than the half holds k, no queries: the half.
    assert choose_first_tier(items, queries, 1000, 1800) == (900, {})
    assert choose_first_tier(items, queries[:0], k, 1800) == (900, {})
    with pytest.raises(ValueError, match="a first tier must hold k=50 to 1799 items, got 40"):
        first_tier_shares(items, queries, k, 1800, [40])


def test_the_server_splits_the_head_where_the_builder_chose(bundle_path):
    model = RankingModel(bundle_path, verify=False)
    size = model.manifest["evaluation"]["exact_head_items"]
    assert model.manifest["evaluation"]["exact_head_first_tier"] == ServingModel(model).exact_head(size).first_tier
    evaluation = model.manifest["evaluation"]
    try:
        evaluation["exact_head_first_tier"] = 7
        assert ServingModel(model).exact_head(size).first_tier == 7
        assert ServingModel(model).exact_head(40).first_tier == 20  # another size than measured: halves
        for bad, why in ((0, "must be 1..16384 items"), ("7", "must be an integer, got '7'"), (True, "got True")):
            evaluation["exact_head_first_tier"] = bad
            with pytest.raises(BundleError, match=rf"evaluation.exact_head_first_tier.*{why}"):
                ServingModel(model).exact_head(size)
        del evaluation["exact_head_first_tier"]  # a bundle built before the builder chose one
        assert ServingModel(model).exact_head(size).first_tier == min(size, len(model.items.ids)) // 2
    finally:
        model.manifest["evaluation"] = evaluation


def test_answers_proven_exact_are_the_exact_top_k(items, queries, exact, hnsw):
    k = 100
    _, truth = exact.search(queries, k)
    rows, proven = Retriever(hnsw, ExactHead(items, 1800)).search(queries, k, 64)
    # Both paths are exercised: some queries are proven, the rest go to the index.
    assert 0.05 < proven.mean() < 0.95
    for got, want in zip(rows[proven], truth[proven]):
        assert set(got) == set(want)
    _, ann_rows = ann_search(hnsw, queries[~proven], k, 64)
    np.testing.assert_array_equal(rows[~proven], ann_rows)


def test_a_bigger_head_proves_more_and_never_answers_worse(items, queries, exact, hnsw):
    k = 100
    _, truth = exact.search(queries, k)
    recalls, shares = [], []
    for size in (1600, 1800, 8000):
        rows, proven = Retriever(hnsw, ExactHead(items, size)).search(queries, k, 64)
        shares.append(proven.mean())
        recalls.append(np.mean([len(np.intersect1d(g, t)) / k for g, t in zip(rows, truth)]))
    assert shares[0] <= shares[1] <= shares[2] and shares[2] > 0.9
    assert recalls[0] <= recalls[1] + 1e-9 <= recalls[2] + 2e-9


def test_a_head_covering_the_catalogue_is_always_exact(items, queries, exact, hnsw):
    small = items[:300]
    flat = faiss.IndexFlatIP(D)
    flat.add(small)
    retriever = Retriever(flat, ExactHead(small, 10_000))
    rows, proven = retriever.search(queries, 50, 64)
    assert proven.all()
    np.testing.assert_array_equal(rows, flat.search(queries, 50)[1])
    # One query alone, its k-th best score below zero (the bound): proven all the same.
    want = flat.search(queries[:20], 290)
    assert (want[0][:, -1] < 0).all()
    for i in range(20):
        got, exact = retriever.search_one(queries[i], 290, 64)
        assert exact and set(got) == set(want[1][i])


def test_k_beyond_the_head_or_no_head_searches_the_index(items, queries, hnsw):
    want = ann_search(hnsw, queries[:5], 300, 64)[1]
    for retriever in (Retriever(hnsw, ExactHead(items, 200)), Retriever(hnsw, None)):
        rows, proven = retriever.search(queries[:5], 300, 64)
        assert not proven.any()
        np.testing.assert_array_equal(rows, want)


def test_a_head_of_no_items_is_refused(items):
    with pytest.raises(ValueError, match="exact head size must be >= 1, got 0"):
        ExactHead(items, 0)
    with pytest.raises(ValueError, match="k must be in 1..10"):
        ExactHead(items, 10).search(np.ones((1, D), np.float32), 11)


def test_the_ranker_reports_how_it_retrieved(bundle_path):
    model = RankingModel(bundle_path, verify=False)
    serving = ServingModel(model)
    users = [u for u in model.users.ids[:400] if model.user_has_history[model.users.lookup([u])[0]]][:60]
    whole = Ranker(serving, RankerConfig())  # the default head covers this small catalogue
    tiny = Ranker(serving, RankerConfig(exact_head_items=5))
    off = Ranker(serving, RankerConfig(exact_head_items=0))
    paths = {"whole": set(), "tiny": set(), "off": set()}
    for u in users:
        q = RankQuery(user_id=u, num_results=10)
        a, b, c = whole.rank(q), tiny.rank(q), off.rank(q)
        paths["whole"].add(a.retrieval)
        paths["tiny"].add(b.retrieval)
        paths["off"].add(c.retrieval)
    assert paths == {"whole": {"exact_head"}, "tiny": {"ann"}, "off": {"ann"}}
    assert whole.rank(RankQuery(user_id="never-seen", num_results=10)).retrieval == "none"
    assert tiny.serving.exact_head(5) is serving.exact_head(5)  # built once per size, shared by rankers


def test_a_negative_head_size_in_the_server_config_is_named():
    from server.config import ServerConfig

    with pytest.raises(ValueError, match=r"exact_head_items -1 must be >= 0 \(0: ANN search only\)"):
        ServerConfig(artifacts="x", exact_head_items=-1).validate()
    assert ServerConfig(artifacts="x", exact_head_items=0).ranker_config().exact_head_items == 0


def test_the_builder_reports_the_share_the_head_proves(items, queries, hnsw):
    from index_builder.build import exact_head_share

    proven = Retriever(hnsw, ExactHead(items, 1800)).search(queries, 100, 64)[1]
    assert exact_head_share(items, queries, 100, 1800) == pytest.approx(proven.mean())
    assert exact_head_share(items, queries, 100, 50) == 0.0  # k beyond the head: nothing proven


# --- Refining: a quantised index's top ceil(k x refine), re-ranked by the exact inner product ---


@pytest.fixture(scope="module")
def sq4():
    """Items without a norm spread (the head proves nothing) behind 4-bit codes that misorder the k-th."""
    rng = np.random.default_rng(21)
    items = rng.standard_normal((20000, 32)).astype(np.float32)
    users = rng.standard_normal((300, 32)).astype(np.float32)
    index = faiss.index_factory(32, "HNSW32,SQ4", faiss.METRIC_INNER_PRODUCT)
    index.train(items)
    index.add(items)
    return items, users, index


def _recall(truth: np.ndarray, got: np.ndarray) -> float:
    return float(np.mean([len(np.intersect1d(g, t)) / len(t) for g, t in zip(got, truth)]))


def _reference(items, queries, candidates, k):
    """Plain NumPy: each row's candidates ordered by exact score falling, then by row rising; the first k."""
    out = []
    for q, cand in zip(queries, candidates):
        cand = cand[cand >= 0]
        scores = items[cand] @ q
        out.append(cand[np.lexsort((cand, -scores))][:k])
    return np.array(out)


def test_refining_lifts_the_recall_no_effort_gives_a_quantised_index(sq4):
    items, users, index = sq4
    k = 100
    flat = faiss.IndexFlatIP(32)
    flat.add(items)
    truth = flat.search(users, k)[1]
    plain = [_recall(truth, Retriever(index, None).search(users, k, e)[0]) for e in (64, 512)]
    refined = Retriever(index, None, items, 2.0).search(users, k, 64)[0]
    # The codes cap recall below the target at any effort; refining twice as many reaches it.
    assert max(plain) < 0.95 <= _recall(truth, refined)
    # The answer is the index's top 200 re-ranked exactly: the NumPy reference, row for row.
    wide = ann_search(index, users, 200, 64)[1]
    np.testing.assert_array_equal(refined, _reference(items, users, wide, k))


def test_refine_1_is_the_index_own_answer_and_refine_above_1_needs_the_factors(sq4):
    items, users, index = sq4
    np.testing.assert_array_equal(
        Retriever(index, None, items, 1.0).search(users[:20], 50, 32)[0], ann_search(index, users[:20], 50, 32)[1]
    )
    with pytest.raises(ValueError, match="refine 2.0 re-ranks by the exact inner product: it needs the item factors"):
        Retriever(index, None, None, 2.0)
    with pytest.raises(ValueError, match=r"refine must be >= 1 \(1: no re-ranking\), got 0.5"):
        Retriever(index, None, items, 0.5)
    with pytest.raises(ValueError, match="100 item factor rows for an index of 20000 items"):
        Retriever(index, None, items[:100], 2.0)


def test_refining_breaks_ties_by_row_and_stops_at_the_catalogue():
    rng = np.random.default_rng(5)
    base = rng.standard_normal((10, 8)).astype(np.float32)
    items = np.repeat(base, 4, axis=0)  # every vector four times: ties everywhere
    flat = faiss.IndexFlatIP(8)
    flat.add(items)
    queries = rng.standard_normal((7, 8)).astype(np.float32)
    # k' = ceil(30 x 4) is capped at the 40 items: every item is re-ranked.
    rows, proven = Retriever(flat, None, items, 4.0).search(queries, 30, 16)
    assert not proven.any() and rows.shape == (7, 30)
    np.testing.assert_array_equal(rows, _reference(items, queries, np.tile(np.arange(40), (7, 1)), 30))
    # Equal vectors come out in row order.
    for row in rows:
        for a, b in itertools.pairwise(row):
            if a // 4 == b // 4:
                assert a < b


def test_refining_leaves_the_heads_proven_answers_alone(items, queries, hnsw):
    k = 100
    head = ExactHead(items, 1800)
    plain, proven = Retriever(hnsw, head).search(queries, k, 64)
    refined, proven2 = Retriever(hnsw, head, items, 3.0).search(queries, k, 64)
    np.testing.assert_array_equal(proven, proven2)
    assert 0 < proven.sum() < len(queries)
    np.testing.assert_array_equal(refined[proven], plain[proven])
    wide = ann_search(hnsw, queries[~proven], 300, 64)[1]
    np.testing.assert_array_equal(refined[~proven], _reference(items, queries[~proven], wide, k))
