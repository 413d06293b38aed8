# Inline scalar helpers shared by the compiled kernels (_rows, _scoring, _features).
#
# Defined here, not in one kernel's .pyx, so each module that cimports them gets the
# same code inlined, with no call across modules.
from ranking.kernels._typedefs cimport float32_t, int32_t, uint8_t


cdef inline float32_t _dot(
    const float32_t* a,  # IN (n,)
    const float32_t* b,  # IN (n,)
    Py_ssize_t n,  # IN length of both
) noexcept nogil:
    # Four accumulators let the compiler vectorise; the float32 sum order differs
    # from NumPy's BLAS only by rounding.
    cdef float32_t a0 = 0.0, a1 = 0.0, a2 = 0.0, a3 = 0.0
    cdef Py_ssize_t j = 0
    while j + 4 <= n:
        a0 += a[j] * b[j]
        a1 += a[j + 1] * b[j + 1]
        a2 += a[j + 2] * b[j + 2]
        a3 += a[j + 3] * b[j + 3]
        j += 4
    while j < n:
        a0 += a[j] * b[j]
        j += 1
    return (a0 + a1) + (a2 + a3)


cdef inline bint _first_visit(
    uint8_t* mark,  # IN/OUT (n_items,) nonzero once an item was visited
    int32_t item,  # IN a valid item row
) noexcept nogil:
    if mark[item]:
        return False
    mark[item] = 1
    return True


cdef inline float32_t _row_max(
    const int32_t* ids,  # IN (length,) one CSR row's ids
    Py_ssize_t length,  # IN entries in the row
    const float32_t* value_of,  # IN dense value per id
    Py_ssize_t n_values,  # IN length of value_of
    bint* bad,  # OUT set when an id is outside value_of
) noexcept nogil:
    # As np.maximum.at from 0: NaN wins and stays.
    cdef float32_t best = 0.0, v
    cdef Py_ssize_t j
    for j in range(length):
        if ids[j] < 0 or ids[j] >= n_values:
            bad[0] = True
            return 0.0
        v = value_of[ids[j]]
        if v != v or v > best:
            best = v
            if v != v:
                return v
    return best
