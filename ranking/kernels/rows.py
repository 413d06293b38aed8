"""Public API of the per-request row walks: distinct candidates, CSR sums per candidate, category shares.

This wrapper owns validation, dtype/contiguity fixing, output allocation and the
scratch arrays the compiled loops in ``ranking.kernels._rows`` need: dense over every
item row (an item's position, a visited mark), lent to one
request at a time and handed back clean, so a request costs what it touches and
not what the catalog holds. Other packages import only this module.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np

from ranking.kernels import _rows

__all__ = ["ItemScratch", "CandidateIndex", "max_share", "sorted_codes", "sorted_row"]

_NO_ITEMS = np.zeros(0, np.int32)  # sum_rows without grow records no items
_BOUNDED = (np.dtype(np.int32), np.dtype(np.int64))  # the dtypes _rows.row_bounds reads


class _Buffers:
    __slots__ = ("mark", "slot")

    def __init__(self, n_items: int):
        self.slot = np.full(n_items, -1, np.int32)  # position per item row, -1 elsewhere
        self.mark = np.zeros(n_items, np.uint8)


class _Lease:
    """A set of an ``ItemScratch``'s buffers lent for one ``with`` block: the set itself, or
    its ``(slot, mark)`` with ``pair``. A class rather than a generator context manager: it is
    entered once or twice per request, and a generator's frames cost several times more."""

    __slots__ = ("buf", "pair", "scratch")

    def __init__(self, scratch: ItemScratch, pair: bool):
        self.scratch, self.pair = scratch, pair

    def __enter__(self):
        free = self.scratch._free
        self.buf = free.pop() if free else _Buffers(self.scratch.n_items)  # pop is atomic under the GIL
        return (self.buf.slot, self.buf.mark) if self.pair else self.buf

    def __exit__(self, *exc) -> None:
        self.scratch._free.append(self.buf)


def _int32_rows(name: str, rows, n_rows: int, allow_missing: bool = False) -> np.ndarray:
    """``rows`` as contiguous int32, each in 0..n_rows-1 (or -1, "none", with ``allow_missing``)."""
    arr = rows if type(rows) is np.ndarray else np.asarray(rows)
    if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
        raise ValueError(f"{name} must be a 1-d array of integer rows, got shape {arr.shape} dtype {arr.dtype}")
    if arr.size:
        if arr.dtype in _BOUNDED and arr.flags.c_contiguous:
            lo, hi = _rows.row_bounds(arr)  # one compiled pass, not two NumPy reductions
        else:
            lo, hi = int(arr.min()), int(arr.max())
        if hi >= n_rows or (lo < 0 and not (allow_missing and lo == -1)):
            bad = hi if hi >= n_rows else lo
            raise ValueError(f"{name} holds row {bad}, outside 0..{n_rows - 1}")
    return np.ascontiguousarray(arr, dtype=np.int32)


def _csr_arrays(csr) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    indptr = np.ascontiguousarray(csr.indptr, dtype=np.int64)
    indices = np.ascontiguousarray(csr.indices, dtype=np.int32)
    if csr.values is None:
        raise ValueError("the CSR rows carry no values to sum")
    return indptr, indices, np.ascontiguousarray(csr.values, dtype=np.float32)


def _weights(weights, n: int) -> np.ndarray:
    if weights is None:
        return np.ones(n, np.float32)
    w = np.ascontiguousarray(weights, dtype=np.float32)
    if w.shape != (n,):
        raise ValueError(f"weights must have one value per source ({n}), got shape {w.shape}")
    return w


def _check(status: int, what: str) -> int:
    if status < 0:
        raise ValueError(
            f"{what} names an item outside the catalog (at entry {-1 - status}); "
            "the bundle's tables disagree with its item count: rebuild it"
        )
    return status


class CandidateIndex:
    """One request's distinct candidates, with each item row's position among them.

    Obtained from :meth:`ItemScratch.index`; valid only inside that ``with`` block.
    """

    def __init__(self, cands: np.ndarray, slot: np.ndarray, mark: np.ndarray):
        self.cands = cands
        self._slot = slot
        self.mark = mark  # the lent visited marks, all zero: the feature kernel's scratch

    def positions(self, ids) -> np.ndarray:
        """Position of each item row among the candidates, -1 where it is not one."""
        ids = np.asarray(ids)
        if len(ids) == 0:
            return np.zeros(0, np.int32)
        return self._slot[ids]

    def scatter_sum(self, csr, sources, weights=None) -> np.ndarray:
        """Per candidate, the sum of ``value * weight`` over the entries naming it in the
        ``sources`` rows of ``csr`` (float32, as ``np.bincount`` would sum them)."""
        out = np.zeros(len(self.cands), np.float64)
        indptr, indices, values = _csr_arrays(csr)
        src = _int32_rows("sources", sources, len(indptr) - 1)
        if len(src):
            _check(
                _rows.sum_rows(
                    indptr, indices, values, src, _weights(weights, len(src)), self._slot, False, out, _NO_ITEMS, 0
                ),
                "a CSR row",
            )
        return out.astype(np.float32)


class ItemScratch:
    """Scratch arrays over every item row, lent to one request at a time.

    A pool rather than one set per thread: a server worker runs one pipeline at a
    time (``max_concurrent_ranks``) from any of its many gRPC threads, so the pool
    holds as many sets as ever ran at once: usually one. Sets are created on first
    use; the ``slot`` array's pages are written up front (-1), the marks are
    touched only where requests reach.
    """

    def __init__(self, n_items: int):
        self.n_items = int(n_items)
        self._free: list[_Buffers] = []

    def _lend(self) -> _Lease:
        """One set of buffers for the ``with`` block, handed back at its end."""
        return _Lease(self, False)

    def buffers(self) -> _Lease:
        """``(slot, mark)`` for the ``with`` block: int32 -1 and uint8 0 over every item row,
        to be handed back so (the compiled walks that borrow them promise it)."""
        return _Lease(self, True)

    def unique_in_order(self, rows) -> np.ndarray:
        """Drop -1 and repeated rows, keeping each first occurrence in place (int32)."""
        arr = _int32_rows("rows", rows, self.n_items, allow_missing=True)
        out = np.empty(len(arr), np.int32)
        with self._lend() as buf:
            n = _check(_rows.unique_in_order(arr, buf.mark, out), "rows")
        return out[:n]

    @contextmanager
    def index(self, cands) -> Iterator[CandidateIndex]:
        """The candidates' positions by item row, for the ``with`` block.

        Raises
        ------
        ValueError
            ``cands`` holds a row outside the catalog or the same row twice.
        """
        cands = _int32_rows("candidates", cands, self.n_items)
        with self._lend() as buf:
            slot = buf.slot
            positions = np.arange(len(cands), dtype=np.int32)
            slot[cands] = positions
            try:
                if not np.array_equal(slot[cands], positions):  # a repeated row kept its last position
                    raise ValueError("candidates must be distinct item rows")
                yield CandidateIndex(cands, slot, buf.mark)
            finally:
                slot[cands] = -1


def max_share(csr, rows, share) -> np.ndarray:
    """Per row of ``csr`` (item -> categories), the largest ``share`` of its categories
    (0 without one; NaN if a share is NaN), as ``np.maximum.at`` from zero would give."""
    indptr = np.ascontiguousarray(csr.indptr, dtype=np.int64)
    indices = np.ascontiguousarray(csr.indices, dtype=np.int32)
    rows = _int32_rows("rows", rows, len(indptr) - 1)
    share = np.ascontiguousarray(share, dtype=np.float32)
    out = np.empty(len(rows), np.float32)
    status = _rows.max_share(indptr, indices, rows, share, out)
    if status < 0:
        raise ValueError(
            f"row {int(rows[-1 - status])} names a category outside the {len(share)} known; "
            "the bundle's tables disagree: rebuild it"
        )
    return out


def sorted_codes(sorted_ids: np.ndarray) -> np.ndarray:
    """A sorted NumPy unicode array of ids as the (n, width) uint32 code points :func:`sorted_row`
    searches (a view, no copy)."""
    arr = np.ascontiguousarray(sorted_ids)
    if arr.dtype.kind != "U":
        raise ValueError(f"ids must be a unicode array, got dtype {arr.dtype}")
    return arr.view(np.uint32).reshape(len(arr), arr.dtype.itemsize // 4)


def sorted_row(codes: np.ndarray, order: np.ndarray, key: str) -> int:
    """``order[i]`` for the id ``key`` at position ``i`` of the sorted ids :func:`sorted_codes`
    gave ``codes``, -1 when it is not there (a binary search in compiled code)."""
    return _rows.sorted_row(codes, order, key if type(key) is str else str(key))  # numpy.str_ too
