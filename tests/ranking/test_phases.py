"""Phased tree scoring (a prefix of every bag over all rows, the rest over the best) against a NumPy reference."""

import numpy as np
import pytest
from test_scoring import ref_select  # the same NumPy reference selection as the other kernels
from test_trees import _booster, _data

from ranking import (
    TreeArrays,
    TreePhases,
    concat_trees,
    score_trees_phased_topk,
    score_trees_topk,
    trees_from_lightgbm,
)


def _bags(seed=0, n_bags=3, n=500, f=6):
    """Three bags of different lengths, averaged as the builder exports them, and test rows."""
    rng = np.random.default_rng(seed)
    X, y = _data(rng, n, f, True)
    boosters = [_booster(X, y, seed=seed + b, bagging_fraction=0.8, bagging_freq=1) for b in range(n_bags)]
    cut = [40, 25, 33][:n_bags]
    from lightgbm import Booster

    boosters = [Booster(model_str=b.model_to_string(num_iteration=c)) for b, c in zip(boosters, cut)]
    trees = concat_trees([trees_from_lightgbm(b, scale=1.0 / n_bags) for b in boosters])
    Xt, _ = _data(np.random.default_rng(seed + 50), 300, f, True)
    return trees, cut, Xt


def _sum(trees, roots, X):
    """Each row's leaf sum over the trees rooted at ``roots``, in float64 (NumPy reference walk)."""
    out = np.zeros(len(X))
    for r in roots:
        for i, x in enumerate(X):
            node = int(r)
            while node >= 0:
                v = float(x[trees.feature[node]])
                fl = int(trees.flags[node])
                missing = fl >> 1
                if missing != 2 and v != v:
                    v = 0.0
                if (missing == 1 and abs(v) <= 1e-35) or (missing == 2 and v != v):
                    node = trees.left[node] if fl & 1 else trees.right[node]
                else:
                    node = trees.left[node] if v <= trees.threshold[node] else trees.right[node]
            out[i] += trees.leaf_value[~node]
    return out


def _ref_phased(trees, phases, X, mask, k, n_second, offsets):
    """The documented rule in NumPy: best n_second by first-phase score, their full scores' top k,
    then the next rows by first-phase order while fewer than k."""
    first = (_sum(trees, phases.roots_first, X).astype(np.float32) + offsets).astype(np.float32)
    order, _ = ref_select(first, mask, len(X))
    chosen = order[:n_second]
    full = (_sum(trees, trees.roots, X).astype(np.float32) + offsets).astype(np.float32)
    sub = np.full(len(X), np.nan, np.float32)
    sub[chosen] = full[chosen]
    top, scores = ref_select(sub, None, k)
    rest = order[n_second:][: max(0, k - len(top))]
    return np.r_[top, rest].astype(np.int32), np.r_[scores, first[rest]].astype(np.float32)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("n_second,k", [(30, 10), (5, 10), (1, 3), (100, 100)])
def test_phased_topk_matches_the_reference_rule(seed, n_second, k):
    trees, cut, X = _bags(seed)
    phases = TreePhases.of(trees, cut, [4, 3, 5])
    rng = np.random.default_rng(seed)
    mask = rng.random(len(X)) < 0.2
    offsets = rng.normal(0, 0.05, len(X)).astype(np.float32)
    got = score_trees_phased_topk(X, trees, phases, mask, k, n_second, offsets=offsets)
    want_idx, want_scores = _ref_phased(trees, phases, X, mask, k, n_second, offsets)
    np.testing.assert_array_equal(got.indices, want_idx)
    np.testing.assert_allclose(got.scores, want_scores, rtol=0, atol=1e-6)
    assert got.n_scored == len(X) and got.n_second == min(n_second, int((~mask).sum())) and not got.second_cut
    assert not mask[got.indices].any()


def test_second_phase_rows_get_the_full_models_score():
    trees, cut, X = _bags(1)
    phases = TreePhases.of(trees, cut, [2, 2, 2])
    full = score_trees_topk(X, trees, None, len(X))
    by_row = dict(zip(full.indices.tolist(), full.scores.tolist()))
    got = score_trees_phased_topk(X, trees, phases, None, 20, 60)
    assert got.n_second == 60
    np.testing.assert_allclose(got.scores, [by_row[i] for i in got.indices], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("n_second", [0, -1, 300, 1000])
def test_zero_or_all_rows_in_the_second_phase_is_exactly_one_phase(n_second):
    trees, cut, X = _bags(2)
    phases = TreePhases.of(trees, cut, [3, 3, 3])
    mask = np.random.default_rng(0).random(len(X)) < 0.3
    want = score_trees_topk(X, trees, mask, 10)
    got = score_trees_phased_topk(X, trees, phases, mask, 10, n_second)
    np.testing.assert_array_equal(got.indices, want.indices)
    np.testing.assert_array_equal(got.scores, want.scores)
    assert got.n_scored == want.n_scored


def test_a_full_prefix_ranks_like_one_phase():
    # With every tree in the first phase the second adds nothing: the top k is the full model's.
    trees, cut, X = _bags(0)
    phases = TreePhases.of(trees, cut, cut)
    want = score_trees_topk(X, trees, None, 10)
    got = score_trees_phased_topk(X, trees, phases, None, 10, 50)
    np.testing.assert_array_equal(got.indices, want.indices)
    np.testing.assert_allclose(got.scores, want.scores, atol=1e-6)


def test_deadline_stops_both_phases():
    trees, cut, X = _bags(0)
    phases = TreePhases.of(trees, cut, [3, 3, 3])
    got = score_trees_phased_topk(X, trees, phases, None, 5, 100, deadline_ns=1, check_every=32)
    # The first phase scores its first check_every rows, the second completes check_every of them.
    assert got.n_scored == 32
    assert got.indices.max() < 32
    assert got.n_second == 32 and not got.second_cut
    got = score_trees_phased_topk(X, trees, phases, None, 40, 100, deadline_ns=1, check_every=8)
    assert got.n_scored == 8 and got.n_second == 8 and not got.second_cut
    assert len(got.indices) == 8
    # A deadline that falls inside the second phase: it stops after a checkpoint, the rows that
    # completed come first and the next ones by first-phase order fill the answer.
    rng = np.random.default_rng(3)
    big = rng.standard_normal((20000, X.shape[1])).astype(np.float32)
    import time

    cut_seen = False
    for _ in range(20):
        full = score_trees_phased_topk(big, trees, phases, None, 500, 15000, check_every=16)
        t0 = time.monotonic_ns()
        score_trees_phased_topk(big, trees, phases, None, 500, 15000, check_every=16)
        spent = time.monotonic_ns() - t0
        got = score_trees_phased_topk(
            big, trees, phases, None, 500, 15000, deadline_ns=time.monotonic_ns() + int(spent * 0.7), check_every=16
        )
        if got.n_scored == len(big) and got.second_cut:
            cut_seen = True
            assert got.n_second < 15000 and got.n_second % 16 == 0
            assert len(got.indices) == 500
            break
    assert cut_seen, "no run's deadline fell inside the second phase"
    assert full.n_second == 15000


def test_masked_rows_are_never_returned_even_when_k_exceeds_the_rest():
    trees, cut, X = _bags(1)
    phases = TreePhases.of(trees, cut, [2, 2, 2])
    mask = np.ones(len(X), bool)
    mask[[3, 77, 150]] = False
    got = score_trees_phased_topk(X, trees, phases, mask, 10, 2)
    assert sorted(got.indices.tolist()) == [3, 77, 150]
    assert got.n_second == 2


def test_phases_are_checked_against_the_ensemble():
    trees, cut, X = _bags(0)
    with pytest.raises(ValueError, match="adds up to"):
        TreePhases.of(trees, [10, 10, 10], [1, 1, 1])
    with pytest.raises(ValueError, match=r"first_trees_per_bag\[1\]"):
        TreePhases.of(trees, cut, [1, 99, 1])
    other = TreeArrays.checked([~0], [], [], [], [], [], [], [0.5], n_features=X.shape[1])
    with pytest.raises(ValueError, match="phases split"):
        score_trees_phased_topk(X, other, TreePhases.of(trees, cut, [1, 1, 1]), None, 5, 10)
