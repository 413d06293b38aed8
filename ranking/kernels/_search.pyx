"""Private compiled kernel: an exact inner-product scan that keeps the top k.

Do not import this module outside ``ranking/``; ``ranking.kernels.search`` validates
inputs, fixes dtypes and contiguity and allocates the outputs. Compiler directives
come from ``setup.py``.

The exact head (``ranking.retrieval.search.ExactHead``) scans a few thousand item
rows for every request. A general-purpose flat index spends most of that scan on
each item's bookkeeping (a call per dot product, a heap test per item), and reads
every row in float32. Here a first pass scores every row from a half-precision copy
(half the bytes, eight rows per register), then a second scores exactly only the
rows that may belong to the top k given how far the first pass can be off; the whole
scan runs without the GIL.

Layers:

1. ``o2o_dots`` (exact) and ``o2o_scores_half`` (the first pass), in C++ (below).
   ``o2o_dots`` uses AVX2 when the CPU has it, else SSE (which every x86-64 has);
   four rows go at a time, so one row's additions never wait on each other. Both
   paths do the same float32 additions in the same order, with no fused
   multiply-add, so an exact score is the same bit for bit on every CPU: eight
   partial sums over the dimensions taken eight at a time, added pairwise, then the
   dimensions left over. ``o2o_scores_half`` needs AVX2, F16C and FMA; without
   them the scan is the one exact pass.
2. ``_exact_loop`` / ``_two_pass_loop``: one query over every row, nogil; the
   scoring kernels' heap (``_common.pxd``) keeps the k best by score, ties by the
   lower position.
3. ``top_inner`` / ``top_inner_two_pass``: the Python-visible entries, one query
   after another; ``norms``, the queries' norms the exact head's certificate reads.
4. ``ranking.kernels.search``: the public wrapper.
"""
from libc.math cimport fabs, sqrt
from libc.stdlib cimport free, malloc

import numpy as np

from ranking.kernels._common cimport _heap_offer_any, _heap_sort_best_first
from ranking.kernels._typedefs cimport float32_t, float64_t, int32_t, int64_t

cdef extern from *:
    """
    #include <stddef.h>
    #include <immintrin.h>
    /* Eight partial sums of one row, added pairwise, then the dimensions past the last
       multiple of eight: the one order every path below adds a row's products in. */
    static inline float o2o_fold(const float *acc, const float *x, const float *q, Py_ssize_t full, Py_ssize_t d) {
        float rest = 0.f;
        for (Py_ssize_t j = full; j < d; j++) {
            float p = x[j] * q[j];
            rest = rest + p;
        }
        return (((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]))) + rest;
    }
    /* The dot products of up to four rows x[0..rows-1] (d floats each) with q, into out:
       four rows at a time, so that one row's additions do not wait on each other's latency.
       Lane l of a row's partial sums adds x[j + l] * q[j + l] for j = 0, 8, 16, ...: in
       one 8-wide register with AVX2, in two 4-wide halves without, the same float32
       operations in the same order (no fused multiply-add) either way. */
    __attribute__((target("avx2")))
    static void o2o_dot4_avx2(const float *const *x, int rows, Py_ssize_t d, const float *q, float *out) {
        Py_ssize_t full = d - d % 8;
        float acc[4][8];
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (Py_ssize_t j = 0; j < full; j += 8) {
            __m256 qv = _mm256_loadu_ps(q + j);
            a0 = _mm256_add_ps(a0, _mm256_mul_ps(_mm256_loadu_ps(x[0] + j), qv));
            a1 = _mm256_add_ps(a1, _mm256_mul_ps(_mm256_loadu_ps(x[1] + j), qv));
            a2 = _mm256_add_ps(a2, _mm256_mul_ps(_mm256_loadu_ps(x[2] + j), qv));
            a3 = _mm256_add_ps(a3, _mm256_mul_ps(_mm256_loadu_ps(x[3] + j), qv));
        }
        _mm256_storeu_ps(acc[0], a0); _mm256_storeu_ps(acc[1], a1);
        _mm256_storeu_ps(acc[2], a2); _mm256_storeu_ps(acc[3], a3);
        for (int i = 0; i < rows; i++) out[i] = o2o_fold(acc[i], x[i], q, full, d);
    }
    static void o2o_dot4_sse(const float *const *x, int rows, Py_ssize_t d, const float *q, float *out) {
        Py_ssize_t full = d - d % 8;
        float acc[4][8];
        __m128 lo[4], hi[4];
        for (int i = 0; i < 4; i++) lo[i] = hi[i] = _mm_setzero_ps();
        for (Py_ssize_t j = 0; j < full; j += 8) {
            __m128 ql = _mm_loadu_ps(q + j), qh = _mm_loadu_ps(q + j + 4);
            for (int i = 0; i < 4; i++) {
                lo[i] = _mm_add_ps(lo[i], _mm_mul_ps(_mm_loadu_ps(x[i] + j), ql));
                hi[i] = _mm_add_ps(hi[i], _mm_mul_ps(_mm_loadu_ps(x[i] + j + 4), qh));
            }
        }
        for (int i = 0; i < 4; i++) {
            _mm_storeu_ps(acc[i], lo[i]);
            _mm_storeu_ps(acc[i] + 4, hi[i]);
        }
        for (int i = 0; i < rows; i++) out[i] = o2o_fold(acc[i], x[i], q, full, d);
    }
    /* Approximate scores from half-precision rows (IEEE binary16, the bits as uint16),
       widened exactly to float32. The rows are stored in blocks of eight, dimension by
       dimension (H[b][j][r] is row 8b + r's dimension j), so that one register holds eight
       rows' products and no score needs a horizontal sum; two blocks at a time, each with
       two partial sums (even and odd dimensions), keep four additions in flight. */
    __attribute__((target("avx2,f16c,fma")))
    static void o2o_scores_half(const unsigned short *H, Py_ssize_t nb, Py_ssize_t d, const float *q, float *out) {
        Py_ssize_t b = 0, j, stride = d * 8;
        for (; b < nb; b += 2) {
            int two = b + 1 < nb;
            const unsigned short *h0 = H + b * stride, *h1 = two ? h0 + stride : h0;
            __m256 a0 = _mm256_setzero_ps(), a1 = a0, c0 = a0, c1 = a0;
            for (j = 0; j + 2 <= d; j += 2) {
                __m256 q0 = _mm256_broadcast_ss(q + j), q1 = _mm256_broadcast_ss(q + j + 1);
                a0 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(h0 + j * 8))), q0, a0);
                a1 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(h0 + j * 8 + 8))), q1, a1);
                c0 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(h1 + j * 8))), q0, c0);
                c1 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(h1 + j * 8 + 8))), q1, c1);
            }
            if (j < d) {
                __m256 q0 = _mm256_broadcast_ss(q + j);
                a0 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(h0 + j * 8))), q0, a0);
                c0 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(h1 + j * 8))), q0, c0);
            }
            _mm256_storeu_ps(out + b * 8, _mm256_add_ps(a0, a1));
            if (two) _mm256_storeu_ps(out + b * 8 + 8, _mm256_add_ps(c0, c1));
        }
    }
    /* 1: AVX2 (with F16C for the two-pass scan) when the CPU has it, the default; 0: SSE
       and the one exact pass (tests compare the two). */
    static int o2o_use_avx2 = -1;
    static int o2o_set_avx2(int on) {
        o2o_use_avx2 = on && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c")
                       && __builtin_cpu_supports("fma");
        return o2o_use_avx2;
    }
    static int o2o_avx2(void) {
        if (o2o_use_avx2 < 0) o2o_set_avx2(1);
        return o2o_use_avx2;
    }
    /* Exact scores of m rows of X given by their positions (rows == NULL: positions
       0..m-1), into out. */
    static void o2o_dots(const float *X, const long long *rows, Py_ssize_t m, Py_ssize_t d,
                         const float *q, float *out) {
        int avx2 = o2o_avx2();
        for (Py_ssize_t r = 0; r < m; r += 4) {
            int n = m - r < 4 ? (int)(m - r) : 4;
            const float *x[4];
            for (int i = 0; i < 4; i++) {
                Py_ssize_t at = r + (i < n ? i : 0);
                x[i] = X + (rows ? rows[at] : at) * d;
            }
            if (avx2) o2o_dot4_avx2(x, n, d, q, out + r); else o2o_dot4_sse(x, n, d, q, out + r);
        }
    }
    """
    void o2o_dots(
        const float *X, const long long *rows, Py_ssize_t m, Py_ssize_t d, const float *q, float *out
    ) noexcept nogil
    void o2o_scores_half(
        const unsigned short *H, Py_ssize_t nb, Py_ssize_t d, const float *q, float *out
    ) noexcept nogil
    int o2o_avx2() noexcept nogil
    int o2o_set_avx2(int on) noexcept nogil


# Items whose scores are computed before the block goes through the heap.
cdef enum:
    BLOCK = 64


cdef void _sift_down_scores(float32_t *hs, Py_ssize_t k, Py_ssize_t i) noexcept nogil:
    """Restore the min-heap of bare scores (the lowest at 0) below ``i``."""
    cdef Py_ssize_t child
    cdef float32_t s = hs[i]
    while True:
        child = 2 * i + 1
        if child >= k:
            break
        if child + 1 < k and hs[child + 1] < hs[child]:
            child += 1
        if hs[child] >= s:
            break
        hs[i] = hs[child]
        i = child
    hs[i] = s


cdef float32_t _kth_best(const float32_t *scores, Py_ssize_t n, Py_ssize_t k, float32_t *heap) noexcept nogil:
    """The k-th best of ``n >= k`` scores (a min-heap of the k best so far in ``heap``)."""
    cdef Py_ssize_t i
    for i in range(k):
        heap[i] = scores[i]
    for i in range(k // 2 - 1, -1, -1):
        _sift_down_scores(heap, k, i)
    for i in range(k, n):
        if scores[i] > heap[0]:  # most rows are not, once the first k are in
            heap[0] = scores[i]
            _sift_down_scores(heap, k, 0)
    return heap[0]


cdef void _exact_loop(
    const float32_t *items, Py_ssize_t n, Py_ssize_t d, const float32_t *q, Py_ssize_t k,
    float32_t *hs, int32_t *hp,
) noexcept nogil:
    """The k best (score, position) of ``items`` (n x d) for one query, best first (k <= n)."""
    cdef Py_ssize_t i, b = 0, m, filled = 0
    cdef float32_t block[BLOCK]
    while b < n:
        m = min(<Py_ssize_t>BLOCK, n - b)
        o2o_dots(items + b * d, NULL, m, d, q, block)
        for i in range(m):
            _heap_offer_any(hs, hp, &filled, k, block[i], <int32_t>(b + i))
        b += m
    _heap_sort_best_first(hs, hp, k)


cdef Py_ssize_t _two_pass_loop(
    const float32_t *items, const unsigned short *half, const float64_t *err, float64_t norm_bound,
    Py_ssize_t n, Py_ssize_t d, const float32_t *q, Py_ssize_t k,
    float32_t *hs, int32_t *hp, float32_t *approx, int64_t *cand, float32_t *exact,
) noexcept nogil:
    """The same answer as ``_exact_loop`` from the half-precision rows, re-checked exactly.

    Pass one scores every row from ``half`` (half the bytes of ``items``). No row's
    approximate score is further than ``gap`` from its exact one (the rounding to half
    precision, ``err`` per dimension, plus both sums' float32 rounding, bounded by
    ``norm_bound``, the largest row norm, over-estimated). With t the k-th best approximate
    score, the k rows holding the best are exactly >= t - gap, so the exact k-th best is
    too, and any row of the exact top k is approximately >= t - 2 gap. Pass two scores
    those rows exactly (from ``items``) and keeps their k best: the exact top k, the tie
    order included. Returns how many rows pass two scored.
    """
    cdef Py_ssize_t i, filled = 0, n_cand = 0
    cdef float64_t gap = 0.0, qnorm = 0.0
    cdef float64_t floor
    for i in range(d):
        gap += fabs(q[i]) * err[i]
        qnorm += <float64_t>q[i] * q[i]
    # Each float32 sum of d products is within (d + 4) 2^-24 of the sum of their magnitudes,
    # at most |q| |x| (Cauchy-Schwarz); twice, for the exact and the approximate score.
    gap = (gap + 2.0 * (d + 4) * 5.9604644775390625e-08 * sqrt(qnorm) * norm_bound) * 1.0001 + 1e-30
    o2o_scores_half(half, (n + 7) // 8, d, q, approx)
    floor = <float64_t>_kth_best(approx, n, k, hs) - 2.0 * gap
    for i in range(n):
        if <float64_t>approx[i] >= floor:
            cand[n_cand] = i
            n_cand += 1
    o2o_dots(items, cand, n_cand, d, q, exact)
    filled = 0
    for i in range(n_cand):
        _heap_offer_any(hs, hp, &filled, k, exact[i], <int32_t>cand[i])
    _heap_sort_best_first(hs, hp, k)
    return n_cand


def top_inner(
    const float32_t[:, ::1] items,
    const float32_t[:, ::1] queries,
    float32_t[:, ::1] scores,
    int32_t[:, ::1] positions,
):
    """Each query's k best items by inner product (k = scores' columns, 1..n items), best
    first, ties by the lower position, into ``scores``/``positions`` (n < 2^31); one exact pass, without
    the GIL."""
    cdef Py_ssize_t r, k = scores.shape[1], n = items.shape[0], d = items.shape[1]
    with nogil:
        for r in range(queries.shape[0]):
            _exact_loop(&items[0, 0], n, d, &queries[r, 0], k, &scores[r, 0], &positions[r, 0])


def top_inner_two_pass(
    const float32_t[:, ::1] items,
    const unsigned short[:, :, ::1] half,
    const float64_t[::1] err,
    float64_t norm_bound,
    const float32_t[:, ::1] queries,
    float32_t[:, ::1] scores,
    int32_t[:, ::1] positions,
):
    """``top_inner``'s answer, from a pass over ``half`` and an exact pass over the rows
    that may belong. ``half`` is ``items`` in half precision (uint16 bits) in blocks of
    eight rows, dimension by dimension: ``half[b, j, r]`` is row 8b + r's dimension j, rows
    past the last zero. ``err`` is its largest rounding per dimension, ``norm_bound`` at
    least every row's norm. Without AVX2, F16C and FMA, the one exact pass. Returns the
    rows the exact passes scored, over every query."""
    cdef Py_ssize_t r, k = scores.shape[1], n = items.shape[0], d = items.shape[1], checked = 0
    cdef float32_t *approx
    cdef int64_t *cand
    cdef float32_t *exact
    if not o2o_avx2():
        top_inner(items, queries, scores, positions)
        return n * queries.shape[0]
    approx = <float32_t *>malloc((n + 8) * sizeof(float32_t))
    cand = <int64_t *>malloc(n * sizeof(int64_t))
    exact = <float32_t *>malloc(n * sizeof(float32_t))
    if approx == NULL or cand == NULL or exact == NULL:
        free(approx)
        free(cand)
        free(exact)
        raise MemoryError(f"no memory for the scan's scratch over {n} rows")
    try:
        with nogil:
            for r in range(queries.shape[0]):
                checked += _two_pass_loop(
                    &items[0, 0], &half[0, 0, 0], &err[0], norm_bound, n, d, &queries[r, 0], k,
                    &scores[r, 0], &positions[r, 0], approx, cand, exact,
                )
    finally:
        free(approx)
        free(cand)
        free(exact)
    return checked


def norms(const float32_t[:, ::1] x):
    """Each row's Euclidean norm, its squares summed in double in dimension order (float32
    products are exact in double), without the GIL."""
    cdef Py_ssize_t i, j, n = x.shape[0], d = x.shape[1]
    cdef float64_t acc, v
    out = np.empty(n, np.float64)
    cdef float64_t[::1] o = out
    with nogil:
        for i in range(n):
            acc = 0.0
            for j in range(d):
                v = x[i, j]
                acc += v * v
            o[i] = sqrt(acc)
    return out


def use_avx2(bint on):
    """Whether the scans use AVX2 and the two-pass scan (when the CPU has AVX2 and F16C; the
    default) or SSE and one exact pass. Returns the path now in use (True: AVX2). For tests
    that compare the two paths."""
    return bool(o2o_set_avx2(on))
