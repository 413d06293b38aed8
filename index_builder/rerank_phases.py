"""Phased scoring's first phase: the shortest prefix of every bag that keeps the full model's top 10 in its top N."""

from __future__ import annotations

import logging

import numpy as np

log = logging.getLogger(__name__)

# Ranks the recall is measured at: the answer a Rank returns by default.
PHASE_K = 10
# Shares of each bag's trees tried as the first phase, shortest first.
PREFIX_SHARES = (1 / 32, 1 / 16, 1 / 8, 3 / 16, 1 / 4, 3 / 8, 1 / 2, 3 / 4)
# A phased ranking "loses beyond noise" when its mean NDCG@10 falls below the one-phase ranking's
# by more than this many standard errors of the paired per-query difference.
NOISE_SE = 2.0


def prefix_counts(sizes: list[int], share: float) -> list[int]:
    """Trees of each bag in a prefix of ``share`` of its trees (at least one, at most all)."""
    return [max(1, min(n, int(np.ceil(share * n)))) if n else 0 for n in sizes]


def phased_order(first: np.ndarray, full: np.ndarray, n_second: int) -> np.ndarray:
    """Positions of one query's candidates as phased scoring ranks them (best first).

    The best ``n_second`` by first-phase score (ties by position) are ranked by the full
    model's score; the rest follow by first-phase score: the kernel's rule
    (``ranking.kernels.scoring.score_trees_phased_topk``).
    """
    by_first = np.lexsort((np.arange(len(first)), -first))
    if n_second <= 0 or n_second >= len(first):
        return np.lexsort((np.arange(len(full)), -full))
    top = by_first[:n_second]
    top = top[np.lexsort((top, -full[top]))]
    return np.r_[top, by_first[n_second:]]


def topk_recall(first: list[np.ndarray], full: list[np.ndarray], n_second: int, k: int = PHASE_K) -> float:
    """Share of the full model's top-k items (over all queries) inside the first phase's top ``n_second``."""
    kept = total = 0
    for f1, f in zip(first, full):
        best = np.lexsort((np.arange(len(f)), -f))[:k]
        total += len(best)
        if n_second <= 0 or n_second >= len(f1):
            kept += len(best)
            continue
        chosen = np.lexsort((np.arange(len(f1)), -f1))[:n_second]
        kept += len(np.intersect1d(best, chosen))
    return kept / total if total else 1.0


def ndcg_per_query(orders: list[np.ndarray], labels: list[np.ndarray], k: int = PHASE_K) -> np.ndarray:
    """NDCG@k of each query ranked in ``orders`` (binary gains, the reranker's ``ndcg_at``)."""
    out = np.zeros(len(orders))
    for q, (order, y) in enumerate(zip(orders, labels)):
        top = order[:k]
        gains = y[top] / np.log2(np.arange(2, len(top) + 2))
        ideal = (1.0 / np.log2(np.arange(2, min(k, int(y.sum())) + 2))).sum()
        out[q] = gains.sum() / ideal if ideal > 0 else 0.0
    return out


def paired_loss(one: np.ndarray, phased: np.ndarray) -> dict:
    """Mean NDCG of each ranking, the paired difference's standard error, and whether phases lost beyond it."""
    d = phased - one
    se = float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else 0.0
    return {
        "one_phase": round(float(one.mean()), 4) if len(one) else None,
        "phased": round(float(phased.mean()), 4) if len(phased) else None,
        "difference": round(float(d.mean()), 5) if len(d) else None,
        "difference_se": round(se, 5),
        "queries": len(d),
        "lost": bool(len(d) and d.mean() < -NOISE_SE * se),
    }


def choose_phases(boosters: list, held: list[tuple[int, np.ndarray, np.ndarray]], n_second: int, target: float) -> dict:
    """The first phase (the same share of every bag's first trees) and the manifest's ``phases`` section.

    Each held-out query is scored by the bag that never trained on it, whole and by its prefix
    (cross-fitted, as the reranker's held-out figures are). The shortest prefix whose first
    phase keeps ``target`` of the full model's top ``PHASE_K`` inside its top ``n_second`` is
    chosen; NDCG@10 is then measured ranked in one phase and in two. When the phases lose
    beyond noise (``NOISE_SE`` standard errors of the paired difference), or no prefix
    shorter than the whole model reaches the target, the section records
    ``second_phase_candidates = 0`` (one phase) and why.

    Parameters
    ----------
    boosters : list of lightgbm.Booster
        The bags, as exported (already cut to the serving ceiling).
    held : list of (bag, X, y)
        One per held-out query: the bag that never saw it, its candidates' features and labels.
    n_second : int
        Candidates the second phase scores (``rerank_second_phase_candidates``); 0 records
        no phases to use but still a first phase the server can fall back on.
    target : float
        ``rerank_phase_recall``.

    Returns
    -------
    dict
        The ``phases`` section: ``trees_per_bag``, ``first_trees_per_bag``,
        ``second_phase_candidates``, ``recall_at_10`` and the NDCG@10 figures.
    """
    sizes = [int(b.num_trees()) for b in boosters]
    section: dict = {
        "trees_per_bag": sizes,
        "k": PHASE_K,
        "target_recall": target,
        "evaluated_second_phase_candidates": n_second,
        "held_out_queries": len(held),
    }
    full = [boosters[b].predict(X) for b, X, _ in held]
    chosen, first, recall, reached = sizes, full, 1.0, False
    for share in PREFIX_SHARES:
        counts = prefix_counts(sizes, share)
        if counts == sizes:
            break
        prefix = [boosters[b].predict(X, num_iteration=counts[b]) for b, X, _ in held]
        # The longest prefix tried is kept when none reaches the target: a server whose budget
        # cannot afford the whole model still has a first phase to fall back on.
        chosen, first, recall = counts, prefix, topk_recall(prefix, full, n_second)
        if recall >= target:
            reached = True
            break
    section["first_trees_per_bag"] = chosen
    section["first_phase_share"] = round(sum(chosen) / max(sum(sizes), 1), 4)
    section["recall_at_10"] = round(recall, 4)
    labels = [y for _, _, y in held]
    one = ndcg_per_query([phased_order(f, f, 0) for f in full], labels)
    two = ndcg_per_query([phased_order(f1, f, n_second) for f1, f in zip(first, full)], labels)
    ndcg = paired_loss(one, two)
    section["held_out_ndcg_at_10"] = ndcg
    if n_second <= 0:
        section["second_phase_candidates"], why = 0, "rerank_second_phase_candidates = 0"
    elif not reached:
        section["second_phase_candidates"] = 0
        why = f"no prefix shorter than the whole model keeps {target:.0%} of the top {PHASE_K} in its top {n_second}"
    elif ndcg["lost"]:
        section["second_phase_candidates"] = 0
        why = (
            f"phased NDCG@10 {ndcg['phased']} is below one phase's {ndcg['one_phase']} by more than "
            f"{NOISE_SE:g} standard errors ({ndcg['difference_se']})"
        )
    else:
        section["second_phase_candidates"], why = n_second, ""
    if why:
        section["one_phase_because"] = why
        log.info("scoring in one phase: %s", why)
    else:
        log.info(
            "phased scoring: first %s trees per bag of %s, full model over the best %d (recall@10 %.4f)",
            chosen,
            sizes,
            n_second,
            recall,
        )
    return section
