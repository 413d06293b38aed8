"""The exact head's compiled scan (ranking.kernels.search.FlatScan) against a float64 scan in NumPy.

The two-pass scan (half precision, then the rows that may belong scored exactly) must give
the one exact pass's answer bit for bit, on every CPU path, including where half precision
cannot tell rows apart.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

from ranking.kernels import _search
from ranking.kernels.search import FlatScan, norms, use_avx2

HAS_AVX2 = use_avx2(True)


@pytest.fixture(autouse=True)
def _avx2_back_on():
    yield
    use_avx2(True)


def _rows(rng, n: int, d: int) -> np.ndarray:
    # Norms spread over a decade, as trained item factors' are.
    return (rng.standard_normal((n, d)) * rng.uniform(0.2, 2.0, (n, 1))).astype(np.float32)


def _one_exact_pass(rows: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    s = np.empty((len(queries), k), np.float32)
    p = np.empty((len(queries), k), np.int32)
    _search.top_inner(np.ascontiguousarray(rows), np.ascontiguousarray(queries), s, p)
    return s, p


def _reference_order(rows: np.ndarray, q: np.ndarray, scores: np.ndarray, k: int) -> np.ndarray:
    """Positions by the given exact scores, best first, ties by the lower position."""
    pos = np.arange(len(rows))
    return pos[np.lexsort((pos, -scores))][:k]


@pytest.mark.parametrize(("n", "d"), [(1, 8), (7, 3), (9, 13), (300, 64), (1031, 32), (2000, 67)])
def test_the_top_k_is_a_float64_scans_within_float32_rounding(n, d):
    rng = np.random.default_rng(n * 100 + d)
    rows, queries = _rows(rng, n, d), rng.standard_normal((6, d)).astype(np.float32)
    scan = FlatScan(rows)
    for k in sorted({1, min(5, n), n // 2 or 1, n}):
        scores, pos = scan.search(queries, k)
        assert scores.shape == pos.shape == (6, k)
        for q, s, p in zip(queries, scores, pos):
            exact = rows.astype(np.float64) @ q.astype(np.float64)
            np.testing.assert_allclose(s, exact[p], rtol=1e-5, atol=1e-5)
            assert np.all(np.diff(s) <= 0)  # best first
            # Only rows within rounding of the k-th best may differ from the float64 top k.
            kth = np.sort(exact)[::-1][k - 1]
            missed = np.setdiff1d(_reference_order(rows, q, exact, k), p)
            assert np.all(np.abs(exact[missed] - kth) <= 1e-5 * (1 + abs(kth)))


@pytest.mark.parametrize("d", [5, 16, 64])
def test_two_passes_give_the_one_exact_pass_answer_bit_for_bit(d):
    rng = np.random.default_rng(d)
    rows, queries = _rows(rng, 3001, d), rng.standard_normal((40, d)).astype(np.float32)
    scan = FlatScan(rows)
    assert scan.half is not None
    for k in (1, 10, 200, 3001):
        want = _one_exact_pass(rows, queries, k)
        got = scan.search(queries, k)
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])
    if HAS_AVX2:
        # The first pass left out most rows: the second scored a few more than k per query.
        before = scan.checked
        scan.search(queries, 10)
        assert 40 * 10 <= scan.checked - before < 40 * 3001 // 4


def test_rows_half_precision_cannot_tell_apart_are_ordered_exactly():
    # Rows a hair apart (far below half precision's 2^-11): the first pass sees them tied, the
    # bound must keep every one of them for the exact pass, which orders them.
    rng = np.random.default_rng(3)
    base = rng.standard_normal(32).astype(np.float32)
    rows = np.repeat(base[None], 600, axis=0)
    rows += (rng.standard_normal(rows.shape) * 1e-6).astype(np.float32)
    rows[::7] = base  # exact duplicates too: ties by the lower position
    rows = np.concatenate([rows, _rows(rng, 400, 32) * 0.1])
    queries = np.concatenate([base[None], rng.standard_normal((9, 32)).astype(np.float32)])
    scan = FlatScan(rows)
    if HAS_AVX2:
        scan.search(base[None], 1)
        assert scan.checked >= 600  # every near-copy of base went on to the exact pass
    for k in (1, 50, 599, 700):
        want = _one_exact_pass(rows, queries, k)
        got = scan.search(queries, k)
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])
    s, p = scan.search(base[None], 1000)
    tied = p[0][s[0] == s[0][p[0] == 0]]  # the rows scoring as row 0 (base) does
    assert np.isin(np.arange(0, 600, 7), tied).all()  # its copies among them
    assert np.all(np.diff(tied) > 0)  # equal scores in row order


@pytest.mark.skipif(not HAS_AVX2, reason="this CPU has no AVX2/F16C/FMA path to compare with")
def test_the_avx2_and_sse_paths_score_alike():
    rng = np.random.default_rng(11)
    for d in (3, 8, 29, 64):
        rows, queries = _rows(rng, 517, d), rng.standard_normal((12, d)).astype(np.float32)
        scan = FlatScan(rows)
        fast = scan.search(queries, 60), _one_exact_pass(rows, queries, 60)
        assert not use_avx2(False)
        slow = scan.search(queries, 60), _one_exact_pass(rows, queries, 60)
        use_avx2(True)
        for a, b in zip(fast, slow):
            np.testing.assert_array_equal(a[0], b[0])
            np.testing.assert_array_equal(a[1], b[1])


def test_values_half_precision_cannot_hold_keep_the_one_exact_pass():
    rng = np.random.default_rng(4)
    rows = _rows(rng, 200, 16)
    rows[17, 3] = 1e6  # beyond half precision's 65 504
    scan = FlatScan(rows)
    assert scan.half is None
    q = rng.standard_normal((3, 16)).astype(np.float32)
    np.testing.assert_array_equal(scan.search(q, 20)[1], _one_exact_pass(rows, q, 20)[1])


def test_k_beyond_the_rows_pads_and_bad_input_is_refused():
    rows = np.arange(12, dtype=np.float32).reshape(3, 4)
    scores, pos = FlatScan(rows).search(np.ones((2, 4), np.float32), 5)
    np.testing.assert_array_equal(pos, [[2, 1, 0, -1, -1]] * 2)
    assert np.isneginf(scores[:, 3:]).all() and np.array_equal(scores[0, :3], [38.0, 22.0, 6.0])
    with pytest.raises(ValueError, match=r"queries must have shape \(n, 4\), got \(2, 3\)"):
        FlatScan(rows).search(np.ones((2, 3), np.float32), 1)
    with pytest.raises(ValueError, match="k must be >= 1, got 0"):
        FlatScan(rows).search(np.ones((1, 4), np.float32), 0)
    with pytest.raises(ValueError, match=r"FlatScan needs a 2-d array of rows, got shape \(4,\)"):
        FlatScan(np.ones(4, np.float32))
    empty = FlatScan(np.zeros((0, 4), np.float32))
    assert empty.search(np.ones((1, 4), np.float32), 2)[1].tolist() == [[-1, -1]]


def test_threads_scan_at_once_and_each_gets_its_own_answer():
    rng = np.random.default_rng(8)
    rows, queries = _rows(rng, 4000, 64), rng.standard_normal((64, 64)).astype(np.float32)
    scan = FlatScan(rows)
    want = [scan.search(q[None], 100)[1] for q in queries]
    got: dict[int, list] = {}

    def run(t: int):
        got[t] = [scan.search(q[None], 100)[1] for q in queries[t::4]]

    threads = [threading.Thread(target=run, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    for t in range(4):
        for g, w in zip(got[t], want[t::4]):
            np.testing.assert_array_equal(g, w)


def test_norms_are_float64_norms_of_the_rows_and_other_shapes_are_refused():
    x = np.random.default_rng(5).standard_normal((50, 37)).astype(np.float32) * 1e3
    x[3] = 0.0
    np.testing.assert_allclose(norms(x), np.linalg.norm(x.astype(np.float64), axis=1), rtol=1e-14)
    assert norms(x)[3] == 0.0 and norms(x).dtype == np.float64
    assert norms(np.zeros((0, 5), np.float32)).shape == (0,)
    with pytest.raises(ValueError, match=r"norms needs a 2-d array of rows, got shape \(5,\)"):
        norms(np.ones(5, np.float32))
