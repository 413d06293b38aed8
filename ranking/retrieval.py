"""Candidate retrieval: approximate nearest neighbours over item factors plus popularity lists."""
from __future__ import annotations

import faiss
import numpy as np


def search_params(index: faiss.Index, k: int, effort: int) -> faiss.SearchParameters | None:
    """Per-query search parameters, so concurrent requests never mutate the shared index.

    ``effort`` is efSearch for HNSW and nprobe (lists probed) for IVF; HNSW needs efSearch >= k to
    return k results.
    """
    base = faiss.downcast_index(index)
    if isinstance(base, faiss.IndexHNSW):
        return faiss.SearchParametersHNSW(efSearch=max(effort, k))
    if isinstance(base, faiss.IndexIVF):
        return faiss.SearchParametersIVF(nprobe=max(1, effort))
    return None


def ann_search(index: faiss.Index, queries: np.ndarray, k: int, effort: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` items by inner product for each query row.

    Returns
    -------
    (scores, rows) : (np.ndarray, np.ndarray)
        float32 and int64 arrays of shape (n_queries, k); rows are -1 where the index
        had fewer than k results.
    """
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    k = int(min(k, index.ntotal))
    if k <= 0:
        n = queries.shape[0]
        return np.zeros((n, 0), np.float32), np.zeros((n, 0), np.int64)
    params = search_params(index, k, effort)
    if params is None:
        return index.search(queries, k)
    return index.search(queries, k, params=params)

