# The loops of _rows.pyx other kernels call directly (the feature kernel's neighbour sums).
from ranking.kernels._typedefs cimport float32_t, float64_t, int32_t, int64_t, uint8_t


cdef Py_ssize_t _sum_rows_loop(
    const int64_t[::1] indptr,
    const int32_t[::1] indices,
    const float32_t[::1] values,
    const int32_t[::1] sources,
    const float32_t[::1] weights,
    int32_t[::1] slot,
    bint grow,
    float64_t[::1] out,
    int32_t[::1] items,
    Py_ssize_t n,
) noexcept nogil
