"""Private compiled kernels: one request's walks over CSR rows of item ids.

Do not import this module outside ``ranking/``; ``ranking.kernels.rows`` validates
inputs, fixes dtypes and contiguity, lends the scratch arrays (dense over every
item row) and allocates the outputs. Compiler directives come from ``setup.py``.

Each request touches a few hundred candidates and a few thousand CSR entries,
so the NumPy versions of these walks (repeat/cumsum gathers, sort-based
``unique``/``isin``/``searchsorted``) spent their time in call overhead and
sorting. Here every walk is one pass: an item's position (among a request's
candidates, or among the items a walk meets, in order) comes from a dense
``slot`` array (item row -> position, -1 elsewhere) and first visits from a
dense ``mark`` array; both are handed in clean and handed back clean.

Layers (as in sklearn's ``_loss``):

1. ``_first_visit``, ``_row_max``: scalars, ``cdef inline ... noexcept nogil``
   (in ``_common.pxd``).
2. ``_unique_loop`` / ``_sum_rows_loop`` / ``_max_share_loop``: loops over
   typed memoryviews, nogil; a bad id is reported by a negative return value,
   never raised inside nogil.
3. ``unique_in_order`` / ``sum_rows`` / ``max_share``:
   Python-visible entries. They keep the GIL: a walk takes a few microseconds,
   and a thread that lets go of the GIL for that long must then wait for it
   behind whichever thread took it (another request's Python, the gRPC poller),
   which costs more than the walk. The scoring loop, hundreds of microseconds,
   does release it.
4. ``ranking.kernels.rows``: the public wrapper.

Sums match ``np.bincount``: each entry's ``value * weight`` is formed in
float32, then added in float64 in entry order (sources in order, each row in
stored order).
"""
from libc.stdlib cimport calloc, free

from ranking.kernels._common cimport _first_visit, _row_max
from ranking.kernels._typedefs cimport float32_t, float64_t, int32_t, int64_t, uint8_t


# Layer 1 (scalars: ``_first_visit``, ``_row_max``) is in ``_common.pxd``, shared with
# the feature kernel.

# ---------------------------------------------------------------------------
# Layer 2: loops
# ---------------------------------------------------------------------------

cdef Py_ssize_t _unique_loop(
    const int32_t[::1] rows,  # IN (n,) item rows, -1 = none
    uint8_t[::1] mark,  # IN/OUT (n_items,) all zero in, all zero out
    int32_t[::1] out,  # OUT (n,) first occurrences, in order
) noexcept nogil:
    """Number written to ``out``; -1 - i when ``rows[i]`` is not an item row."""
    cdef Py_ssize_t i, n = 0, n_items = mark.shape[0]
    cdef int32_t r
    for i in range(rows.shape[0]):
        r = rows[i]
        if r < 0:
            continue
        if r >= n_items:
            n = -1 - i
            break
        if _first_visit(&mark[0], r):
            out[n] = r
            n += 1
    for i in range(n if n > 0 else 0):
        mark[out[i]] = 0
    if n < 0:  # a bad row stopped the walk: clear what it had marked
        for i in range(-1 - n):
            if 0 <= rows[i] < n_items:
                mark[rows[i]] = 0
    return n


cdef Py_ssize_t _sum_rows_loop(
    const int64_t[::1] indptr,  # IN (n_rows + 1,) CSR row starts
    const int32_t[::1] indices,  # IN (nnz,) item rows
    const float32_t[::1] values,  # IN (nnz,) entry values
    const int32_t[::1] sources,  # IN (s,) rows to walk
    const float32_t[::1] weights,  # IN (s,) weight per source
    int32_t[::1] slot,  # IN/OUT (n_items,) position of an item in out, -1 elsewhere
    bint grow,  # IN give an item met for the first time the next position (else skip it)
    float64_t[::1] out,  # IN/OUT (positions,) sums, zero for new positions
    int32_t[::1] items,  # OUT (positions,) with grow: the item at each new position
    Py_ssize_t n,  # IN positions already in use (grow only)
) noexcept nogil:
    """Positions in use after the walk; -1 - j when entry ``j`` names an item outside
    ``slot`` (the positions this walk gave are then taken back)."""
    cdef Py_ssize_t s, j, i, n_items = slot.shape[0], n_before = n
    cdef int32_t item, p
    cdef float32_t w
    for s in range(sources.shape[0]):
        w = weights[s]
        for j in range(indptr[sources[s]], indptr[sources[s] + 1]):
            item = indices[j]
            if item < 0 or item >= n_items:
                for i in range(n_before, n):
                    slot[items[i]] = -1
                return -1 - j
            p = slot[item]
            if p < 0:
                if not grow:
                    continue
                p = <int32_t>n
                slot[item] = p
                items[n] = item
                n += 1
            out[p] += <float64_t>(values[j] * w)
    return n


cdef Py_ssize_t _max_share_loop(
    const int64_t[::1] indptr,  # IN (n_rows + 1,) CSR row starts (item -> categories)
    const int32_t[::1] indices,  # IN (nnz,) category ids
    const int32_t[::1] rows,  # IN (n,) rows to read
    const float32_t[::1] share,  # IN (n_categories,) dense share per category, 0 = none
    float32_t[::1] out,  # OUT (n,) max share over each row's categories (0 for none)
) noexcept nogil:
    """0, or -1 - i when row ``rows[i]`` names a category outside ``share``."""
    cdef Py_ssize_t i
    cdef int64_t start
    cdef bint bad = False
    for i in range(rows.shape[0]):
        start = indptr[rows[i]]
        out[i] = _row_max(&indices[0] + start if indices.shape[0] else NULL,
                          indptr[rows[i] + 1] - start, &share[0] if share.shape[0] else NULL,
                          share.shape[0], &bad)
        if bad:
            return -1 - i
    return 0


# ---------------------------------------------------------------------------
# Layer 3: Python-visible entries (inputs already validated by ranking.kernels.rows)
# ---------------------------------------------------------------------------

def unique_in_order(const int32_t[::1] rows, uint8_t[::1] mark, int32_t[::1] out):
    cdef Py_ssize_t n
    n = _unique_loop(rows, mark, out)
    return n


def sum_rows(const int64_t[::1] indptr, const int32_t[::1] indices, const float32_t[::1] values,
             const int32_t[::1] sources, const float32_t[::1] weights, int32_t[::1] slot, bint grow,
             float64_t[::1] out, int32_t[::1] items, Py_ssize_t n):
    cdef Py_ssize_t status
    status = _sum_rows_loop(indptr, indices, values, sources, weights, slot, grow, out, items, n)
    return status


def max_share(const int64_t[::1] indptr, const int32_t[::1] indices, const int32_t[::1] rows,
              const float32_t[::1] share, float32_t[::1] out):
    cdef Py_ssize_t status
    status = _max_share_loop(indptr, indices, rows, share, out)
    return status


ctypedef fused _row_int:
    int32_t
    int64_t


def row_bounds(const _row_int[::1] rows):
    """``(min, max)`` of a non-empty array of rows, in one pass (``_int32_rows``' range check)."""
    cdef Py_ssize_t i, n = rows.shape[0]
    cdef int64_t lo, hi, v
    if n == 0:
        raise ValueError("row_bounds needs at least one row")
    lo = hi = rows[0]
    for i in range(1, n):  # with the GIL, as the walks above: too short to be worth letting go
        v = rows[i]
        if v < lo:
            lo = v
        elif v > hi:
            hi = v
    return lo, hi


ctypedef unsigned int uint32_t


cdef inline int _cmp_codes(const uint32_t* a, const uint32_t* b, Py_ssize_t w) noexcept nogil:
    cdef Py_ssize_t j
    for j in range(w):
        if a[j] != b[j]:
            return -1 if a[j] < b[j] else 1
    return 0


def sorted_row(const uint32_t[:, ::1] codes, const int32_t[::1] order, str key):
    """The row of ``key`` (``order`` of its position among ``codes``), -1 when absent.

    ``codes`` is a sorted fixed-width NumPy unicode array of distinct ids viewed as its UCS4
    code points, one id per row, NUL-padded: a binary search comparing code points, which
    is NumPy's order for such arrays. ``IdMap.row`` without NumPy's conversion of the key to
    a scalar of the array's dtype, which cost several microseconds per lookup.
    """
    cdef Py_ssize_t n = codes.shape[0], w = codes.shape[1], lo = 0, hi = n, mid, j = 0
    cdef uint32_t* probe
    cdef Py_UCS4 ch
    cdef Py_ssize_t found = -1
    if n == 0 or w == 0 or len(key) > w or len(key) == 0:
        return -1
    probe = <uint32_t*>calloc(w, sizeof(uint32_t))
    if probe == NULL:
        raise MemoryError("no memory for an id lookup")
    for ch in key:
        probe[j] = <uint32_t>ch
        j += 1
    while lo < hi:  # the first position whose id is >= key
        mid = (lo + hi) // 2
        if _cmp_codes(&codes[mid, 0], probe, w) < 0:
            lo = mid + 1
        else:
            hi = mid
    if lo < n and _cmp_codes(&codes[lo, 0], probe, w) == 0:
        found = order[lo]
    free(probe)
    return found
