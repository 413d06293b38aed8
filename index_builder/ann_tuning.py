"""The search effort a bundle asks the server for: the lowest that gives the served path its recall target."""

from __future__ import annotations

import logging
import time

import faiss
import numpy as np

from ranking import ExactHead, Retriever

log = logging.getLogger(__name__)

# The first rung of the ladder of efforts; each next one doubles it.
FIRST_EFFORT = 16
# Queries timed one at a time (as the server searches them) per effort: enough for a stable mean.
TIMED_QUERIES = 200


def effort_ladder(max_effort: int) -> list[int]:
    """16, 32, ... doubling up to ``max_effort`` (which ends the ladder even when not a power of two)."""
    out, e = [], FIRST_EFFORT
    while e < max_effort:
        out.append(e)
        e *= 2
    out.append(max_effort)
    return out


def exact_top(item_factors: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Item rows of each query's exact top ``k`` by inner product, (n, k) int64."""
    flat = faiss.IndexFlatIP(item_factors.shape[1])
    flat.add(np.ascontiguousarray(item_factors, dtype=np.float32))
    return flat.search(queries, k)[1]


def recall(truth: np.ndarray, got: np.ndarray) -> float:
    """Mean share of each row of ``truth`` found anywhere in the same row of ``got`` (-1 ignored)."""
    hits = [len(np.intersect1d(t[t >= 0], g[g >= 0])) / max(1, int((t >= 0).sum())) for t, g in zip(truth, got)]
    return float(np.mean(hits)) if hits else float("nan")


def tune_effort(
    index: faiss.Index,
    item_factors: np.ndarray,
    queries: np.ndarray,
    k: int,
    head_items: int,
    target: float,
    max_effort: int,
) -> dict:
    """Measure the served path's recall at each effort of the ladder; choose the lowest reaching ``target``.

    The served path is the server's :class:`~ranking.retrieval.search.Retriever`: the exact
    head of ``head_items`` largest-norm items (0: none) where it proves its answer, else the
    ANN index at that effort. Efforts are tried upwards and the ladder stops at the first that
    reaches ``target`` (a higher one costs more and cannot be chosen).

    Returns
    -------
    dict
        The manifest's ``retrieval`` section: ``ann_effort`` (the choice), ``reached``, the
        settings it was measured with, and per effort tried its recall and the mean search
        time of one query searched alone (``search_us_per_query``, as the server searches).
    """
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    k = int(min(k, index.ntotal))
    head = ExactHead(item_factors, head_items) if head_items > 0 else None
    retriever = Retriever(index, head)
    truth = exact_top(item_factors, queries, k)
    timed = queries[:TIMED_QUERIES]
    tried: list[dict] = []
    chosen = None
    for effort in effort_ladder(max_effort):
        rows, _ = retriever.search(queries, k, effort)
        t0 = time.perf_counter()
        for i in range(len(timed)):
            retriever.search(timed[i : i + 1], k, effort)
        us = (time.perf_counter() - t0) / max(len(timed), 1) * 1e6
        r = recall(truth, rows)
        tried.append({"effort": effort, "served_recall": round(r, 4), "search_us_per_query": round(us, 1)})
        if r >= target:
            chosen = effort
            break
    reached = chosen is not None
    if chosen is None:
        chosen = tried[-1]["effort"]
        log.warning(
            "no search effort up to ann_max_effort = %d reaches the served-path recall target %.2f at k = %d "
            "(best %.3f): the bundle asks for %d; raise ann_max_effort or change the index settings",
            max_effort,
            target,
            k,
            tried[-1]["served_recall"],
            chosen,
        )
    section = {
        "ann_effort": chosen,
        "reached": reached,
        "target_recall": target,
        "k": k,
        "exact_head_items": head_items,
        "users": len(queries),
        "efforts": tried,
    }
    if not reached:
        section["warning"] = (
            f"no effort up to {max_effort} reaches recall {target} of the exact top {k}; using {chosen}, "
            f"the highest measured"
        )
    return section
