"""Public API of the exact inner-product scan: :class:`FlatScan`, the exact head's tiers.

This wrapper owns validation, dtype/contiguity fixing and output allocation for the
compiled scan in ``ranking.kernels._search``, and the half-precision copy its first
pass reads. Other packages import only this module.
"""

from __future__ import annotations

import numpy as np

from ranking.kernels import _search

__all__ = ["FlatScan", "norms"]

_HALF_MAX = float(np.finfo(np.float16).max)


class FlatScan:
    """The exact top k by inner product over a fixed set of rows, as a flat index answers it.

    ``search`` gives what an exhaustive scan in float32 gives (each score summed in one
    fixed order, the same on every CPU; ties by the lower position), from two passes when
    the CPU has AVX2, F16C and FMA: every row scored from a half-precision copy (half the
    bytes of the rows, the scan's cost when they are out of cache), then only the rows that
    may belong to the top k, given how far a half-precision score can be from the exact
    one, scored exactly. Rows whose values half precision cannot hold (beyond 65 504, not
    finite) keep the one exact pass.

    Parameters
    ----------
    rows : np.ndarray
        (n, d) float32 (converted and copied contiguous when not already).
    """

    def __init__(self, rows: np.ndarray):
        x = np.ascontiguousarray(rows, dtype=np.float32)
        if x.ndim != 2:
            raise ValueError(f"FlatScan needs a 2-d array of rows, got shape {x.shape}")
        if x.shape[0] >= 2**31:
            raise ValueError(f"FlatScan positions are int32: at most 2^31 - 1 rows, got {x.shape[0]}")
        self.rows = x
        self.ntotal, self.d = x.shape
        self.half: np.ndarray | None = None
        if self.ntotal and self.d and np.isfinite(x).all() and float(np.abs(x).max()) <= _HALF_MAX:
            half = x.astype(np.float16)
            # The largest rounding per dimension: no half-precision score is further from its
            # exact one than sum_j |q_j| err_j (plus the sums' own rounding, in the kernel).
            self.err = np.abs(x - half.astype(np.float32)).max(axis=0).astype(np.float64)
            # The largest row norm, over-estimated: it bounds each sum's float32 rounding.
            self.norm_bound = float(np.sqrt(np.einsum("ij,ij->i", x, x, dtype=np.float64)).max()) * 1.001 + 1e-30
            blocks = -(-self.ntotal // 8)
            padded = np.zeros((blocks * 8, self.d), np.float16)
            padded[: self.ntotal] = half
            # Blocks of eight rows, dimension by dimension: half[b, j, r] is row 8b + r's dimension j.
            self.half = np.ascontiguousarray(padded.view(np.uint16).reshape(blocks, 8, self.d).transpose(0, 2, 1))
        self.checked = 0  # rows the exact pass scored, over every search (for the bench's figures)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Each query row's ``k`` best rows, best first: (scores float32 (n, k), positions int32
        (n, k)); -inf and -1 past the last row when ``k`` exceeds them."""
        q = np.ascontiguousarray(queries, dtype=np.float32)
        if q.ndim != 2 or q.shape[1] != self.d:
            raise ValueError(f"queries must have shape (n, {self.d}), got {q.shape}")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        kk = min(k, self.ntotal)
        # The scan writes every entry of s and p; past the last row the answer is padded.
        s, p = np.empty((len(q), kk), np.float32), np.empty((len(q), kk), np.int32)
        if kk == k:
            scores, positions = s, p
        else:
            scores, positions = np.full((len(q), k), -np.inf, np.float32), np.full((len(q), k), -1, np.int32)
        if kk == 0 or len(q) == 0:
            return scores, positions
        if self.half is not None:
            self.checked += _search.top_inner_two_pass(self.rows, self.half, self.err, self.norm_bound, q, s, p)
        else:
            _search.top_inner(self.rows, q, s, p)
            self.checked += self.ntotal * len(q)
        if kk < k:
            scores[:, :kk], positions[:, :kk] = s, p
        return scores, positions


def norms(queries: np.ndarray) -> np.ndarray:
    """Each row's Euclidean norm in float64 (its squares summed in double, in dimension order):
    the one norm the exact head's certificate and the builder's tier choice both read."""
    q = np.ascontiguousarray(queries, dtype=np.float32)
    if q.ndim != 2:
        raise ValueError(f"norms needs a 2-d array of rows, got shape {q.shape}")
    return _search.norms(q)


def use_avx2(on: bool) -> bool:
    """Whether scans use AVX2 and the two-pass scan (when the CPU has AVX2, F16C and FMA; the
    default) or SSE and one exact pass, for every FlatScan in the process. Returns the path now
    in use (True: AVX2). Tests compare the two; both give the same answers."""
    return _search.use_avx2(on)
