"""The ladder evaluation: every rung against the full pipeline, under two offline protocols.

The protocols' splits are ``index_builder.splits``'s; the builder fits each earlier
part once (``index_builder.fit``) and hands it here. The full pipeline is asked
through :meth:`ranking.pipeline.ranker.Ranker.rank` (the code that serves ``Rank``), each
user scored by the reranker bag that never trained on them, and the lower rungs
(``index_builder.baselines``) score from the same training part. Items a user
touched in training are never counted as hits, except a re-purchase of an item the
learned policy offers again (``index_builder.repeat``): every rung may rank those, and
the metrics are split between such repeat items and new ones.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import scipy.sparse as sp

from index_builder import baselines as bl
from index_builder.config import BuildConfig
from index_builder.feature_tables import context_of
from index_builder.fit import PartFit
from index_builder.rerank_phases import paired_loss
from index_builder.splits import PROTOCOLS, Protocol, SplitError, consumed_mask, positive_mask
from ranking import Ranker, RankerConfig, RankingModel, RankQuery

log = logging.getLogger(__name__)

RUNGS = ("POPULAR", "POPULAR_RECENT", "SEGMENT", "ITEM_TO_ITEM", "BUY_AGAIN", "ALS", "EASE", "ONE2ONE")
METRICS = ("recall", "ndcg", "map", "coverage", "novelty")


@dataclass
class EvalConfig:
    """Settings of one evaluation; every default is written down here once.

    The protocols' splits, the recent window, EASE's regularization and the seed default to
    the builder's own settings (the reranker trains on the same two splits).
    """

    protocols: tuple[str, ...] = PROTOCOLS
    ks: tuple[int, ...] = (5, 10, 20, 50)
    cutoff_quantile: float = BuildConfig.rerank_cutoff_quantile
    holdout: int = BuildConfig.rerank_holdout
    recent_days: float = BuildConfig.recent_days
    ease_lambda: float = BuildConfig.ease_lambda
    max_users: int = 0  # 0 = every test user
    seed: int = BuildConfig.random_seed
    build: BuildConfig = field(default_factory=BuildConfig)

    def protocol(self, name: str) -> Protocol:
        return Protocol(name, self.cutoff_quantile, self.holdout)


# ---------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------


def user_metrics(recs: np.ndarray, truth: set, k: int) -> tuple[float, float, float]:
    """(recall@k, NDCG@k, AP@k) of one ranked list against a non-empty truth set."""
    top = recs[:k]
    hits = np.fromiter((int(x) in truth for x in top), bool, len(top))
    n_true = len(truth)
    recall = hits.sum() / n_true
    disc = 1.0 / np.log2(np.arange(2, k + 2))
    ndcg = float((hits * disc[: len(top)]).sum() / disc[: min(k, n_true)].sum())
    prec = np.cumsum(hits) / np.arange(1, len(top) + 1)
    ap = float((prec * hits).sum() / min(k, n_true))
    return float(recall), ndcg, ap


def summarise(
    recs: dict[int, np.ndarray],
    truth: dict[int, set],
    users: list[int],
    ks,
    n_items: int,
    item_users: np.ndarray,
    n_train_users: int,
) -> dict:
    """Mean metrics over ``users`` at every k, plus coverage and novelty."""
    out = {}
    for k in ks:
        vals = np.array([user_metrics(recs[u], truth[u], k) for u in users]) if users else np.zeros((0, 3))
        shown = np.concatenate([recs[u][:k] for u in users]) if users else np.zeros(0, np.int64)
        # Novelty: mean self-information of what is shown, -log2 of the share of users who had it.
        share = np.maximum(item_users[shown], 1.0) / max(n_train_users, 1)
        out[k] = {
            "recall": float(vals[:, 0].mean()) if len(vals) else None,
            "ndcg": float(vals[:, 1].mean()) if len(vals) else None,
            "map": float(vals[:, 2].mean()) if len(vals) else None,
            "coverage": float(len(np.unique(shown)) / n_items) if len(shown) else None,
            "novelty": float(np.mean(-np.log2(share))) if len(shown) else None,
        }
    return out


# ---------------------------------------------------------------------------
# One protocol
# ---------------------------------------------------------------------------


def _topk(scores: np.ndarray, exclude: sp.csr_matrix, rows: np.ndarray, k: int) -> list[np.ndarray]:
    out = []
    for j, r in enumerate(rows):
        s = scores[j].astype(np.float64, copy=True)
        if r >= 0:
            s[exclude.indices[exclude.indptr[r] : exclude.indptr[r + 1]]] = -np.inf
        k_eff = min(k, len(s))
        part = np.argpartition(-s, k_eff - 1)[:k_eff]
        part = part[np.lexsort((part, -s[part]))]
        out.append(part[np.isfinite(s[part])])
    return out


def run_protocol(
    part: PartFit, models: list[RankingModel], bag_of: Callable[[list[str]], np.ndarray] | None, ecfg: EvalConfig
) -> dict:
    """Rank every test user of one protocol with each rung, and measure.

    Parameters
    ----------
    part : PartFit
        The protocol's split, its earlier part fitted once.
    models : list of RankingModel
        The fitted arrays with each reranker bag (or the linear scorer alone).
    bag_of : callable or None
        User ids to the bag that never trained on each (-1: every bag did; such users
        are left out of every rung); None with a single model.
    ecfg : EvalConfig

    Returns
    -------
    dict
        ``{"protocol", "n_train_events", "n_test_users", "groups": {group: {rung: {k: metrics}}}, ...}``

    Raises
    ------
    SplitError
        No test user is left to measure.
    """
    protocol = part.protocol.name
    train, test = part.earlier, part.later
    bcfg = ecfg.build
    model = models[0]
    # ONE2ONE is ranked by the full model in one phase; a reranker with phases is ranked phased
    # too, at the candidate count its phases were evaluated at, to show what they cost.
    rankers = [Ranker(m, RankerConfig(second_phase_candidates=0)) for m in models]
    n_second = int((model.manifest.get("phases") or {}).get("second_phase_candidates") or 0)
    phased = (
        [Ranker(m, RankerConfig(second_phase_candidates=n_second)) for m in models]
        if n_second > 0 and rankers[0].phases is not None
        else []
    )
    n_users, n_items = model.n_users, model.n_items

    tr_pos = train.filter(pa.array(positive_mask(train, bcfg)))
    tu = model.users.lookup(tr_pos["user_id"].to_pylist())
    ti = model.items.lookup(tr_pos["item_id"].to_pylist())
    ok = (tu >= 0) & (ti >= 0)
    tu, ti, tts = tu[ok], ti[ok], tr_pos["timestamp"].to_numpy()[ok]
    pos = sp.csr_matrix((np.ones(len(tu)), (tu, ti)), shape=(n_users, n_items))
    pos.data[:] = 1.0
    pos.sum_duplicates()
    pos.data[:] = 1.0
    all_u = model.users.lookup(train["user_id"].to_pylist())
    all_i = model.items.lookup(train["item_id"].to_pylist())
    okk = (all_u >= 0) & (all_i >= 0)
    seen = sp.csr_matrix((np.ones(int(okk.sum())), (all_u[okk], all_i[okk])), shape=(n_users, n_items))
    seen.sum_duplicates()
    seen.data[:] = 1.0
    # Bought in training: a repeat item when bought again. What the policy offers again is not excluded.
    b = model.bundle
    buy_items = b.array("user_buy_items")
    bought = sp.csr_matrix((np.ones(len(buy_items)), buy_items, b.array("user_buy_indptr")), shape=(n_users, n_items))
    again = sp.csr_matrix(bought.multiply((np.asarray(model.item_reoffer) > 0).astype(np.float64)[None, :]))
    seen = sp.csr_matrix(seen - seen.multiply(again))
    seen.eliminate_zeros()
    seen.sort_indices()
    bought.sort_indices()

    # last_basket is judged on the basket itself: its purchases.
    is_truth = consumed_mask(test, bcfg) if protocol == "last_basket" else positive_mask(test, bcfg)
    te_pos = test.filter(pa.array(is_truth & positive_mask(test, bcfg))).sort_by("timestamp")
    qu = te_pos["user_id"].to_pylist()
    qi = model.items.lookup(te_pos["item_id"].to_pylist())
    qt = te_pos["timestamp"].to_numpy()
    truth: dict[str, set] = {}
    first_time: dict[str, int] = {}
    first_row: dict[str, int] = {}
    for j, (uid, it, t) in enumerate(zip(qu, qi, qt)):
        if it < 0:
            continue
        r = model.users.row(uid)
        if (
            r >= 0
            and seen.indptr[r + 1] > seen.indptr[r]
            and it in set(seen.indices[seen.indptr[r] : seen.indptr[r + 1]])
        ):
            continue
        truth.setdefault(uid, set()).add(int(it))
        first_time.setdefault(uid, int(t))
        first_row.setdefault(uid, j)
    test_users = sorted(truth)
    bags = np.zeros(len(test_users), np.int64) if bag_of is None else bag_of(test_users)
    if (bags < 0).any():
        # Only one bag, trained on every fold but one: measure the users it never saw.
        test_users = [u for u, b in zip(test_users, bags) if b >= 0]
        bags = bags[bags >= 0]
    if ecfg.max_users and len(test_users) > ecfg.max_users:
        rng = np.random.default_rng(ecfg.seed)
        pick = np.sort(rng.choice(len(test_users), ecfg.max_users, replace=False))
        test_users, bags = [test_users[j] for j in pick], bags[pick]
    if not test_users:
        raise SplitError(
            f"protocol {protocol}: no test user has a positive event on an item they had not already seen in training"
        )
    urows = np.array([model.users.row(u) for u in test_users], np.int64)
    kmax = max(ecfg.ks)

    # The lower rungs, scored in batches from the training part.
    pop = bl.popular_scores(pos)
    recent = bl.recent_popular_scores(tu, ti, tts, n_users, n_items, ecfg.recent_days) if len(tts) else pop
    B = bl.ease_weights(pos, ecfg.ease_lambda)
    safe = np.maximum(urows, 0)
    hist = pos[safe].multiply((urows >= 0)[:, None]).tocsr()
    lists: dict[str, list[np.ndarray]] = {r: [] for r in RUNGS}
    for lo in range(0, len(urows), 256):
        rr = urows[lo : lo + 256]
        h = hist[lo : lo + 256]
        n = len(rr)
        lists["POPULAR"] += _topk(np.tile(pop, (n, 1)), seen, rr, kmax)
        lists["POPULAR_RECENT"] += _topk(np.tile(recent, (n, 1)), seen, rr, kmax)
        lists["SEGMENT"] += _topk(bl.segment_scores(model, rr, pop), seen, rr, kmax)
        i2i = bl.item_to_item_scores(model, h) + 1e-9 * pop
        lists["ITEM_TO_ITEM"] += _topk(i2i, seen, rr, kmax)
        lists["BUY_AGAIN"] += _topk(bl.buy_again_scores(model, rr, pop), seen, rr, kmax)
        als = bl.als_scores(model, safe[lo : lo + 256])
        als[rr < 0] = pop / max(pop.max(), 1.0)
        lists["ALS"] += _topk(als, seen, rr, kmax)
        if B is not None:
            lists["EASE"] += _topk(np.asarray(h @ B) + 1e-9 * pop, seen, rr, kmax)

    # The full pipeline, through the serving code path, asked at the time and in the context
    # (channel, device, region) of the user's first test event, as a live request would be.
    served_rungs = []
    phased_lists: list[np.ndarray] = []
    context = context_of(te_pos, [first_row[u] for u in test_users])
    for j, uid in enumerate(test_users):
        query = RankQuery(
            user_id=uid,
            num_results=kmax,
            event_time=float(first_time[uid]),
            channel=context["channel"][j],
            device=context["device"][j],
            region=context["region"][j],
        )
        res = rankers[bags[j]].rank(query)
        lists["ONE2ONE"].append(model.items.lookup(res.item_ids).astype(np.int64))
        served_rungs.append(res.rung.name)
        if phased:
            phased_lists.append(model.items.lookup(phased[bags[j]].rank(query).item_ids).astype(np.int64))
    rungs = [r for r in RUNGS if len(lists[r]) == len(test_users)]

    has_hist = np.array([r >= 0 and bool(model.user_has_history[r]) for r in urows])
    stage_arr = np.asarray(model.bundle.array("user_stage"))
    stage_names = np.array(["new", "developing", "established"])
    stages = np.where(has_hist, stage_names[stage_arr[np.maximum(urows, 0)].clip(0, 2)], "cold")
    seg_known = np.array([r >= 0 and model.user_segment[r] >= 0 for r in urows])
    groups = {
        "all": np.arange(len(test_users)),
        "warm": np.flatnonzero(has_hist),
        "cold": np.flatnonzero(~has_hist),
        "cold_with_segment": np.flatnonzero(~has_hist & seg_known),
    }
    for s in ("new", "developing", "established"):
        groups[s] = np.flatnonzero(stages == s)
    item_users = bl.distinct_counts(pos)
    n_train_users = int((np.diff(pos.indptr) > 0).sum())
    idx_truth = {j: truth[u] for j, u in enumerate(test_users)}
    result = {
        "protocol": protocol,
        "n_train_events": train.num_rows,
        "n_test_events": test.num_rows,
        "n_test_users": len(test_users),
        "rungs": rungs,
        "groups": {},
        "group_sizes": {},
        "served_rungs": {r: served_rungs.count(r) for r in sorted(set(served_rungs))},
        "requests_with_context": {f: sum(1 for v in values if v) for f, values in context.items()},
        "reranker": model.manifest["scoring"].get("training", model.manifest["scoring"].get("fallback")),
        "scoring_model": model.manifest["scoring"]["model"],
    }
    if phased:
        k10 = 10 if 10 in ecfg.ks else kmax
        one = np.array([user_metrics(lists["ONE2ONE"][j], idx_truth[j], k10)[1] for j in range(len(test_users))])
        two = np.array([user_metrics(phased_lists[j], idx_truth[j], k10)[1] for j in range(len(test_users))])
        result["phases"] = {
            "second_phase_candidates": n_second,
            # Summed over the cross-fitted bags, each ranking with its own prefix.
            "first_trees": sum(r.first_phase_trees for r in rankers),
            "trees": sum(r.scoring_trees for r in rankers),
            "k": k10,
            **paired_loss(one, two),
            "same_top_k": round(
                float(np.mean([np.array_equal(a[:k10], b[:k10]) for a, b in zip(lists["ONE2ONE"], phased_lists)])), 4
            ),
        }
    result["repeat_new"] = repeat_new_metrics(lists, rungs, idx_truth, urows, bought, ecfg.ks)
    if B is None:
        result["ease_skipped"] = f"the catalog has {n_items} items, more than {bl.EASE_MAX_ITEMS}"
    for g, members in groups.items():
        result["group_sizes"][g] = len(members)
        if len(members) == 0:
            continue
        result["groups"][g] = {
            r: summarise(
                {int(j): np.asarray(lists[r][j]) for j in members},
                idx_truth,
                [int(j) for j in members],
                ecfg.ks,
                n_items,
                item_users,
                n_train_users,
            )
            for r in rungs
        }
    return result


def repeat_new_metrics(
    lists: dict[str, list[np.ndarray]],
    rungs: list[str],
    truth: dict[int, set],
    urows: np.ndarray,
    bought: sp.csr_matrix,
    ks,
) -> dict:
    """Every rung's metrics with the truth split into repeat items (bought in training) and new ones.

    ``repeat``/``new``: recall, NDCG and AP@k over the users with such items in their truth;
    ``hits``: items of that kind in the top k, per user of all users (how many new items a
    list adds that the customer then bought).
    """
    parts: dict[str, dict[int, set]] = {"repeat": {}, "new": {}}
    for j, t in truth.items():
        r = urows[j]
        own = set(bought.indices[bought.indptr[r] : bought.indptr[r + 1]].tolist()) if r >= 0 else set()
        parts["repeat"][j] = {x for x in t if x in own}
        parts["new"][j] = t - parts["repeat"][j]
    n_all = max(len(truth), 1)
    out: dict = {"users": {name: sum(1 for t in p.values() if t) for name, p in parts.items()}}
    for rung in rungs:
        out[rung] = {}
        for name, p in parts.items():
            users = [j for j, t in p.items() if t]
            out[rung][name] = {}
            for k in ks:
                vals = np.array([user_metrics(lists[rung][j], p[j], k) for j in users]) if users else None
                hits = sum(sum(int(x) in p[j] for x in lists[rung][j][:k]) for j in users)
                out[rung][name][k] = {
                    "recall": float(vals[:, 0].mean()) if vals is not None else None,
                    "ndcg": float(vals[:, 1].mean()) if vals is not None else None,
                    "map": float(vals[:, 2].mean()) if vals is not None else None,
                    "hits": hits / n_all,
                }
    return out


def ladder_summary(results: dict, k: int = 10) -> dict:
    """The manifest's compact form: NDCG@k per rung and group for each protocol, or its error."""
    out = {}
    for name, p in results["protocols"].items():
        if "error" in p:
            out[name] = {"error": p["error"]}
            continue
        out[name] = {
            "test_users": p["group_sizes"],
            f"ndcg_at_{k}": {
                g: {r: round(m[k]["ndcg"], 4) for r, m in rungs.items()} for g, rungs in p["groups"].items()
            },
        }
        if "phases" in p:
            # ONE2ONE's NDCG@10 ranked in one phase and phased, on the same users.
            out[name]["phases"] = p["phases"]
        split = p.get("repeat_new")
        if split and split["users"]["repeat"]:
            out[name][f"ndcg_at_{k}_repeat_new"] = {
                r: {part: _round(split[r][part][k]["ndcg"]) for part in ("repeat", "new")} for r in p["rungs"]
            }
            out[name][f"new_hits_at_{k}"] = {r: round(split[r]["new"][k]["hits"], 4) for r in p["rungs"]}
    return out


def _round(v: float | None) -> float | None:
    return None if v is None else round(v, 4)
