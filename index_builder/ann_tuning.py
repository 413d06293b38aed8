"""The search effort and refine factor a bundle asks the server for: the cheapest pair reaching its recall target."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

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
    refine_factors: Sequence[float] = (1.0,),
) -> dict:
    """Measure the served path's recall for pairs of effort and refine factor; choose the cheapest reaching ``target``.

    The served path is the server's :class:`~ranking.retrieval.search.Retriever`: the exact
    head of ``head_items`` largest-norm items (0: none) where it proves its answer, else the
    ANN index at that effort, asked for ``ceil(k * refine)`` items re-ranked by the exact inner
    product (refine 1: the index's own top k). For each refine factor, smallest first, efforts
    are tried upwards and the ladder stops at the first that reaches ``target`` (a higher one
    costs more), or where a smaller factor has already reached it at an effort no higher (the
    pair does more work than that one). Of the pairs that reach the target the one with the
    lowest measured time per query is chosen: a quantised index (SQ8) whose codes misorder the
    items near the k-th reaches it with a little refining where no effort alone does.

    Parameters
    ----------
    refine_factors : sequence of float
        Each >= 1; 1 alone tunes the effort only (no re-ranking).

    Returns
    -------
    dict
        The manifest's ``retrieval`` section: ``ann_effort`` and ``ann_refine`` (the choice),
        ``reached``, the settings it was measured with, and per pair tried (``efforts``) its
        effort, refine, recall and the mean search time of one query searched alone
        (``search_us_per_query``, as the server searches). When no pair reaches the target,
        the one of highest recall (on a tie the smaller factor, then the higher effort) and a
        ``warning``.

    Raises
    ------
    ValueError
        A refine factor below 1, or none given.
    """
    factors = sorted({float(r) for r in refine_factors})
    if not factors or not factors[0] >= 1.0:
        raise ValueError(f"refine factors must be >= 1 (1: no re-ranking), got {list(refine_factors)}")
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    k = int(min(k, index.ntotal))
    head = ExactHead(item_factors, head_items) if head_items > 0 else None
    truth = exact_top(item_factors, queries, k)
    timed = queries[:TIMED_QUERIES]
    tried: list[dict] = []
    reaching: list[dict] = []
    for refine in factors:
        retriever = Retriever(index, head, item_factors, refine)
        for effort in effort_ladder(max_effort):
            if any(e["effort"] <= effort for e in reaching):
                break  # dominated: a smaller factor reached the target with no more effort
            rows, _ = retriever.search(queries, k, effort)
            for i in range(min(len(timed), 20)):
                retriever.search(timed[i : i + 1], k, effort)  # warm up, off the clock
            t0 = time.perf_counter()
            for i in range(len(timed)):
                retriever.search(timed[i : i + 1], k, effort)
            us = (time.perf_counter() - t0) / max(len(timed), 1) * 1e6
            r = recall(truth, rows)
            entry = {
                "effort": effort,
                "refine": refine,
                "served_recall": round(r, 4),
                "search_us_per_query": round(us, 1),
            }
            tried.append(entry)
            if r >= target:
                reaching.append(entry)
                break
    reached = bool(reaching)
    if reached:
        best = min(reaching, key=lambda e: (e["search_us_per_query"], e["refine"], e["effort"]))
    else:
        # The highest recall; on a tie the smaller factor (refining that buys nothing is not paid
        # for), then the higher effort (the highest measured, as before refining was tuned).
        best = max(tried, key=lambda e: (e["served_recall"], -e["refine"], e["effort"]))
        log.warning(
            "no search effort up to ann_max_effort = %d with refine factors %s reaches the served-path recall "
            "target %.2f at k = %d (best %.3f): the bundle asks for effort %d, refine %g; raise ann_max_effort "
            "or ann_refine_factors, or change the index settings",
            max_effort,
            factors,
            target,
            k,
            best["served_recall"],
            best["effort"],
            best["refine"],
        )
    section = {
        "ann_effort": best["effort"],
        "ann_refine": best["refine"],
        "reached": reached,
        "target_recall": target,
        "k": k,
        "exact_head_items": head_items,
        "users": len(queries),
        "refine_factors": factors,
        "served_recall": best["served_recall"],
        "search_us_per_query": best["search_us_per_query"],
        "efforts": tried,
    }
    if not reached:
        section["warning"] = (
            f"no effort up to {max_effort} with refine factors {factors} reaches recall {target} of the exact "
            f"top {k}; using effort {best['effort']}, refine {best['refine']:g}, the highest recall measured"
        )
    return section
