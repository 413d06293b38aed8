"""Private compiled kernels: linear or tree-ensemble scoring fused with masked top-k selection.

Do not import this module outside ``ranking/``; ``ranking.kernels.scoring`` validates
inputs, fixes dtypes and contiguity, and allocates the outputs these entry
points expect. Compiler directives come from ``setup.py``.

Layers (as in sklearn's ``_loss``):

1. ``_dot`` (in ``_common.pxd``) / ``_tree_leaf``: scalars, ``cdef inline ... noexcept nogil``.
2. ``_score_topk_loop`` / ``_score_trees_phased_loop`` (one phase or two) /
   ``_topk_loop`` / ``_tree_contrib_loop``: loops over typed memoryviews, nogil.
3. ``score_topk`` / ``score_trees_call`` / ``topk`` / ``tree_contributions``:
   Python-visible entries taking memoryviews and output buffers, releasing the GIL
   around the loop. ``_score_trees_call`` (one phase or two) is also called by the
   feature kernel (``_features.pyx``) right after it writes the rows.
4. ``ranking.kernels.scoring``: the public wrapper.

Selection rule shared by every kernel: a candidate is excluded when its mask
byte is nonzero (checked before it is scored) or when its score is NaN;
the rest are ranked by score descending, ties by the lower row index first.
The top-k is kept in a fixed-size min-heap whose root is the *worst* kept
element under that order, so only the k kept elements are ever sorted.
Phased scoring applies the rule twice: the first phase's best rows by their
prefix score, then the top-k of those rows by their full score; rows that did
not complete the second phase follow, by first-phase order, only to fill k.
"""
from libc.math cimport fabs
from posix.time cimport clock_gettime, timespec, CLOCK_MONOTONIC

from ranking.kernels._common cimport (
    _dot,
    _heap_offer_any,
    _heap_sort_best_first,
    _sift_down,
    _sift_up,
)
from ranking.kernels._typedefs cimport float32_t, float64_t, int32_t, int64_t, uint8_t

# Tree node flags (see ranking.kernels.reranker): bit 0 = missing values go left;
# bits 1-2 = LightGBM's missing type (0 none, 1 zero, 2 NaN).
cdef enum:
    FLAG_DEFAULT_LEFT = 1
    MISSING_ZERO = 1
    MISSING_NAN = 2

# LightGBM's kZeroThreshold: |x| <= this counts as zero for missing_type "Zero".
cdef float64_t ZERO_THRESHOLD = 1e-35


# ---------------------------------------------------------------------------
# Layer 1: scalars
# ---------------------------------------------------------------------------

cdef inline int32_t _tree_next(
    const float32_t* x,  # IN (f,) one feature row
    int32_t node,  # IN a split node, >= 0
    const int32_t* feature,  # IN (n_nodes,) split feature per node
    const float64_t* threshold,  # IN (n_nodes,) go left when x <= threshold
    const int32_t* left,  # IN (n_nodes,) child: >= 0 node, < 0 ~leaf
    const int32_t* right,  # IN (n_nodes,)
    const uint8_t* flags,  # IN (n_nodes,) default-left bit and missing type
) noexcept nogil:
    # LightGBM's Tree::NumericalDecision, step for step, in double precision
    # (LightGBM's predict widens float32 inputs to double before comparing).
    cdef float64_t v = <float64_t>x[feature[node]]
    cdef uint8_t missing = flags[node] >> 1
    if missing != MISSING_NAN and v != v:
        v = 0.0
    if (missing == MISSING_ZERO and fabs(v) <= ZERO_THRESHOLD) or (missing == MISSING_NAN and v != v):
        return left[node] if flags[node] & FLAG_DEFAULT_LEFT else right[node]
    return left[node] if v <= threshold[node] else right[node]


cdef inline float64_t _tree_leaf(
    const float32_t* x,  # IN (f,) one feature row
    int32_t node,  # IN the tree's root: >= 0 node, < 0 ~leaf
    const int32_t* feature,  # IN (n_nodes,)
    const float64_t* threshold,  # IN (n_nodes,)
    const int32_t* left,  # IN (n_nodes,)
    const int32_t* right,  # IN (n_nodes,)
    const uint8_t* flags,  # IN (n_nodes,)
    const float64_t* leaf_value,  # IN (n_leaves,)
) noexcept nogil:
    # Children always have larger node numbers than their parent (checked when
    # the trees are loaded), so this walk ends.
    while node >= 0:
        node = _tree_next(x, node, feature, threshold, left, right, flags)
    return leaf_value[~node]


cdef inline int64_t _monotonic_ns() noexcept nogil:
    # Same clock as Python's time.monotonic_ns() on Linux.
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <int64_t>ts.tv_sec * 1000000000 + <int64_t>ts.tv_nsec


cdef inline bint _out_of_time(
    Py_ssize_t i,  # IN the row about to be scored
    Py_ssize_t* next_check,  # IN/OUT the next row at which the clock is read
    Py_ssize_t check_every,  # IN rows between clock reads
    int64_t deadline_ns,  # IN CLOCK_MONOTONIC ns, 0 = none
) noexcept nogil:
    """True when row ``i`` is a checkpoint and the deadline has passed; the clock is
    read only at checkpoints, so the first ``check_every`` rows are always scored."""
    if deadline_ns <= 0 or i != next_check[0]:
        return False
    next_check[0] += check_every
    return _monotonic_ns() >= deadline_ns


cdef inline void _heap_offer(
    float32_t* heap_scores,  # IN/OUT (capacity,) heap keys
    int32_t* heap_indices,  # IN/OUT (capacity,) heap payload
    Py_ssize_t* size,  # IN/OUT number of live heap entries
    Py_ssize_t capacity,  # IN k, > 0
    float32_t s,  # IN candidate score, not NaN
    int32_t idx,  # IN candidate row, larger than every row already offered
) noexcept nogil:
    if size[0] < capacity:
        heap_scores[size[0]] = s
        heap_indices[size[0]] = idx
        _sift_up(heap_scores, heap_indices, size[0])
        size[0] += 1
    elif s > heap_scores[0]:
        # Rows arrive in increasing order, so a tie with the root loses to it:
        # a strict comparison is the whole tie rule on this path.
        heap_scores[0] = s
        heap_indices[0] = idx
        _sift_down(heap_scores, heap_indices, capacity, 0)


cdef inline float64_t _trees_sum(
    const float32_t* x,  # IN (f,) one feature row
    const int32_t* roots,  # IN (n_trees,) the trees to walk
    Py_ssize_t n_trees,  # IN
    const int32_t* feature,  # IN (n_nodes,)
    const float64_t* threshold,  # IN (n_nodes,)
    const int32_t* left,  # IN (n_nodes,)
    const int32_t* right,  # IN (n_nodes,)
    const uint8_t* flags,  # IN (n_nodes,)
    const float64_t* leaf_value,  # IN (n_leaves,)
) noexcept nogil:
    # Sum in double as LightGBM does; the caller rounds once at the end.
    cdef float64_t acc = 0.0
    cdef Py_ssize_t t
    for t in range(n_trees):
        acc += _tree_leaf(x, roots[t], feature, threshold, left, right, flags, leaf_value)
    return acc


# ---------------------------------------------------------------------------
# Layer 2: loops over typed memoryviews
# ---------------------------------------------------------------------------

cdef Py_ssize_t _score_topk_loop(
    const float32_t[:, ::1] features,  # IN (n, f) one row per candidate
    const float32_t[::1] weights,  # IN (f,)
    const uint8_t[::1] mask,  # IN (n,) nonzero = excluded
    const float32_t[::1] offsets,  # IN (n,) added to each row's score (rules, real-time signals)
    float32_t bias,  # IN added to every score
    int64_t deadline_ns,  # IN CLOCK_MONOTONIC ns, 0 = none
    Py_ssize_t check_every,  # IN rows between clock reads, >= 1
    float32_t[::1] out_scores,  # OUT (k,) used as the heap, best first on return
    int32_t[::1] out_indices,  # OUT (k,) rows matching out_scores
    Py_ssize_t* n_kept,  # OUT number of valid entries written to out_*
) noexcept nogil:
    """Score rows in order, keep the top-k; return how many rows were consumed."""
    cdef Py_ssize_t n = features.shape[0]
    cdef Py_ssize_t f = features.shape[1]
    cdef Py_ssize_t k = out_scores.shape[0]
    cdef Py_ssize_t i
    cdef Py_ssize_t size = 0
    cdef Py_ssize_t next_check = check_every
    cdef Py_ssize_t n_scored = n
    cdef float32_t s
    cdef const float32_t* rows = NULL
    cdef const float32_t* w = NULL
    cdef float32_t* heap_scores = NULL
    cdef int32_t* heap_indices = NULL

    n_kept[0] = 0
    if k == 0 or n == 0:
        return n
    # Raw pointers are taken only when the arrays are non-empty so that a
    # bounds-checked debug build never indexes past a zero-length axis.
    if f > 0:
        rows = &features[0, 0]
        w = &weights[0]
    heap_scores = &out_scores[0]
    heap_indices = &out_indices[0]

    for i in range(n):
        # The first check_every rows are always scored, so even a request
        # whose budget is already spent gets a (short) answer.
        if _out_of_time(i, &next_check, check_every, deadline_ns):
            n_scored = i
            break
        if mask[i]:
            continue
        s = bias + _dot(rows + i * f, w, f) + offsets[i]
        if s != s:  # NaN is excluded, never ranked
            continue
        _heap_offer(heap_scores, heap_indices, &size, k, s, <int32_t>i)

    _heap_sort_best_first(heap_scores, heap_indices, size)
    n_kept[0] = size
    return n_scored


cdef Py_ssize_t _score_trees_phased_loop(
    const float32_t[:, ::1] features,  # IN (n, f) one row per candidate
    const int32_t[::1] roots_first,  # IN (t1,) the first phase's trees
    const int32_t[::1] roots_second,  # IN (t2,) the trees the second phase adds
    const int32_t[::1] feature,  # IN (n_nodes,) split feature per node, < f
    const float64_t[::1] threshold,  # IN (n_nodes,)
    const int32_t[::1] left,  # IN (n_nodes,)
    const int32_t[::1] right,  # IN (n_nodes,)
    const uint8_t[::1] flags,  # IN (n_nodes,)
    const float64_t[::1] leaf_value,  # IN (n_leaves,)
    const uint8_t[::1] mask,  # IN (n,) nonzero = excluded
    const float32_t[::1] offsets,  # IN (n,) added to each row's score after the model
    Py_ssize_t n_second,  # IN rows the second phase completes at most; 0: one phase
    int64_t deadline_ns,  # IN CLOCK_MONOTONIC ns, 0 = none
    Py_ssize_t check_every,  # IN rows between clock reads, >= 1
    float64_t[::1] first_acc,  # SCRATCH (n,) each row's first-phase leaf sum
    float32_t[::1] first_scores,  # SCRATCH (m,) first-phase heap, m = min(n, max(n_second, k))
    int32_t[::1] first_indices,  # SCRATCH (m,)
    float32_t[::1] out_scores,  # OUT (k,) used as the heap, best first on return
    int32_t[::1] out_indices,  # OUT (k,) rows matching out_scores
    Py_ssize_t* n_kept,  # OUT number of valid entries written to out_*
    Py_ssize_t* n_done,  # OUT rows the second phase completed
    Py_ssize_t* n_planned,  # OUT rows the second phase was to complete: min(n_second, first-phase survivors)
) noexcept nogil:
    """Two-phase scoring; return the rows the first phase consumed.

    Phase 1 walks ``roots_first`` for every row in order (reading the clock every
    ``check_every`` rows; the first rows always complete) and keeps the best ``m`` by
    first-phase score. One phase is every tree in ``roots_first``, none in
    ``roots_second`` and ``n_second`` 0: phase 1's best ``m = k`` are then the answer. Phase 2
    visits the best ``n_second`` of them best first, adds the ``roots_second`` trees
    to each one's first-phase sum (the full model's leaf sum, in another order) and
    keeps the top-k of those full scores; it reads the clock too and stops at the
    deadline. When fewer than k rows got a full score, the next rows by first-phase
    order follow them, with their first-phase scores.
    """
    cdef Py_ssize_t n = features.shape[0]
    cdef Py_ssize_t f = features.shape[1]
    cdef Py_ssize_t k = out_scores.shape[0]
    cdef Py_ssize_t m = first_scores.shape[0]
    cdef Py_ssize_t t1 = roots_first.shape[0]
    cdef Py_ssize_t t2 = roots_second.shape[0]
    cdef Py_ssize_t i, j
    cdef Py_ssize_t size1 = 0
    cdef Py_ssize_t size = 0
    cdef Py_ssize_t planned, done
    cdef Py_ssize_t next_check = check_every
    cdef Py_ssize_t n_scored = n
    cdef float64_t acc
    cdef float32_t s
    cdef int32_t row
    cdef const float32_t* rows = NULL
    cdef const int32_t* p_first = NULL
    cdef const int32_t* p_second = NULL
    cdef const int32_t* p_feature = NULL
    cdef const float64_t* p_threshold = NULL
    cdef const int32_t* p_left = NULL
    cdef const int32_t* p_right = NULL
    cdef const uint8_t* p_flags = NULL
    cdef const float64_t* p_leaf = NULL
    cdef float32_t* heap1_scores = NULL
    cdef int32_t* heap1_indices = NULL
    cdef float32_t* heap_scores = NULL
    cdef int32_t* heap_indices = NULL

    n_kept[0] = 0
    n_done[0] = 0
    n_planned[0] = 0
    if k == 0 or n == 0 or m == 0:
        return n
    if f > 0:
        rows = &features[0, 0]
    if t1 > 0:
        p_first = &roots_first[0]
    if t2 > 0:
        p_second = &roots_second[0]
    if feature.shape[0] > 0:
        p_feature = &feature[0]
        p_threshold = &threshold[0]
        p_left = &left[0]
        p_right = &right[0]
        p_flags = &flags[0]
    if leaf_value.shape[0] > 0:
        p_leaf = &leaf_value[0]
    heap1_scores = &first_scores[0]
    heap1_indices = &first_indices[0]
    heap_scores = &out_scores[0]
    heap_indices = &out_indices[0]

    # Phase 1: the ensemble's prefix over every row.
    for i in range(n):
        if _out_of_time(i, &next_check, check_every, deadline_ns):
            n_scored = i
            break
        if mask[i]:
            continue
        acc = _trees_sum(rows + i * f, p_first, t1, p_feature, p_threshold, p_left, p_right, p_flags, p_leaf)
        s = <float32_t>acc + offsets[i]
        if s != s:
            continue
        first_acc[i] = acc
        _heap_offer(heap1_scores, heap1_indices, &size1, m, s, <int32_t>i)
    _heap_sort_best_first(heap1_scores, heap1_indices, size1)

    # Phase 2: the rest of the trees over the best rows, best first, so a deadline
    # leaves the most promising rows complete. The clock is read before every
    # check_every-th row; the first rows always complete.
    planned = n_second if n_second < size1 else size1
    done = planned
    next_check = check_every
    for j in range(planned):
        if _out_of_time(j, &next_check, check_every, deadline_ns):
            done = j
            break
        row = heap1_indices[j]
        acc = first_acc[row] + _trees_sum(rows + row * f, p_second, t2, p_feature, p_threshold, p_left,
                                          p_right, p_flags, p_leaf)
        s = <float32_t>acc + offsets[row]
        if s != s:
            continue
        _heap_offer_any(heap_scores, heap_indices, &size, k, s, row)
    _heap_sort_best_first(heap_scores, heap_indices, size)

    # Fewer than k rows complete: the others follow in first-phase order.
    j = done
    while size < k and j < size1:
        heap_scores[size] = heap1_scores[j]
        heap_indices[size] = heap1_indices[j]
        size += 1
        j += 1
    n_kept[0] = size
    n_done[0] = done
    n_planned[0] = planned
    return n_scored


cdef void _tree_contrib_loop(
    const float32_t[:, ::1] features,  # IN (m, f) rows to explain
    const int32_t[::1] roots,  # IN (n_trees,)
    const int32_t[::1] feature,  # IN (n_nodes,)
    const float64_t[::1] threshold,  # IN (n_nodes,)
    const int32_t[::1] left,  # IN (n_nodes,)
    const int32_t[::1] right,  # IN (n_nodes,)
    const uint8_t[::1] flags,  # IN (n_nodes,)
    const float64_t[::1] node_value,  # IN (n_nodes,) expected output at each split node
    const float64_t[::1] leaf_value,  # IN (n_leaves,)
    float64_t[:, ::1] out_contrib,  # OUT (m, f) zero-initialised by the caller
    float64_t[::1] out_bias,  # OUT (m,) zero-initialised by the caller
) noexcept nogil:
    """Saabas path attribution: each split moves the expected output from the
    parent's value to the child's; that move is credited to the split feature.
    Per row, ``sum(out_contrib) + out_bias`` telescopes to the sum of leaves."""
    cdef Py_ssize_t m = features.shape[0]
    cdef Py_ssize_t f = features.shape[1]
    cdef Py_ssize_t n_trees = roots.shape[0]
    cdef Py_ssize_t i, t
    cdef int32_t node, child
    cdef float64_t here, there
    cdef const float32_t* x
    for i in range(m):
        x = &features[i, 0] if f > 0 else NULL
        for t in range(n_trees):
            node = roots[t]
            if node < 0:
                out_bias[i] += leaf_value[~node]
                continue
            here = node_value[node]
            out_bias[i] += here
            while node >= 0:
                child = _tree_next(x, node, &feature[0], &threshold[0], &left[0], &right[0], &flags[0])
                there = node_value[child] if child >= 0 else leaf_value[~child]
                out_contrib[i, feature[node]] += there - here
                here = there
                node = child


cdef Py_ssize_t _topk_loop(
    const float32_t[::1] scores,  # IN (n,) precomputed scores
    const uint8_t[::1] mask,  # IN (n,) nonzero = excluded
    float32_t[::1] out_scores,  # OUT (k,) used as the heap, best first on return
    int32_t[::1] out_indices,  # OUT (k,) rows matching out_scores
) noexcept nogil:
    """Keep the top-k of precomputed scores; return how many were kept."""
    cdef Py_ssize_t n = scores.shape[0]
    cdef Py_ssize_t k = out_scores.shape[0]
    cdef Py_ssize_t i
    cdef Py_ssize_t size = 0
    cdef float32_t s
    cdef float32_t* heap_scores = NULL
    cdef int32_t* heap_indices = NULL

    if k == 0 or n == 0:
        return 0
    heap_scores = &out_scores[0]
    heap_indices = &out_indices[0]
    for i in range(n):
        if mask[i]:
            continue
        s = scores[i]
        if s != s:
            continue
        _heap_offer(heap_scores, heap_indices, &size, k, s, <int32_t>i)
    _heap_sort_best_first(heap_scores, heap_indices, size)
    return size


# ---------------------------------------------------------------------------
# Layer 3: Python-visible entries (inputs already validated by ranking.kernels.scoring)
# ---------------------------------------------------------------------------

def score_topk(
    const float32_t[:, ::1] features not None,  # IN (n, f)
    const float32_t[::1] weights not None,  # IN (f,)
    const uint8_t[::1] mask not None,  # IN (n,)
    const float32_t[::1] offsets not None,  # IN (n,)
    float32_t bias,  # IN
    int64_t deadline_ns,  # IN
    Py_ssize_t check_every,  # IN >= 1
    float32_t[::1] out_scores not None,  # OUT (k,), k <= n
    int32_t[::1] out_indices not None,  # OUT (k,)
):
    """Fill ``out_*`` with the top-k rows; return ``(n_kept, n_scored)``.

    The GIL is released for the whole scoring and selection loop. Callers
    must pass shapes that agree (``ranking.kernels.scoring.score_topk`` does).
    """
    cdef Py_ssize_t n_kept = 0
    cdef Py_ssize_t n_scored
    with nogil:
        n_scored = _score_topk_loop(features, weights, mask, offsets, bias, deadline_ns,
                                    check_every, out_scores, out_indices, &n_kept)
    return n_kept, n_scored


def topk(
    const float32_t[::1] scores not None,  # IN (n,)
    const uint8_t[::1] mask not None,  # IN (n,)
    float32_t[::1] out_scores not None,  # OUT (k,), k <= n
    int32_t[::1] out_indices not None,  # OUT (k,)
):
    """Fill ``out_*`` with the top-k of ``scores``; return ``n_kept``.

    The GIL is released for the selection loop.
    """
    cdef Py_ssize_t n_kept
    with nogil:
        n_kept = _topk_loop(scores, mask, out_scores, out_indices)
    return n_kept


def tree_contributions(
    const float32_t[:, ::1] features not None,  # IN (m, f)
    const int32_t[::1] roots not None,  # IN (n_trees,)
    const int32_t[::1] feature not None,  # IN (n_nodes,)
    const float64_t[::1] threshold not None,  # IN (n_nodes,)
    const int32_t[::1] left not None,  # IN (n_nodes,)
    const int32_t[::1] right not None,  # IN (n_nodes,)
    const uint8_t[::1] flags not None,  # IN (n_nodes,)
    const float64_t[::1] node_value not None,  # IN (n_nodes,)
    const float64_t[::1] leaf_value not None,  # IN (n_leaves,)
    float64_t[:, ::1] out_contrib not None,  # OUT (m, f), zeros
    float64_t[::1] out_bias not None,  # OUT (m,), zeros
):
    """Accumulate per-feature Saabas contributions and the bias term of each row."""
    with nogil:
        _tree_contrib_loop(features, roots, feature, threshold, left, right, flags, node_value,
                           leaf_value, out_contrib, out_bias)


cdef Py_ssize_t _score_trees_call(
    const float32_t[:, ::1] features,  # IN (n, f)
    const int32_t[::1] roots_first,  # IN every tree (one phase) or the first phase's
    const int32_t[::1] roots_second,  # IN the trees the second phase adds (empty: one phase)
    const int32_t[::1] feature,  # IN (n_nodes,)
    const float64_t[::1] threshold,  # IN (n_nodes,)
    const int32_t[::1] left,  # IN (n_nodes,)
    const int32_t[::1] right,  # IN (n_nodes,)
    const uint8_t[::1] flags,  # IN (n_nodes,)
    const float64_t[::1] leaf_value,  # IN (n_leaves,)
    const uint8_t[::1] mask,  # IN (n,)
    const float32_t[::1] offsets,  # IN (n,)
    Py_ssize_t n_second,  # IN 0: one phase; else 1 <= n_second < n
    int64_t deadline_ns,  # IN
    Py_ssize_t check_every,  # IN >= 1
    float64_t[::1] first_acc,  # SCRATCH (n,) when phased
    float32_t[::1] first_scores,  # SCRATCH (m,) when phased
    int32_t[::1] first_indices,  # SCRATCH (m,) when phased
    float32_t[::1] out_scores,  # OUT (k,), k <= n
    int32_t[::1] out_indices,  # OUT (k,)
    Py_ssize_t* n_kept,  # OUT
    Py_ssize_t* n_done,  # OUT rows the second phase completed (0: one phase)
    Py_ssize_t* n_planned,  # OUT rows it was to complete
) noexcept nogil:
    """One tree-scoring call, one phase or two; return the rows the (first) phase consumed."""
    n_kept[0] = n_done[0] = n_planned[0] = 0
    if out_scores.shape[0] == 0 or features.shape[0] == 0:
        return features.shape[0]
    return _score_trees_phased_loop(features, roots_first, roots_second, feature, threshold, left, right, flags,
                                    leaf_value, mask, offsets, n_second, deadline_ns, check_every, first_acc,
                                    first_scores, first_indices, out_scores, out_indices, n_kept, n_done, n_planned)


def score_trees_call(
    const float32_t[:, ::1] features not None,  # IN (n, f)
    const int32_t[::1] roots_first not None,
    const int32_t[::1] roots_second not None,
    const int32_t[::1] feature not None,
    const float64_t[::1] threshold not None,
    const int32_t[::1] left not None,
    const int32_t[::1] right not None,
    const uint8_t[::1] flags not None,
    const float64_t[::1] leaf_value not None,
    const uint8_t[::1] mask not None,
    const float32_t[::1] offsets not None,
    Py_ssize_t n_second,
    int64_t deadline_ns,
    Py_ssize_t check_every,
    float64_t[::1] first_acc not None,
    float32_t[::1] first_scores not None,
    int32_t[::1] first_indices not None,
    float32_t[::1] out_scores not None,
    int32_t[::1] out_indices not None,
):
    """Top-k under a tree ensemble, in one phase or two (``_score_trees_call``); return
    ``(n_kept, n_scored, n_second_done, n_second_planned)``.

    The GIL is released for the whole call. The arguments come from
    ``ranking.kernels.scoring.TreeCall``, which checked them.
    """
    cdef Py_ssize_t n_kept = 0, n_done = 0, n_planned = 0, n_scored
    with nogil:
        n_scored = _score_trees_call(features, roots_first, roots_second, feature, threshold, left, right, flags,
                                     leaf_value, mask, offsets, n_second, deadline_ns, check_every, first_acc,
                                     first_scores, first_indices, out_scores, out_indices, &n_kept, &n_done,
                                     &n_planned)
    return n_kept, n_scored, n_done, n_planned
