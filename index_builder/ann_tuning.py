"""The index a bundle ships and the search effort and refine factor it asks the server for: the
cheapest reaching its recall target."""

from __future__ import annotations

import dataclasses
import logging
import re
import time
from collections.abc import Sequence

import faiss
import numpy as np

from index_builder.config import BuildConfig
from index_builder.fit import build_index
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
    *,
    truth: np.ndarray | None = None,
    warn: bool = True,
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
    truth : np.ndarray, optional
        :func:`exact_top` of ``queries`` at ``k`` when the caller already has it (it tunes
        several indexes over the same items).
    warn : bool
        Log a warning when no pair reaches ``target`` (the caller that rebuilds the index
        says it once, for every index tried).

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
    if truth is None:
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
                retriever.search_one(timed[i], k, effort)  # warm up, off the clock
            t0 = time.perf_counter()
            for i in range(len(timed)):
                retriever.search_one(timed[i], k, effort)  # one query alone, as the server searches
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
    if not reached and warn:
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


# An HNSW index's factory string: ``HNSW``, its M (FAISS's default 32 when absent), then the storage.
_HNSW = re.compile(r"HNSW(\d*)(?=$|[,_])")
# FAISS's M when the factory string names none ("HNSW,Flat").
DEFAULT_HNSW_M = 32


def hnsw_m(index: faiss.Index) -> int | None:
    """An HNSW index's M (links per item on the upper layers, twice that on the base one), else None."""
    base = faiss.downcast_index(index)
    if not isinstance(base, faiss.IndexHNSW):
        return None
    # faiss's bundled stubs lack HNSW.nb_neighbors (the SWIG wrapper has it).
    return int(base.hnsw.nb_neighbors(1))  # type: ignore[attr-defined]


def index_ladder(index_type: str, ef_construction: int, rebuilds: int) -> list[tuple[str, int]]:
    """The HNSW settings tried in order: the configured ones, then ``rebuilds`` each stronger than the last.

    A rebuild doubles efConstruction (a wider search for each item's links: a better graph at
    the same size, built slower), the next doubles M (more links per item: a graph that reaches
    further, larger and slower to search per step), alternately; the storage after ``HNSW<M>``
    (``,Flat``, ``,SQ8``, ...) is kept.

    Returns
    -------
    list of (index_type, ef_construction)
        ``[(index_type, ef_construction), ...]``: ``rebuilds + 1`` rungs.

    Raises
    ------
    ValueError
        ``index_type`` does not start with ``HNSW<M>``.
    """
    found = _HNSW.match(index_type)
    if found is None:
        raise ValueError(f"index_type {index_type!r} is not an HNSW factory string (HNSW<M>,<storage>)")
    m = int(found.group(1)) if found.group(1) else DEFAULT_HNSW_M
    storage = index_type[found.end() :]
    rungs = [(index_type, ef_construction)]
    for r in range(rebuilds):
        if r % 2 == 0:
            ef_construction *= 2
        else:
            m *= 2
        rungs.append((f"HNSW{m}{storage}", ef_construction))
    return rungs


def index_bytes(index: faiss.Index) -> int:
    """Bytes of the index as written to the bundle (counted as FAISS writes it, nothing kept)."""
    written = 0

    def count(chunk: bytes) -> int:
        nonlocal written
        written += len(chunk)
        return len(chunk)

    # faiss's bundled stubs lack PyCallbackIOWriter (the SWIG wrapper has it).
    faiss.write_index(index, faiss.PyCallbackIOWriter(count))  # type: ignore[attr-defined]
    return written


def _acceptable(section: dict, max_search_us: float) -> bool:
    """The chosen pair reaches the target, at no more than the ceiling (0: none)."""
    return bool(section["reached"]) and (max_search_us <= 0 or section["search_us_per_query"] <= max_search_us)


def _better(a: dict, b: dict | None) -> bool:
    """Whether index figures ``a`` beat ``b``: reaching the target beats not; of two reaching, the lower
    measured search time; of two missing, the higher recall (on a tie ``b``, tried earlier: a cheaper index)."""
    if b is None:
        return True
    if a["reached"] != b["reached"]:
        return bool(a["reached"])
    if a["reached"]:
        return bool(a["search_us_per_query"] < b["search_us_per_query"])
    return bool(a["served_recall"] > b["served_recall"])


def tune_index(
    index: faiss.Index,
    build_seconds: float,
    item_factors: np.ndarray,
    queries: np.ndarray,
    k: int,
    cfg: BuildConfig,
) -> tuple[faiss.Index, dict]:
    """The index the bundle ships, and the effort and refine factor it asks for (:func:`tune_effort`).

    ``index`` (built with ``cfg``'s ``index_type`` and ``hnsw_ef_construction``) is tuned first.
    When its chosen pair misses ``ann_target_recall``, or costs more than ``ann_max_search_us``
    per query, an HNSW graph is rebuilt stronger (:func:`index_ladder`, at most
    ``ann_max_index_rebuilds`` times) and tuned again, until one is within both: refining
    cannot recover items the graph never visits, and a graph that reaches them may need less
    effort than a weak one searched deeper. Of the indexes tried the one reaching the target
    at the lowest measured search time per query is kept (none reaching it: the highest recall,
    on a tie the earliest). Only the best so far is held, so at most two indexes are in memory.
    Another index type is tuned as it is (its effort and refine only), and the section says so.

    Parameters
    ----------
    index : faiss.Index
        The index built with ``cfg``'s settings.
    build_seconds : float
        The time it took to build, for the record.
    item_factors, queries : np.ndarray
        The items indexed and the evaluation users' factors.
    k : int
        The candidates recall is measured at.
    cfg : BuildConfig

    Returns
    -------
    (index, retrieval)
        The index to publish, and the manifest's ``retrieval`` section: the chosen index's
        :func:`tune_effort` section, plus ``index`` (its ``index_type``, ``hnsw_m``,
        ``hnsw_ef_construction``, ``rebuilt``), ``indexes`` (per index tried: those settings,
        ``build_seconds``, ``index_bytes``, the chosen pair's figures, ``within_ceiling`` and its
        pairs tried), ``max_search_us``, ``max_index_rebuilds`` and ``index_tuning`` (what was done).
    """
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    k = int(min(k, index.ntotal))
    truth = exact_top(item_factors, queries, k)
    m = hnsw_m(index)
    if m is None:
        rungs = [(cfg.index_type, 0)]
        how = f"not rebuilt: {cfg.index_type} is not an HNSW index (only an HNSW graph's settings are tuned)"
        log.info("index tuning skipped: %s", how)
    else:
        rungs = index_ladder(cfg.index_type, cfg.hnsw_ef_construction, cfg.ann_max_index_rebuilds)
        how = (
            f"HNSW: up to {cfg.ann_max_index_rebuilds} rebuilds, efConstruction then M doubled"
            if cfg.ann_max_index_rebuilds
            else "HNSW: not rebuilt (ann_max_index_rebuilds = 0)"
        )
    ceiling = cfg.ann_max_search_us
    tried: list[dict] = []
    best: dict | None = None
    best_index, best_section = index, {}
    for i, (index_type, ef_construction) in enumerate(rungs):
        if i > 0:
            log.info(
                "index %s (efConstruction %d) %s; rebuilding as %s with efConstruction %d",
                tried[-1]["index_type"],
                tried[-1]["hnsw_ef_construction"],
                _shortfall(tried[-1], cfg),
                index_type,
                ef_construction,
            )
            t0 = time.perf_counter()
            index = build_index(
                item_factors,
                dataclasses.replace(cfg, index_type=index_type, hnsw_ef_construction=ef_construction),
            )
            build_seconds = time.perf_counter() - t0
        section = tune_effort(
            index,
            item_factors,
            queries,
            k,
            cfg.eval_exact_head_items,
            cfg.ann_target_recall,
            cfg.ann_max_effort,
            cfg.ann_refine_factors,
            truth=truth,
            warn=False,
        )
        figures = {
            "index_type": index_type,
            "hnsw_m": hnsw_m(index),
            "hnsw_ef_construction": ef_construction if m is not None else None,
            "build_seconds": round(build_seconds, 3),
            "index_bytes": index_bytes(index),
            "reached": section["reached"],
            "ann_effort": section["ann_effort"],
            "ann_refine": section["ann_refine"],
            "served_recall": section["served_recall"],
            "search_us_per_query": section["search_us_per_query"],
            "within_ceiling": _acceptable(section, ceiling),
            "efforts": section["efforts"],
        }
        tried.append(figures)
        if _better(figures, best):
            best, best_index, best_section = figures, index, section
        del index  # a rung that lost is freed before the next is built
        if figures["within_ceiling"]:
            break
    assert best is not None
    retrieval = {
        **best_section,
        "index": {
            "index_type": best["index_type"],
            "hnsw_m": best["hnsw_m"],
            "hnsw_ef_construction": best["hnsw_ef_construction"],
            "rebuilt": best is not tried[0],
        },
        "indexes": tried,
        "max_search_us": ceiling,
        "max_index_rebuilds": cfg.ann_max_index_rebuilds,
        "index_tuning": how,
    }
    retrieval.pop("warning", None)
    if not best["within_ceiling"]:
        if m is None:
            settings = cfg.index_type
            remedy = "raise ann_max_effort, ann_refine_factors or ann_max_search_us, or use an HNSW index_type"
        else:
            settings = ", ".join(f"{t['index_type']} efConstruction {t['hnsw_ef_construction']}" for t in tried)
            remedy = "raise ann_max_effort, ann_refine_factors, ann_max_search_us or ann_max_index_rebuilds"
        retrieval["warning"] = (
            f"no index tried ({settings}) reaches recall {cfg.ann_target_recall} of the exact top {k} with an effort "
            f"up to {cfg.ann_max_effort} and refine factors {best_section['refine_factors']}"
            + (f" within {ceiling:g} us per query" if ceiling > 0 else "")
            + f"; using {best['index_type']}, effort {best['ann_effort']}, refine {best['ann_refine']:g} "
            f"(recall {best['served_recall']}, {best['search_us_per_query']} us per query): {remedy}"
        )
        log.warning("%s", retrieval["warning"])
    elif len(tried) > 1:
        log.info(
            "index %s (efConstruction %s) reaches recall %.3f at effort %d, refine %g: %.0f us per query",
            best["index_type"],
            best["hnsw_ef_construction"],
            best["served_recall"],
            best["ann_effort"],
            best["ann_refine"],
            best["search_us_per_query"],
        )
    return best_index, retrieval


def _shortfall(figures: dict, cfg: BuildConfig) -> str:
    """Why an index was not kept, for the log."""
    if not figures["reached"]:
        return (
            f"misses recall {cfg.ann_target_recall} (best {figures['served_recall']} up to effort {cfg.ann_max_effort})"
        )
    return (
        f"reaches recall {cfg.ann_target_recall} at {figures['search_us_per_query']} us per query, "
        f"above ann_max_search_us = {cfg.ann_max_search_us:g}"
    )
