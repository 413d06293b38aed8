"""Micro-batched retrieval gives every request exactly what a search of its own would."""

import threading

import faiss
import numpy as np
import pytest

from ranking import ExactHead, Retriever, ann_search
from ranking.retrieval.batcher import AnnBatcher


@pytest.fixture(scope="module")
def items():
    rng = np.random.default_rng(3)
    # Norms falling off like popularity, so the head proves some queries exact and not others.
    scale = (1.0 / np.arange(1, 2001) ** 0.8)[rng.permutation(2000)]
    return (rng.standard_normal((2000, 16)) * scale[:, None]).astype(np.float32)


@pytest.fixture(scope="module")
def index(items):
    idx = faiss.IndexFlatIP(16)
    idx.add(items)
    return idx


@pytest.fixture(scope="module")
def retriever(items, index):
    return Retriever(index, ExactHead(items, 300))


@pytest.mark.parametrize("max_batch", [1, 4, 16])
def test_concurrent_queries_get_their_own_results(index, retriever, max_batch):
    rng = np.random.default_rng(max_batch)
    queries = rng.standard_normal((40, 16)).astype(np.float32)
    ks = rng.integers(1, 60, 40)
    batcher = AnnBatcher(retriever, max_batch=max_batch, max_wait_us=2000)
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
    exact_alone = np.zeros(40, bool)
    for i in range(40):
        # The ANN index here is exact too, so every answer is the true top k, whichever path found it.
        want = ann_search(index, queries[i : i + 1], int(ks[i]), 64)[1][0]
        rows, exact = got[i]
        np.testing.assert_array_equal(rows, want)
        exact_alone[i] = retriever.search(queries[i : i + 1], int(ks[i]), 64)[1][0]
        # A batch proves its top max(k); a query is never called exact when its own search could not prove it.
        assert not exact or exact_alone[i]
    assert exact_alone.any() and not exact_alone.all()
    if max_batch > 1:
        assert batcher.queries == 40 and batcher.batches < 40  # some queries really shared a search


def test_a_lone_query_waits_no_longer_than_its_budget_allows(retriever):
    import time

    batcher = AnnBatcher(retriever, max_batch=8, max_wait_us=500_000)
    t0 = time.perf_counter()
    batcher.search(np.ones(16, np.float32), 5, 64, remaining_ms=10.0)
    assert time.perf_counter() - t0 < 0.1  # waited at most a tenth of 10 ms, not 0.5 s
