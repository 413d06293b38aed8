"""ranking.kernels.scoring (compiled top-k kernels) against a plain NumPy reference."""

import sys
import threading
import time

import numpy as np
import pytest

from ranking import TopK, linear_contributions, score_topk, topk

FAR_FUTURE_NS = time.monotonic_ns() + 3600 * 10**9


# ---------------------------------------------------------------------------
# Reference and fixtures
# ---------------------------------------------------------------------------


def ref_select(scores, mask, k):
    """Top-k by -score then index, excluding masked and NaN entries."""
    scores = np.asarray(scores, dtype=np.float32)
    mask = np.zeros(len(scores), bool) if mask is None else np.asarray(mask) != 0
    keep = np.flatnonzero(~mask & ~np.isnan(scores))
    # Stable sort of an ascending index list on -score is exactly "score desc,
    # lower index first".
    order = np.argsort(-scores[keep], kind="stable")
    sel = keep[order][:k]
    return sel.astype(np.int32), scores[sel]


def ref_scores(features, weights, bias=0.0):
    # Float64 then rounded: exact for the dyadic fixtures below, whatever order
    # the kernel sums in.
    return (np.asarray(features, np.float64) @ np.asarray(weights, np.float64) + bias).astype(np.float32)


def dyadic(rng, shape, lo=-64, hi=64, denom=16):
    """Random multiples of 1/denom: every product and sum is exact in float32."""
    return rng.integers(lo, hi + 1, size=shape, dtype=np.int16).astype(np.float32) / np.float32(denom)


def assert_topk(result, indices, scores, n_scored):
    assert isinstance(result, TopK)
    assert result.indices.dtype == np.int32
    assert result.scores.dtype == np.float32
    np.testing.assert_array_equal(result.indices, indices)
    np.testing.assert_array_equal(result.scores, scores)
    assert result.n_scored == n_scored


SHAPES = [
    (1, 1, 1),
    (7, 3, 3),
    (50, 5, 10),
    (200, 16, 10),
    (1000, 16, 100),
    (3000, 40, 50),
    (5000, 7, 10),
    (64, 4, 64),
    (33, 9, 5),
]


# ---------------------------------------------------------------------------
# score_topk: random inputs
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("n,f,k", SHAPES)
def test_score_topk_matches_reference_on_random_inputs(seed, n, f, k):
    rng = np.random.default_rng(seed * 1000 + n + f)
    X = dyadic(rng, (n, f))
    w = dyadic(rng, f)
    mask = rng.random(n) < 0.2
    bias = 0.25 * (seed - 4)
    want_idx, want_sc = ref_select(ref_scores(X, w, bias), mask, k)
    got = score_topk(X, w, mask, k, bias=bias)
    assert_topk(got, want_idx, want_sc, n)


@pytest.mark.parametrize("seed", range(5))
def test_score_topk_continuous_floats_match_reference(seed):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((2000, 23)).astype(np.float32)
    w = rng.standard_normal(23).astype(np.float32)
    mask = rng.random(2000) < 0.1
    sc = ref_scores(X, w)
    want_idx, _ = ref_select(sc, mask, 25)
    got = score_topk(X, w, mask, 25)
    np.testing.assert_array_equal(got.indices, want_idx)
    np.testing.assert_allclose(got.scores, X[want_idx] @ w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("seed", range(10))
@pytest.mark.parametrize("k", [1, 5, 17, 100, 400])
def test_score_topk_heavy_ties_prefer_lower_index(seed, k):
    rng = np.random.default_rng(seed)
    X = rng.integers(0, 3, size=(300, 4)).astype(np.float32)
    w = rng.integers(-1, 2, size=4).astype(np.float32)
    mask = rng.random(300) < 0.3
    want_idx, want_sc = ref_select(ref_scores(X, w), mask, k)
    got = score_topk(X, w, mask, k)
    assert_topk(got, want_idx, want_sc, 300)


def test_score_topk_all_equal_scores_returns_first_unmasked_rows():
    X = np.ones((10, 3), np.float32)
    w = np.ones(3, np.float32)
    mask = np.zeros(10, bool)
    mask[[0, 2]] = True
    assert_topk(score_topk(X, w, mask, 4), [1, 3, 4, 5], [3, 3, 3, 3], 10)


def test_score_topk_small_exact_example_with_bias():
    X = np.array([[1, 0], [2, 0], [2, 0], [0, 5], [3, 0]], np.float32)
    w = np.array([1, 2], np.float32)
    mask = np.array([0, 0, 0, 0, 1], np.uint8)
    assert_topk(score_topk(X, w, mask, 3, bias=0.5), [3, 1, 2], [10.5, 2.5, 2.5], 5)


# ---------------------------------------------------------------------------
# Edge cases: empty, k = 0, k > n, all masked, NaN, infinities
# ---------------------------------------------------------------------------


def test_empty_candidates():
    got = score_topk(np.zeros((0, 4), np.float32), np.ones(4, np.float32), np.zeros(0, bool), 10)
    assert_topk(got, [], [], 0)
    assert_topk(topk(np.zeros(0, np.float32), np.zeros(0, bool), 10), [], [], 0)


def test_zero_features_scores_equal_bias():
    got = score_topk(np.zeros((4, 0), np.float32), np.zeros(0, np.float32), np.array([0, 1, 0, 0], bool), 2, bias=1.5)
    assert_topk(got, [0, 2], [1.5, 1.5], 4)


def test_k_zero_returns_nothing():
    X = np.eye(5, dtype=np.float32)
    assert_topk(score_topk(X, np.ones(5, np.float32), None, 0), [], [], 5)
    assert_topk(topk(np.arange(5, dtype=np.float32), None, 0), [], [], 5)


def test_k_larger_than_n_returns_all_unmasked_sorted():
    X = np.array([[3], [1], [4], [1], [5]], np.float32)
    w = np.array([2], np.float32)
    mask = np.array([0, 0, 0, 1, 0], bool)
    assert_topk(score_topk(X, w, mask, 1000), [4, 2, 0, 1], [10, 8, 6, 2], 5)
    assert_topk(topk(X[:, 0], mask, 10**12), [4, 2, 0, 1], [5, 4, 3, 1], 5)


def test_all_masked_returns_nothing():
    X = np.ones((20, 3), np.float32)
    mask = np.ones(20, bool)
    assert_topk(score_topk(X, np.ones(3, np.float32), mask, 5), [], [], 20)
    assert_topk(topk(X[:, 0], mask, 5), [], [], 20)


def test_nan_scores_are_excluded():
    X = np.array([[1, 0], [np.nan, 0], [2, 0], [0, np.nan], [0.5, 0]], np.float32)
    w = np.array([1, 1], np.float32)
    assert_topk(score_topk(X, w, None, 10), [2, 0, 4], [2, 1, 0.5], 5)
    scores = np.array([np.nan, 1, np.nan, 3, 1], np.float32)
    assert_topk(topk(scores, None, 10), [3, 1, 4], [3, 1, 1], 5)


def test_nan_weight_excludes_everything():
    X = np.ones((6, 2), np.float32)
    w = np.array([1, np.nan], np.float32)
    assert_topk(score_topk(X, w, None, 3), [], [], 6)


def test_infinite_scores_are_ranked_not_excluded():
    scores = np.array([0, -np.inf, np.inf, 1, -np.inf], np.float32)
    assert_topk(topk(scores, None, 5), [2, 3, 0, 1, 4], [np.inf, 1, 0, -np.inf, -np.inf], 5)


@pytest.mark.parametrize("seed", range(4))
def test_nan_mixed_into_random_scores(seed):
    rng = np.random.default_rng(seed)
    X = dyadic(rng, (500, 6))
    X[rng.random(500) < 0.1, rng.integers(0, 6)] = np.nan
    w = dyadic(rng, 6)
    mask = rng.random(500) < 0.2
    sc = ref_scores(X, w)
    want_idx, want_sc = ref_select(sc, mask, 40)
    assert_topk(score_topk(X, w, mask, 40), want_idx, want_sc, 500)
    assert_topk(topk(sc, mask, 40), want_idx, want_sc, 500)


# ---------------------------------------------------------------------------
# Deadline
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("check_every", [1, 7, 32])
def test_expired_deadline_scores_only_first_chunk(check_every):
    rng = np.random.default_rng(check_every)
    n = 500
    X = dyadic(rng, (n, 8))
    w = dyadic(rng, 8)
    mask = rng.random(n) < 0.2
    got = score_topk(X, w, mask, 5, deadline_ns=time.monotonic_ns() - 1, check_every=check_every)
    # The clock is read before rows check_every, 2*check_every, ...; the first
    # check finds the deadline passed, so exactly one chunk was consumed.
    assert got.n_scored == check_every
    assert got.n_scored < n
    m = got.n_scored
    want_idx, want_sc = ref_select(ref_scores(X[:m], w), mask[:m], 5)
    assert_topk(got, want_idx, want_sc, m)


def test_expired_deadline_prefix_competes_for_topk():
    # Rows 0..3 are scored (check_every=4); the much better row 10 is not.
    X = np.array([[1], [4], [2], [4], [0], [0], [0], [0], [0], [0], [99]], np.float32)
    got = score_topk(X, np.ones(1, np.float32), None, 2, deadline_ns=1, check_every=4)
    assert_topk(got, [1, 3], [4, 4], 4)


def test_far_deadline_scores_everything():
    rng = np.random.default_rng(3)
    X = dyadic(rng, (1000, 16))
    w = dyadic(rng, 16)
    mask = rng.random(1000) < 0.2
    want_idx, want_sc = ref_select(ref_scores(X, w), mask, 10)
    got = score_topk(X, w, mask, 10, deadline_ns=FAR_FUTURE_NS, check_every=1)
    assert_topk(got, want_idx, want_sc, 1000)


def test_deadline_passing_mid_loop_stops_on_chunk_boundary():
    # Large enough that scoring takes far longer than the 0.2 ms budget.
    rng = np.random.default_rng(0)
    n = 400_000
    X = dyadic(rng, (n, 40))
    w = dyadic(rng, 40)
    got = score_topk(X, w, None, 10, deadline_ns=time.monotonic_ns() + 200_000, check_every=64)
    assert 0 < got.n_scored < n
    assert got.n_scored % 64 == 0
    m = got.n_scored
    want_idx, want_sc = ref_select(ref_scores(X[:m], w), None, 10)
    assert_topk(got, want_idx, want_sc, m)


def _largest_freeze_fraction(call):
    """Run call() while a Python thread records timestamps; return the longest
    gap between them (call start and end included) as a fraction of the call."""
    ticks = []
    stop = threading.Event()

    def spin():
        while not stop.is_set():
            ticks.append(time.monotonic_ns())

    t = threading.Thread(target=spin)
    t.start()
    try:
        time.sleep(0.005)
        start = time.monotonic_ns()
        call()
        end = time.monotonic_ns()
    finally:
        stop.set()
        t.join()
    stamps = np.array([start] + [x for x in ticks if start < x < end] + [end])
    return np.diff(stamps).max() / (end - start)


def test_gil_is_released_while_scoring():
    # Had the kernel held the GIL, the recording thread would be frozen for the
    # whole call minus one switch interval, on every attempt. OS scheduling on a
    # busy machine can freeze it too, hence a few attempts.
    X = np.ones((1_000_000, 16), np.float32)
    w = np.ones(16, np.float32)
    mask = np.zeros(len(X), bool)
    got = score_topk(X, w, mask, 3)
    assert_topk(got, [0, 1, 2], [16, 16, 16], len(X))
    old_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-4)  # keeps the call's own GIL hand-offs short
    try:
        fractions = []
        for _ in range(10):
            fractions.append(_largest_freeze_fraction(lambda: score_topk(X, w, mask, 3)))
            if fractions[-1] < 0.5:
                break
    finally:
        sys.setswitchinterval(old_interval)
    assert min(fractions) < 0.5, fractions


# ---------------------------------------------------------------------------
# topk over precomputed scores
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(10))
@pytest.mark.parametrize("n,k", [(1, 1), (10, 3), (100, 100), (1000, 10), (5000, 100)])
def test_topk_matches_reference(seed, n, k):
    rng = np.random.default_rng(seed)
    # Few distinct values: ties everywhere.
    scores = rng.integers(0, 20, size=n).astype(np.float32)
    mask = rng.random(n) < 0.25
    want_idx, want_sc = ref_select(scores, mask, k)
    assert_topk(topk(scores, mask, k), want_idx, want_sc, n)


def test_topk_descending_input_keeps_retrieval_order():
    scores = -np.arange(50, dtype=np.float32)
    assert_topk(topk(scores, None, 5), [0, 1, 2, 3, 4], [0, -1, -2, -3, -4], 50)


# ---------------------------------------------------------------------------
# Input handling: dtypes, contiguity, validation
# ---------------------------------------------------------------------------


def test_non_contiguous_inputs_give_same_result():
    rng = np.random.default_rng(7)
    big = dyadic(rng, (400, 24))
    X = big[::2, ::3]  # (200, 8), strided in both axes
    w = dyadic(rng, 16)[::2]
    mask = (rng.random(400) < 0.2)[::2]
    want_idx, want_sc = ref_select(ref_scores(X, w), mask, 12)
    assert not X.flags.c_contiguous and not w.flags.c_contiguous
    assert_topk(score_topk(X, w, mask, 12), want_idx, want_sc, 200)
    assert_topk(score_topk(np.asfortranarray(X), w, mask, 12), want_idx, want_sc, 200)
    sc = ref_scores(X, w)
    assert_topk(topk(np.repeat(sc, 2)[::2], mask, 12), want_idx, want_sc, 200)


def test_float64_lists_and_int_masks_are_converted():
    X = [[1.0, 2.0], [3.0, 0.5], [0.0, 0.0]]
    w = np.array([1.0, 1.0])  # float64
    assert_topk(score_topk(X, w, [0, 0, 0], 2), [1, 0], [3.5, 3.0], 3)
    assert_topk(score_topk(X, w, np.array([1, 0, 0], np.int64), 5), [1, 2], [3.5, 0], 3)


def test_bool_and_uint8_masks_agree():
    rng = np.random.default_rng(5)
    X = dyadic(rng, (100, 4))
    w = dyadic(rng, 4)
    mask = rng.random(100) < 0.5
    a = score_topk(X, w, mask, 20)
    b = score_topk(X, w, mask.astype(np.uint8) * 7, 20)
    assert_topk(b, a.indices, a.scores, 100)
    want_idx, _ = ref_select(ref_scores(X, w), mask, 20)
    np.testing.assert_array_equal(a.indices, want_idx)


def test_read_only_inputs_are_accepted():
    X = np.array([[1, 2], [3, 4]], np.float32)
    w = np.array([1, -1], np.float32)
    mask = np.zeros(2, bool)
    for a in (X, w, mask):
        a.setflags(write=False)
    assert_topk(score_topk(X, w, mask, 2), [0, 1], [-1, -1], 2)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(features=np.ones(5, np.float32)), "features must be 2-dimensional"),
        (dict(features=np.ones((5, 3), bool)), "features must be a float32 array"),
        (dict(features=np.ones((5, 3), complex)), "features must be a float32 array"),
        (dict(weights=np.ones(4, np.float32)), r"weights must have shape \(3,\)"),
        (dict(weights=np.ones((3, 1), np.float32)), "weights must be 1-dimensional"),
        (dict(weights=np.array(["a", "b", "c"])), "weights must be a float32 array"),
        (dict(mask=np.zeros(4, bool)), r"mask must have shape \(5,\)"),
        (dict(mask=np.zeros(5, np.float32)), "mask must be a bool or uint8 array"),
        (dict(k=-1), "k must be in"),
        (dict(k=2.0), "k must be an integer"),
        (dict(k=True), "k must be an integer"),
        (dict(bias=float("nan")), "bias must be a finite"),
        (dict(bias=1e300), "bias must be a finite"),
        (dict(deadline_ns=-5), "deadline_ns must be in"),
        (dict(deadline_ns=1.5), "deadline_ns must be an integer"),
        (dict(check_every=0), "check_every must be in"),
    ],
)
def test_score_topk_rejects_bad_arguments(kwargs, match):
    args = dict(features=np.ones((5, 3), np.float32), weights=np.ones(3, np.float32), mask=np.zeros(5, bool), k=2)
    args.update(kwargs)
    features, weights, mask, k = (args.pop(name) for name in ("features", "weights", "mask", "k"))
    with pytest.raises(ValueError, match=match):
        score_topk(features, weights, mask, k, **args)


@pytest.mark.parametrize(
    "scores,mask,k,match",
    [
        (np.ones((2, 2), np.float32), None, 1, "scores must be 1-dimensional"),
        (np.ones(3, object), None, 1, "scores must be a float32 array"),
        (np.ones(3, np.float32), np.zeros(2, bool), 1, r"mask must have shape \(3,\)"),
        (np.ones(3, np.float32), None, -2, "k must be in"),
    ],
)
def test_topk_rejects_bad_arguments(scores, mask, k, match):
    with pytest.raises(ValueError, match=match):
        topk(scores, mask, k)


# ---------------------------------------------------------------------------
# linear_contributions
# ---------------------------------------------------------------------------


def test_linear_contributions_exact_values():
    rows = np.array([[1, 2, 3], [0, -1, 0.5]], np.float64)
    w = np.array([2, 0.5, -1], np.float32)
    got = linear_contributions(rows, w)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, [[2, 1, -3], [0, -0.5, -0.5]])


def test_linear_contributions_rows_sum_to_scores():
    rng = np.random.default_rng(2)
    X = dyadic(rng, (50, 6))
    w = dyadic(rng, 6)
    top = score_topk(X, w, None, 5, bias=1.0)
    contrib = linear_contributions(X[top.indices], w)
    np.testing.assert_array_equal(contrib.sum(axis=1) + 1.0, top.scores)


def test_linear_contributions_rejects_mismatched_weights():
    with pytest.raises(ValueError, match="weights must have shape"):
        linear_contributions(np.ones((2, 3), np.float32), np.ones(2, np.float32))
    with pytest.raises(ValueError, match="features_rows must be 2-dimensional"):
        linear_contributions(np.ones(3, np.float32), np.ones(3, np.float32))


@pytest.mark.parametrize("seed", range(5))
def test_offsets_are_added_after_the_model(seed):
    rng = np.random.default_rng(100 + seed)
    n, f, k = 300, 6, 12
    features = rng.integers(-8, 8, (n, f)).astype(np.float32) / 16
    weights = rng.integers(-8, 8, f).astype(np.float32) / 16
    offsets = rng.integers(-16, 16, n).astype(np.float32) / 16
    mask = rng.random(n) < 0.2
    got = score_topk(features, weights, mask, k, bias=0.5, offsets=offsets)
    want_idx, want_scores = ref_select(ref_scores(features, weights, 0.5) + offsets, mask, k)
    np.testing.assert_array_equal(got.indices, want_idx)
    np.testing.assert_array_equal(got.scores, want_scores)
    with pytest.raises(ValueError, match="offsets must have shape"):
        score_topk(features, weights, mask, k, offsets=offsets[:-1])
