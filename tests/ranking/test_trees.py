"""The tree-ensemble kernel and its LightGBM export against LightGBM's own predict."""

import lightgbm as lgb
import numpy as np
import pytest
from test_scoring import ref_select  # the same NumPy reference selection as the linear kernel

from ranking import TreeArrays, score_trees_topk, tree_contributions, trees_from_lightgbm


def _data(rng, n, f, missing):
    X = rng.standard_normal((n, f)).astype(np.float32)
    # Exact zeros and NaNs exercise LightGBM's missing-value routes.
    X[rng.random((n, f)) < 0.1] = 0.0
    if missing:
        X[rng.random((n, f)) < 0.15] = np.nan
    y = np.nan_to_num(X[:, 0]) * 2 + np.sin(np.nan_to_num(X[:, 1 % f]) * 3) + (np.isnan(X[:, 2 % f]) * 1.5)
    return X, y + 0.1 * rng.standard_normal(n)


def _booster(X, y, objective="regression", group=None, seed=0, **params):
    p = {
        "objective": objective,
        "num_leaves": 15,
        "learning_rate": 0.1,
        "min_data_in_leaf": 5,
        "verbose": -1,
        "seed": seed,
        "deterministic": True,
        "num_threads": 1,
        **params,
    }
    ds = lgb.Dataset(X, y, group=group, params={"verbose": -1})
    return lgb.train(p, ds, num_boost_round=40)


def _all_scores(X, trees):
    top = score_trees_topk(X, trees, None, len(X))
    out = np.full(len(X), np.nan, np.float32)
    out[top.indices] = top.scores
    return out


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("missing,zero_as_missing", [(False, False), (True, False), (True, True)])
def test_scores_match_lightgbm_predict_on_random_inputs(seed, missing, zero_as_missing):
    rng = np.random.default_rng(seed)
    X, y = _data(rng, 600, 7, missing)
    booster = _booster(X, y, seed=seed, zero_as_missing=zero_as_missing, use_missing=True)
    trees = trees_from_lightgbm(booster)
    # Fresh inputs, with more NaN/zero than training saw, so default directions are used.
    Xt, _ = _data(np.random.default_rng(seed + 100), 500, 7, True)
    want = booster.predict(Xt)
    got = _all_scores(Xt, trees)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_lambdarank_model_matches_predict_and_picks_its_top():
    rng = np.random.default_rng(3)
    X, y = _data(rng, 800, 6, True)
    labels = np.clip(np.round(y - y.min()), 0, 4).astype(int)
    booster = _booster(X, labels, objective="lambdarank", group=[20] * 40)
    trees = trees_from_lightgbm(booster)
    Xt, _ = _data(np.random.default_rng(9), 300, 6, True)
    want = booster.predict(Xt)
    mask = rng.random(300) < 0.2
    got = score_trees_topk(Xt, trees, mask, 17)
    idx, _ = ref_select(want.astype(np.float32), mask, 17)
    np.testing.assert_allclose(got.scores, want[got.indices], atol=1e-5)
    # The same set of rows is chosen (float32 rounding may only swap near-ties).
    assert np.abs(np.sort(want[got.indices])[::-1] - np.sort(want[idx])[::-1]).max() < 1e-5


def test_contributions_plus_bias_sum_to_the_score():
    rng = np.random.default_rng(1)
    X, y = _data(rng, 500, 5, True)
    trees = trees_from_lightgbm(_booster(X, y))
    contrib, bias = tree_contributions(X[:50], trees)
    assert contrib.shape == (50, 5) and bias.shape == (50,)
    np.testing.assert_allclose(contrib.sum(axis=1) + bias, _all_scores(X[:50], trees), atol=1e-5)
    # The feature the target depends on most carries the largest attribution.
    assert np.abs(contrib).mean(axis=0).argmax() == 0


def test_ties_prefer_lower_index_and_k_beyond_n():
    # One stump: rows with x <= 0.5 score 1, others 2.
    trees = TreeArrays.checked([0], [0], [0.5], [~0], [~1], [0], [1.5], [1.0, 2.0], n_features=1)
    X = np.array([[0.0], [1.0], [0.0], [1.0], [np.nan]], np.float32)
    got = score_trees_topk(X, trees, None, 10)
    # NaN with missing type "none" becomes 0.0 -> left -> 1.0, as LightGBM does.
    np.testing.assert_array_equal(got.indices, [1, 3, 0, 2, 4])
    np.testing.assert_array_equal(got.scores, [2, 2, 1, 1, 1])


def test_missing_types_route_nan_and_zero():
    # flags: NaN missing type, default right (4); zero missing type, default left (3).
    nan_right = TreeArrays.checked([0], [0], [10.0], [~0], [~1], [4], [0.0], [1.0, 2.0], n_features=1)
    zero_left = TreeArrays.checked([0], [0], [-10.0], [~0], [~1], [3], [0.0], [1.0, 2.0], n_features=1)
    X = np.array([[np.nan], [0.0], [5.0]], np.float32)
    np.testing.assert_array_equal(_all_scores(X, nan_right), [2.0, 1.0, 1.0])
    np.testing.assert_array_equal(_all_scores(X, zero_left), [1.0, 1.0, 2.0])


def test_empty_inputs_single_leaf_trees_and_offsets():
    trees = TreeArrays.checked([~0, ~1], [], [], [], [], [], [], [0.25, 0.5], n_features=3)
    empty = score_trees_topk(np.zeros((0, 3), np.float32), trees, None, 5)
    assert len(empty.indices) == 0 and empty.n_scored == 0
    X = np.zeros((4, 3), np.float32)
    got = score_trees_topk(X, trees, [0, 1, 0, 0], 3, offsets=[0, 0, 1, 0])
    np.testing.assert_array_equal(got.indices, [2, 0, 3])
    np.testing.assert_allclose(got.scores, [1.75, 0.75, 0.75])
    contrib, bias = tree_contributions(X, trees)
    assert not contrib.any() and np.all(bias == 0.75)


def test_expired_deadline_scores_a_prefix():
    rng = np.random.default_rng(0)
    X, y = _data(rng, 400, 4, False)
    trees = trees_from_lightgbm(_booster(X, y))
    got = score_trees_topk(X, trees, None, 5, deadline_ns=1, check_every=32)
    assert got.n_scored == 32
    assert got.indices.max() < 32


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(left=[0]), "later node"),
        (dict(feature=[3]), "not a column"),
        (dict(right=[~7]), "outside"),
        (dict(flags=[9]), "flag"),
        (dict(leaf_value=[1.0, np.inf]), "not finite"),
        (dict(threshold=[0.5, 1.0]), "shape"),
    ],
)
def test_corrupt_trees_are_refused_with_the_array_named(change, match):
    args = dict(
        roots=[0],
        feature=[0],
        threshold=[0.5],
        left=[~0],
        right=[~1],
        flags=[0],
        node_value=[0.0],
        leaf_value=[1.0, 2.0],
    )
    args.update(change)
    with pytest.raises(ValueError, match=match):
        TreeArrays.checked(**args, n_features=1)


def test_feature_count_mismatch_is_refused():
    trees = TreeArrays.checked([~0], [], [], [], [], [], [], [1.0], n_features=2)
    with pytest.raises(ValueError, match="2 features"):
        score_trees_topk(np.zeros((3, 4), np.float32), trees, None, 2)


def test_averaged_ensemble_matches_the_mean_of_predictions():
    from ranking import concat_trees

    rng = np.random.default_rng(5)
    X, y = _data(rng, 500, 6, True)
    boosters = [_booster(X, y, seed=s, bagging_fraction=0.7, bagging_freq=1) for s in range(3)]
    trees = concat_trees([trees_from_lightgbm(b, scale=1 / 3) for b in boosters])
    Xt, _ = _data(np.random.default_rng(6), 300, 6, True)
    want = np.mean([b.predict(Xt) for b in boosters], axis=0)
    np.testing.assert_allclose(_all_scores(Xt, trees), want, atol=1e-5)
    contrib, bias = tree_contributions(Xt[:20], trees)
    np.testing.assert_allclose(contrib.sum(1) + bias, want[:20], atol=1e-5)
