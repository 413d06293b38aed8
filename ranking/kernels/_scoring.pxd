# The loop of _scoring.pyx another kernel calls directly: the feature kernel scores the rows
# it has just written, in the same call without the GIL.
from ranking.kernels._typedefs cimport float32_t, float64_t, int32_t, int64_t, uint8_t


cdef Py_ssize_t _score_trees_call(
    const float32_t[:, ::1] features,
    const int32_t[::1] roots_first,
    const int32_t[::1] roots_second,
    const int32_t[::1] feature,
    const float64_t[::1] threshold,
    const int32_t[::1] left,
    const int32_t[::1] right,
    const uint8_t[::1] flags,
    const float64_t[::1] leaf_value,
    const uint8_t[::1] mask,
    const float32_t[::1] offsets,
    Py_ssize_t n_second,
    int64_t deadline_ns,
    Py_ssize_t check_every,
    float64_t[::1] first_acc,
    float32_t[::1] first_scores,
    int32_t[::1] first_indices,
    float32_t[::1] out_scores,
    int32_t[::1] out_indices,
    Py_ssize_t* n_kept,
    Py_ssize_t* n_done,
    Py_ssize_t* n_planned,
) noexcept nogil
