"""The compiled per-request row walks (ranking.kernels.rows) against plain NumPy statements of the same thing."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from ranking import Csr
from ranking.kernels import _rows
from ranking.kernels.rows import ItemScratch, _csr_arrays, _int32_rows, max_share

N_ITEMS = 500


def _random_csr(rng, n_rows: int, n_cols: int, max_len: int = 12, values: bool = True) -> Csr:
    lengths = rng.integers(0, max_len + 1, n_rows)
    indptr = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    indices = rng.integers(0, n_cols, int(indptr[-1])).astype(np.int32)
    vals = rng.random(int(indptr[-1])).astype(np.float32) if values else None
    return Csr(indptr, indices, vals)


def _entries(csr: Csr, sources: np.ndarray, weights: np.ndarray):
    """(item, value * weight in float32) of every entry walked, in walk order."""
    items, vals = [], []
    for s, w in zip(sources, weights):
        row = slice(csr.indptr[s], csr.indptr[s + 1])
        items.append(csr.indices[row])
        vals.append(csr.values[row] * np.float32(w))
    return np.concatenate(items or [np.zeros(0, np.int32)]), np.concatenate(vals or [np.zeros(0, np.float32)])


def _assert_clean(scratch: ItemScratch) -> None:
    for buf in scratch._free:
        assert (buf.slot == -1).all() and not buf.mark.any()


@pytest.mark.parametrize("seed", range(5))
def test_unique_in_order_keeps_first_occurrences(seed):
    rng = np.random.default_rng(seed)
    rows = rng.integers(-1, 60, 300)
    scratch = ItemScratch(N_ITEMS)
    for order in (rows, rows[::-1]):  # the second call reuses the first one's marks: they must come back clean
        got = scratch.unique_in_order(order)
        kept = order[order >= 0]
        _, first = np.unique(kept, return_index=True)
        np.testing.assert_array_equal(got, kept[np.sort(first)])
        assert got.dtype == np.int32
    assert len(scratch._free) == 1
    _assert_clean(scratch)


def test_unique_kernel_reports_a_row_outside_its_marks_and_clears_them():
    # The wrapper validates first; the compiled loop still refuses on its own (nogil, no raise).
    from ranking.kernels import _rows

    mark = np.zeros(10, np.uint8)
    out = np.empty(5, np.int32)
    assert _rows.unique_in_order(np.array([3, 5, 3, 12, 4], np.int32), mark, out) == -1 - 3
    assert not mark.any()
    assert _rows.unique_in_order(np.array([3, -1, 5, 3], np.int32), mark, out) == 2
    np.testing.assert_array_equal(out[:2], [3, 5])
    assert not mark.any()


def test_unique_in_order_refuses_a_row_outside_the_catalog_and_stays_clean():
    scratch = ItemScratch(N_ITEMS)
    with pytest.raises(ValueError, match=r"rows holds row 500, outside 0..499"):
        scratch.unique_in_order(np.array([4, 7, 4, 500, 9]))
    with pytest.raises(ValueError, match=r"rows holds row -3"):  # -1 means "none"; anything lower is a bug
        scratch.unique_in_order(np.array([4, -1, -3]))
    _assert_clean(scratch)
    with pytest.raises(ValueError, match="integer rows"):
        scratch.unique_in_order(np.array([1.5, 2.0]))
    np.testing.assert_array_equal(scratch.unique_in_order(np.array([4, 7, 4, 9])), [4, 7, 9])


@pytest.mark.parametrize("seed", range(5))
def test_growing_row_sums_match_bincount(seed):
    """The walk the candidate call's co-visitation source takes: each item met gets the next position."""
    rng = np.random.default_rng(seed)
    csr = _random_csr(rng, N_ITEMS, N_ITEMS)
    sources = rng.integers(0, N_ITEMS, 40).astype(np.int32)
    weights = rng.random(40).astype(np.float32)
    indptr, indices, values = _csr_arrays(csr)
    slot = np.full(N_ITEMS, -1, np.int32)
    total = int((indptr[sources + 1] - indptr[sources]).sum())
    items, totals = np.empty(total, np.int32), np.zeros(total, np.float64)
    n = _rows.sum_rows(indptr, indices, values, sources, weights, slot, True, totals, items, 0)
    nb, sc = _entries(csr, sources, weights)
    uniq, first, inv = np.unique(nb, return_index=True, return_inverse=True)
    want = np.bincount(inv, weights=sc, minlength=len(uniq))
    order = np.argsort(first)  # first seen first
    np.testing.assert_array_equal(items[:n], uniq[order])
    np.testing.assert_array_equal(totals[:n], want[order])  # the same float64 sums, bit for bit
    assert (slot[items[:n]] == np.arange(n)).all()


def test_a_growing_walk_meeting_an_unknown_item_takes_back_its_positions():
    rng = np.random.default_rng(0)
    csr = _random_csr(rng, N_ITEMS, N_ITEMS)
    indptr, indices, values = _csr_arrays(csr)
    rows = np.flatnonzero(np.diff(indptr)).astype(np.int32)[:2]
    indices = indices.copy()
    indices[indptr[rows[1]]] = N_ITEMS + 7
    slot = np.full(N_ITEMS, -1, np.int32)
    n_entries = int((indptr[rows + 1] - indptr[rows]).sum())
    items, totals = np.empty(n_entries, np.int32), np.zeros(n_entries, np.float64)
    status = _rows.sum_rows(indptr, indices, values, rows, np.ones(2, np.float32), slot, True, totals, items, 0)
    assert status == -1 - indptr[rows[1]]
    assert (slot == -1).all()


@pytest.mark.parametrize("seed", range(5))
def test_candidate_index_positions_and_scatter_sum(seed):
    rng = np.random.default_rng(seed)
    csr = _random_csr(rng, N_ITEMS, N_ITEMS)
    cands = rng.permutation(N_ITEMS)[:120].astype(np.int32)
    sources = rng.integers(0, N_ITEMS, 25).astype(np.int32)
    weights = np.linspace(0.5, 1.0, 25, dtype=np.float32)
    scratch = ItemScratch(N_ITEMS)
    with scratch.index(cands) as index:
        ids = rng.integers(0, N_ITEMS, 300)
        lookup = {int(c): i for i, c in enumerate(cands)}
        np.testing.assert_array_equal(index.positions(ids), [lookup.get(int(i), -1) for i in ids])
        got = index.scatter_sum(csr, sources, weights)
    nb, sc = _entries(csr, sources, weights)
    pos = np.array([lookup.get(int(i), -1) for i in nb], np.int64)
    hit = pos >= 0
    want = np.bincount(pos[hit], weights=sc[hit], minlength=len(cands)).astype(np.float32)
    np.testing.assert_array_equal(got, want)
    _assert_clean(scratch)


def test_candidate_index_refuses_repeated_or_unknown_rows_and_is_released():
    scratch = ItemScratch(N_ITEMS)
    with pytest.raises(ValueError, match="distinct"):
        with scratch.index(np.array([3, 8, 3])):
            pass
    with pytest.raises(ValueError, match=r"candidates holds row 900"):
        with scratch.index(np.array([3, 900])):
            pass
    with pytest.raises(RuntimeError):  # an error inside the block still hands the scratch back clean
        with scratch.index(np.array([1, 2, 3])):
            raise RuntimeError("stage failed")
    _assert_clean(scratch)
    assert len(scratch._free) == 1


def test_concurrent_requests_get_separate_scratch():
    scratch = ItemScratch(N_ITEMS)
    barrier = threading.Barrier(2)
    seen = []

    def one(cands):
        with scratch.index(cands) as index:
            barrier.wait(timeout=10)  # both indexes live at once
            seen.append(index.positions(np.arange(N_ITEMS)).copy())
            barrier.wait(timeout=10)

    a, b = np.array([10, 20, 30]), np.array([20, 40])
    threads = [threading.Thread(target=one, args=(c,)) for c in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    got = {tuple(np.flatnonzero(p >= 0)) for p in seen}
    assert got == {(10, 20, 30), (20, 40)}
    assert len(scratch._free) == 2
    _assert_clean(scratch)


@pytest.mark.parametrize("seed", range(5))
def test_max_share_matches_maximum_at(seed):
    rng = np.random.default_rng(seed)
    item_cats = _random_csr(rng, N_ITEMS, 30, max_len=3, values=False)
    share = np.where(rng.random(30) < 0.4, rng.random(30), 0).astype(np.float32)
    rows = rng.integers(0, N_ITEMS, 200)
    want = np.zeros(len(rows), np.float32)
    for i, r in enumerate(rows):
        for cat in item_cats.indices[item_cats.indptr[r] : item_cats.indptr[r + 1]]:
            np.maximum.at(want, i, share[cat])
    np.testing.assert_array_equal(max_share(item_cats, rows, share), want)
    share[item_cats.indices[0]] = np.nan
    owner = int(np.searchsorted(item_cats.indptr, 0, side="right") - 1)
    assert np.isnan(max_share(item_cats, np.array([owner]), share)[0])


def test_max_share_refuses_a_category_outside_the_shares():
    item_cats = Csr(np.array([0, 1, 3], np.int64), np.array([0, 1, 5], np.int32))
    with pytest.raises(ValueError, match=r"row 1 names a category outside the 4 known"):
        max_share(item_cats, np.array([0, 1]), np.zeros(4, np.float32))


@pytest.mark.parametrize("dtype", [np.int32, np.int64])
def test_row_bounds_is_min_and_max_in_one_pass(dtype):
    rng = np.random.default_rng(3)
    for n in (1, 2, 7, 300):
        rows = rng.integers(-5, 1000, n).astype(dtype)
        assert _rows.row_bounds(rows) == (int(rows.min()), int(rows.max()))
    with pytest.raises(ValueError, match="at least one row"):
        _rows.row_bounds(np.zeros(0, dtype))


@pytest.mark.parametrize(
    "rows",
    [
        np.array([3, 900, 5], np.int64),  # the compiled bounds
        np.array([3, 900, 5], np.int32),
        np.array([3, 0, 900, 0, 5], np.int64)[::2],  # not contiguous: NumPy's reductions
        np.array([3, 900, 5], np.uint16),  # another integer dtype: likewise
        [3, 900, 5],  # not an array at all
    ],
)
def test_rows_outside_the_catalog_are_refused_whatever_their_layout(rows):
    with pytest.raises(ValueError, match=r"pool holds row 900, outside 0\.\.99"):
        _int32_rows("pool", rows, 100)
    low = np.array(rows, np.int64) - 903  # -900, -3, -898
    with pytest.raises(ValueError, match=r"pool holds row -900"):
        _int32_rows("pool", low.astype(np.int64), 100, allow_missing=True)
    ok = np.array([3, -1, 5])
    np.testing.assert_array_equal(_int32_rows("pool", ok, 100, allow_missing=True), ok)
    assert _int32_rows("pool", ok, 100, allow_missing=True).dtype == np.int32
    with pytest.raises(ValueError, match="pool holds row -1"):
        _int32_rows("pool", ok, 100)


def test_lent_buffers_come_back_after_an_error_and_apart_in_threads():
    scratch = ItemScratch(N_ITEMS)
    with pytest.raises(RuntimeError):
        with scratch.buffers():
            raise RuntimeError("stage failed")
    assert len(scratch._free) == 1
    barrier = threading.Barrier(2)
    held = []

    def one():
        with scratch.buffers() as (slot, _):
            held.append(slot)
            barrier.wait(timeout=10)  # both lent at once: two sets

    threads = [threading.Thread(target=one) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert held[0] is not held[1] and len(scratch._free) == 2
    _assert_clean(scratch)
