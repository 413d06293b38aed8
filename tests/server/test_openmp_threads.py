"""Every RPC thread searches FAISS with one OpenMP thread: requests, not threads, use the cores."""

import os
import threading

import faiss

from server.app import request_executor


def test_rpc_threads_use_one_openmp_thread_where_a_fresh_thread_would_use_every_core():
    fresh = []
    t = threading.Thread(target=lambda: fresh.append(faiss.omp_get_max_threads()))
    t.start()
    t.join()
    # The setting is per thread: a thread that never set it gets one OpenMP thread per core.
    assert fresh == [os.cpu_count()] or os.environ.get("OMP_NUM_THREADS")
    with request_executor(4) as pool:
        seen = {pool.submit(faiss.omp_get_max_threads).result() for _ in range(16)}
    assert seen == {1}
