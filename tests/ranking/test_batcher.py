"""Micro-batched ANN search gives every request exactly what a search of its own would."""
import threading

import faiss
import numpy as np
import pytest

from ranking.batcher import AnnBatcher
from ranking.retrieval import ann_search


@pytest.fixture(scope="module")
def index():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2000, 16)).astype(np.float32)
    idx = faiss.IndexFlatIP(16)
    idx.add(x)
    return idx


@pytest.mark.parametrize("max_batch", [1, 4, 16])
def test_concurrent_queries_get_their_own_results(index, max_batch):
    rng = np.random.default_rng(max_batch)
    queries = rng.standard_normal((40, 16)).astype(np.float32)
    ks = rng.integers(1, 60, 40)
    batcher = AnnBatcher(index, max_batch=max_batch, max_wait_us=2000)
    got = [None] * 40
    barrier = threading.Barrier(8)

    def worker(lo):
        barrier.wait()
        for i in range(lo, 40, 8):
            got[i] = batcher.search(queries[i], int(ks[i]), 64)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    for i in range(40):
        want = ann_search(index, queries[i:i + 1], int(ks[i]), 64)[1][0]
        np.testing.assert_array_equal(got[i], want)
    if max_batch > 1:
        assert batcher.queries == 40 and batcher.batches < 40  # some queries really shared a search


def test_a_lone_query_waits_no_longer_than_its_budget_allows(index):
    import time

    batcher = AnnBatcher(index, max_batch=8, max_wait_us=500_000)
    t0 = time.perf_counter()
    batcher.search(np.ones(16, np.float32), 5, 64, remaining_ms=10.0)
    assert time.perf_counter() - t0 < 0.1  # waited at most a tenth of 10 ms, not 0.5 s
