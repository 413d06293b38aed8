# Inline scalar helpers shared by the compiled kernels (_rows, _scoring, _features, _search).
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


# A bounded heap of the k best (score, row) pairs, the worst at the root; a lower score
# ranks below, and on a tie the higher row. Shared by the scoring loops (_scoring) and the
# exact head's scan (_search).
cdef inline bint _worse(
    float32_t score_a,  # IN
    int32_t index_a,  # IN
    float32_t score_b,  # IN
    int32_t index_b,  # IN
) noexcept nogil:
    # Is a ranked after b? Lower score is worse; on a tie the higher index is.
    return score_a < score_b or (score_a == score_b and index_a > index_b)


cdef inline void _sift_down(
    float32_t* heap_scores,  # IN/OUT (size,) heap keys
    int32_t* heap_indices,  # IN/OUT (size,) heap payload
    Py_ssize_t size,  # IN number of live heap entries
    Py_ssize_t pos,  # IN position whose entry may be out of place
) noexcept nogil:
    cdef float32_t s = heap_scores[pos]
    cdef int32_t idx = heap_indices[pos]
    cdef Py_ssize_t child
    while True:
        child = 2 * pos + 1
        if child >= size:
            break
        if child + 1 < size and _worse(heap_scores[child + 1], heap_indices[child + 1],
                                       heap_scores[child], heap_indices[child]):
            child += 1
        if not _worse(heap_scores[child], heap_indices[child], s, idx):
            break
        heap_scores[pos] = heap_scores[child]
        heap_indices[pos] = heap_indices[child]
        pos = child
    heap_scores[pos] = s
    heap_indices[pos] = idx


cdef inline void _sift_up(
    float32_t* heap_scores,  # IN/OUT (pos + 1,) heap keys
    int32_t* heap_indices,  # IN/OUT (pos + 1,) heap payload
    Py_ssize_t pos,  # IN position of the newly appended entry
) noexcept nogil:
    cdef float32_t s = heap_scores[pos]
    cdef int32_t idx = heap_indices[pos]
    cdef Py_ssize_t parent
    while pos > 0:
        parent = (pos - 1) // 2
        if not _worse(s, idx, heap_scores[parent], heap_indices[parent]):
            break
        heap_scores[pos] = heap_scores[parent]
        heap_indices[pos] = heap_indices[parent]
        pos = parent
    heap_scores[pos] = s
    heap_indices[pos] = idx


cdef inline void _heap_offer_any(
    float32_t* heap_scores,  # IN/OUT (capacity,) heap keys
    int32_t* heap_indices,  # IN/OUT (capacity,) heap payload
    Py_ssize_t* size,  # IN/OUT number of live heap entries
    Py_ssize_t capacity,  # IN k, > 0
    float32_t s,  # IN candidate score, not NaN
    int32_t idx,  # IN candidate row, in any order relative to the rows already offered
) noexcept nogil:
    # As _heap_offer, for rows that do not arrive in index order (the second phase
    # visits them in first-phase order): a tie with the root is decided by the index.
    if size[0] < capacity:
        heap_scores[size[0]] = s
        heap_indices[size[0]] = idx
        _sift_up(heap_scores, heap_indices, size[0])
        size[0] += 1
    elif _worse(heap_scores[0], heap_indices[0], s, idx):
        heap_scores[0] = s
        heap_indices[0] = idx
        _sift_down(heap_scores, heap_indices, capacity, 0)


cdef inline void _heap_sort_best_first(
    float32_t* heap_scores,  # IN/OUT (size,) heap in, best-first order out
    int32_t* heap_indices,  # IN/OUT (size,)
    Py_ssize_t size,  # IN
) noexcept nogil:
    # In-place heapsort of the k kept elements: the root (worst) is moved to
    # the end each round, so the array ends up best first.
    cdef Py_ssize_t end
    cdef float32_t s
    cdef int32_t idx
    end = size - 1
    while end > 0:
        s = heap_scores[0]
        idx = heap_indices[0]
        heap_scores[0] = heap_scores[end]
        heap_indices[0] = heap_indices[end]
        heap_scores[end] = s
        heap_indices[end] = idx
        _sift_down(heap_scores, heap_indices, end, 0)
        end -= 1
