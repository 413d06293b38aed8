"""Train the reranker on a later time window than the embeddings: learn to rank what happened next.

Each protocol's earlier part (``index_builder.splits``) is fitted once
(``index_builder.fit``) and served in memory; for every user active in the part
that came next the serving pipeline (:meth:`ranking.pipeline.ranker.Ranker.prepare`)
retrieves candidates and computes their features exactly as ``Rank`` would at
the user's first later event; the label is whether the user went on to interact
with the item. LightGBM ``lambdarank`` bags, grouped per user and each
early-stopped on its own fold of held-out users, are exported to flat arrays for
the compiled loop. The published bundle refits embeddings and tables on all the
data; the ladder evaluation reuses the same earlier fits and scores each user with
the bag that never saw them.
"""

from __future__ import annotations

import logging
import os
from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from index_builder.config import BuildConfig
from index_builder.feature_tables import context_of
from index_builder.fit import PartFit
from index_builder.rerank_cost import cost_rows, fit_ceiling, nodes_per_tree
from index_builder.rerank_phases import choose_phases
from index_builder.splits import positive_types, user_folds
from index_builder.steps import Steps
from ranking import FEATURE_NAMES, Ranker, RankingModel, RankQuery, TreeArrays, concat_trees, trees_from_lightgbm

log = logging.getLogger(__name__)


@dataclass
class RerankOutcome:
    """A trained ensemble (or why none could be trained) and the figures for the manifest.

    ``bags`` are the ensemble's members, each alone at full scale, and ``held_folds[b]``
    the user fold (``index_builder.splits.user_folds``) bag ``b`` never trained on.
    """

    trees: TreeArrays | None
    section: dict = field(default_factory=dict)
    reason: str = ""
    bags: list[TreeArrays] = field(default_factory=list)
    held_folds: list[int] = field(default_factory=list)
    n_folds: int = 0
    seed: int = 0
    # The manifest's ``phases`` section (index_builder.rerank_phases.choose_phases).
    phases: dict = field(default_factory=dict)

    def bag_phases(self, b: int) -> dict:
        """The ``phases`` section of bag ``b`` served alone (the ladder's cross-fitted rankers):
        its own prefix, and the candidate count the phases were evaluated at."""
        if not self.phases:
            return {}
        return {
            "trees_per_bag": [self.phases["trees_per_bag"][b]],
            "first_trees_per_bag": [self.phases["first_trees_per_bag"][b]],
            "second_phase_candidates": self.phases["evaluated_second_phase_candidates"],
        }

    def bag_of(self, user_ids: list[str]) -> np.ndarray:
        """The bag that never saw each user (cross-fitting), or -1 where every bag did."""
        folds = user_folds(user_ids, self.n_folds, self.seed)
        out = np.full(len(user_ids), -1, np.int64)
        for b, f in enumerate(self.held_folds):
            out[folds == f] = b
        if len(self.held_folds) > 1:
            # Every fold some training user fell in is held out by a bag; the users of
            # the other folds trained no bag at all. (One bag trained on every fold but one.)
            out[out < 0] = 0
        return out


@dataclass
class TrainingRows:
    """Candidates of every training query: features, binary labels and per-query group sizes."""

    X: np.ndarray
    y: np.ndarray
    groups: np.ndarray
    users: list[str]
    # Weight of each query (None: all equal); lambdarank scales a query's gradients by it.
    group_weights: np.ndarray | None = None


def ndcg_at(scores_by_group: list[np.ndarray], labels_by_group: list[np.ndarray], k: int) -> float:
    """Mean NDCG@k over groups (binary gains), ranking each group by score, ties by position."""
    out = []
    for s, y in zip(scores_by_group, labels_by_group):
        order = np.lexsort((np.arange(len(s)), -np.nan_to_num(s, nan=-np.inf)))[:k]
        gains = y[order] / np.log2(np.arange(2, len(order) + 2))
        ideal = (1.0 / np.log2(np.arange(2, min(k, int(y.sum())) + 2))).sum()
        out.append(gains.sum() / ideal if ideal > 0 else 0.0)
    return float(np.mean(out)) if out else 0.0


def collect_rows(
    ranker: Ranker,
    later: pa.Table,
    cfg: BuildConfig,
    positive_types: set[str] | None = None,
    attributes: dict[str, dict[str, str]] | None = None,
) -> TrainingRows:
    """Training rows from the pipeline: one query per user active in ``later``.

    Parameters
    ----------
    ranker : ranking.pipeline.ranker.Ranker
        Over the bundle built from the earlier events, computing reranker features.
    later : pyarrow.Table
        Events after the cutoff (``user_id``, ``item_id``, ``timestamp``, ``event_type``).
    cfg : BuildConfig
        ``rerank_session_share`` of the queries replay the user's first later items as
        the session (half of them anonymously, as the SESSION rung sees them), and
        ``rerank_cold_share`` are asked as a visitor known only by ``attributes``
        (the SEGMENT rung), so every rung's feature pattern is learned.
    positive_types : set of str, optional
        Event types that count as a positive label (all when None).
    attributes : dict, optional
        User id to segment attributes, for the cold queries.
    """
    m = ranker.model
    rng = np.random.default_rng(cfg.random_seed)
    later = later.sort_by([("user_id", "ascending"), ("timestamp", "ascending")])
    users = later["user_id"].to_numpy(zero_copy_only=False)
    items = m.items.lookup(later["item_id"].to_pylist())
    times = later["timestamp"].to_numpy()
    if positive_types is not None:
        keep = np.isin(later["event_type"].to_numpy(zero_copy_only=False), list(positive_types))
    else:
        keep = np.ones(len(users), bool)
    starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]])
    ends = np.r_[starts[1:], len(users)]
    if len(starts) > cfg.rerank_max_queries:
        # A random sample of users: tens of thousands of queries teach lambdarank as much
        # as a million would, at a fraction of the build time.
        pick = np.sort(rng.choice(len(starts), cfg.rerank_max_queries, replace=False))
        starts, ends = starts[pick], ends[pick]
    # Each query is asked in the context (channel, device, region) of the user's first later event.
    context = context_of(later, [int(s) for s in starts])
    Xs, ys, groups, who = [], [], [], []
    for n_query, (lo, hi) in enumerate(zip(starts, ends)):
        seq = items[lo:hi][keep[lo:hi]]
        seq = seq[seq >= 0]
        if len(seq) == 0:
            continue
        _, first = np.unique(seq, return_index=True)
        seq = seq[np.sort(first)]
        session = np.zeros(0, np.int32)
        uid, attrs = str(users[lo]), {}
        draw = rng.random()
        if len(seq) >= 2 and draw < cfg.rerank_session_share:
            n_s = int(rng.integers(1, min(3, len(seq))))
            session, seq = seq[:n_s], seq[n_s:]
            if rng.random() < 0.5:
                uid = ""
        elif draw < cfg.rerank_session_share + cfg.rerank_cold_share:
            uid, attrs = "", dict((attributes or {}).get(uid, {}))
        q = RankQuery(
            user_id=uid,
            event_time=float(times[lo]),
            attributes=attrs,
            session_item_ids=list(m.items.id_of(session)),
            channel=context["channel"][n_query],
            device=context["device"][n_query],
            region=context["region"][n_query],
        )
        prep = ranker.prepare(q)
        assert prep.mask is not None and prep.features is not None  # reranker_features=True computes both
        ok = ~prep.mask
        rows = prep.rows[ok]
        y = np.isin(rows, seq).astype(np.float32)
        # A query without a positive (or with nothing else) teaches lambdarank nothing.
        if y.sum() == 0 or y.sum() == len(y):
            continue
        Xs.append(prep.features[ok])
        ys.append(y)
        groups.append(len(y))
        who.append(str(users[lo]))
    if not groups:
        return TrainingRows(
            np.zeros((0, len(FEATURE_NAMES)), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64), []
        )
    return TrainingRows(np.concatenate(Xs), np.concatenate(ys), np.asarray(groups, np.int64), who)


def _folds(users: list[str], n_groups: int, cfg: BuildConfig) -> tuple[int, np.ndarray, list[int]]:
    """(number of folds, each query's fold, the folds held out by the bags, in bag order).

    Folds are of users (``user_folds``): every query of one user lands in one fold, in
    every protocol. One bag (``rerank_bags = 1`` or too few users) holds out the users
    of the first non-empty fold of ``round(1 / rerank_valid_share)``.
    """
    n_bags = max(1, min(cfg.rerank_bags, n_groups // 2))
    if n_bags > 1:
        fold = user_folds(users, n_bags, cfg.random_seed)
        held = sorted(int(f) for f in np.unique(fold))
        if len(held) >= 2:
            return n_bags, fold, held
    n_folds = max(2, round(1.0 / cfg.rerank_valid_share))
    fold = user_folds(users, n_folds, cfg.random_seed)
    present = np.unique(fold)
    if len(present) < 2:
        raise ValueError(f"all {len(set(users))} training users fall in one fold: none can be held out")
    return n_folds, fold, [int(present[0])]


def _fit_bag(rows: TrainingRows, fold: np.ndarray, row_fold: np.ndarray, f: int, seed: int, cfg: BuildConfig):
    """One bag: trained on every user fold but ``f``, early-stopped on ``f``, cut to its best iteration."""
    import lightgbm as lgb

    params = {
        "objective": "lambdarank",
        "metric": "ndcg",
        "ndcg_eval_at": [10],
        "num_leaves": cfg.rerank_leaves,
        "learning_rate": cfg.rerank_learning_rate,
        "min_data_in_leaf": cfg.rerank_min_data_in_leaf,
        "feature_fraction": 0.9,
        "lambdarank_truncation_level": 20,
        "verbose": -1,
        "seed": seed,
        # Every allowed core: faster than one thread per bag, and bags in forked processes
        # hung in libgomp after the fork (bench/README.md, "Build time"). Deterministic
        # with row-wise histograms keeps one machine's builds identical.
        "deterministic": True,
        "force_row_wise": True,
        "num_threads": len(os.sched_getaffinity(0)),
    }
    tr, va = row_fold != f, row_fold == f
    weight = None if rows.group_weights is None else np.repeat(rows.group_weights, rows.groups)[tr]
    dtrain = lgb.Dataset(
        rows.X[tr],
        rows.y[tr],
        group=rows.groups[fold != f],
        weight=weight,
        feature_name=list(FEATURE_NAMES),
        free_raw_data=False,
    )
    dvalid = lgb.Dataset(rows.X[va], rows.y[va], group=rows.groups[fold == f], reference=dtrain)
    booster = lgb.train(
        params,
        dtrain,
        num_boost_round=cfg.rerank_trees,
        valid_sets=[dvalid],
        callbacks=[lgb.early_stopping(cfg.rerank_early_stopping, verbose=False)],
    )
    return _truncated(booster)


def fit_lambdarank(rows: TrainingRows, cfg: BuildConfig) -> tuple[list, dict, tuple[int, list[int]]]:
    """Fit ``rerank_bags`` LightGBM lambdarank models, one per fold of users held out.

    Each model is early-stopped on its own held-out fold, and that fold's
    out-of-fold predictions give the held-out figures, so no reported figure was
    seen in training. Averaging the models (the exported ensemble) lowers the
    variance a single small-data fit has.

    Returns
    -------
    (boosters, figures, folds)
        The models, each cut to its best iteration, JSON-ready figures, and
        ``(n_folds, held_folds)``: bag ``b`` never trained on user fold ``held_folds[b]``.
    """

    n_groups = len(rows.groups)
    n_folds, fold, held_folds = _folds(rows.users, n_groups, cfg)
    bounds = np.r_[0, np.cumsum(rows.groups)]
    row_fold = np.repeat(fold, rows.groups)
    boosters = [_fit_bag(rows, fold, row_fold, f, cfg.random_seed + b, cfg) for b, f in enumerate(held_folds)]
    held = np.flatnonzero(np.isin(fold, held_folds))
    labels = [rows.y[bounds[g] : bounds[g + 1]] for g in held]
    feats = [rows.X[bounds[g] : bounds[g + 1]] for g in held]

    def held_out_ndcg(models: list) -> float:
        # Each bag scores the fold it never trained on: no figure was seen in training.
        oof = np.full(len(rows.y), np.nan)
        for booster, f in zip(models, held_folds):
            oof[row_fold == f] = booster.predict(rows.X[row_fold == f])
        return round(ndcg_at([oof[bounds[g] : bounds[g + 1]] for g in held], labels, 10), 4)

    ndcg = held_out_ndcg(boosters)
    boosters, cost = _bounded(boosters, rows, cfg, held_out_ndcg, ndcg)
    if cost["cut"]:
        ndcg = cost["held_out_ndcg_at_10_after_cut"]
    # Phased scoring's first phase, chosen on the same held-out queries, each scored by its own bag.
    bag_index = {f: b for b, f in enumerate(held_folds)}
    phases = choose_phases(
        boosters,
        [(bag_index[int(fold[g])], rows.X[bounds[g] : bounds[g + 1]], rows.y[bounds[g] : bounds[g + 1]]) for g in held],
        cfg.rerank_second_phase_candidates,
        cfg.rerank_phase_recall,
    )
    col = {n: j for j, n in enumerate(FEATURE_NAMES)}
    gain = sum(b.feature_importance("gain") for b in boosters) / len(boosters)
    figures = {
        "bags": len(boosters),
        "held_out_users": len(held),
        "rows": len(rows.y),
        "trees_per_bag": [int(b.num_trees()) for b in boosters],
        "serving_cost": cost,
        "phases": phases,
        "held_out_ndcg_at_10": {
            "reranker": ndcg,
            **{
                f"by_{n}": round(ndcg_at([x[:, col[n]] for x in feats], labels, 10), 4)
                for n in ("als_score", "ease_score", "covis_user", "popularity", "popularity_30d")
            },
            "retrieval_order": round(ndcg_at([-np.arange(len(x), dtype=float) for x in feats], labels, 10), 4),
        },
        "feature_importance_gain": {n: round(float(v), 2) for n, v in zip(FEATURE_NAMES, gain)},
    }
    return boosters, figures, (n_folds, held_folds)


def _bounded(boosters: list, rows: TrainingRows, cfg: BuildConfig, held_out_ndcg, ndcg: float) -> tuple[list, dict]:
    """The bags cut to fit ``rerank_max_tree_nodes_per_candidate``, and the manifest's ``serving_cost``.

    The exported ensemble walks every tree of every bag for each candidate, so its cost is
    the sum over the bags of each tree's mean depth on the training rows. Over the ceiling,
    every bag keeps the same share of its first trees (``rerank_cost.fit_ceiling``), and the
    held-out NDCG@10 is measured again so the manifest shows what the cut cost.
    """
    X = cost_rows(rows.X, cfg.random_seed)
    per_tree = [nodes_per_tree(b, X) for b in boosters]
    before = [len(c) for c in per_tree]
    ceiling = cfg.rerank_max_tree_nodes_per_candidate
    keep = fit_ceiling(per_tree, ceiling)
    cost: dict = {"ceiling_nodes_per_candidate": ceiling, "cut": keep != before, "cost_rows": len(X)}
    if keep != before:
        boosters = [_truncated(b, n) for b, n in zip(boosters, keep)]
        cost["trees_per_bag_before_cut"] = before
        cost["nodes_per_candidate_before_cut"] = round(float(sum(c.sum() for c in per_tree)), 1)
        cost["held_out_ndcg_at_10_before_cut"] = ndcg
        cost["held_out_ndcg_at_10_after_cut"] = held_out_ndcg(boosters)
    nodes = float(sum(c[:n].sum() for c, n in zip(per_tree, keep)))
    cost["trees"] = int(sum(keep))
    cost["nodes_per_candidate"] = round(nodes, 1)
    # What one request's scoring walks at the pipeline's candidate count (eval_candidates).
    cost["n_candidates"] = cfg.eval_candidates
    cost["nodes_per_request"] = round(nodes * cfg.eval_candidates)
    cost["met"] = ceiling <= 0 or nodes <= ceiling
    if keep != before:
        log.info(
            "reranker cut to %s trees per bag (from %s): %.0f nodes per candidate fit the ceiling of %d; "
            "held-out NDCG@10 %.4f before the cut, %.4f after",
            keep,
            before,
            nodes,
            ceiling,
            ndcg,
            cost["held_out_ndcg_at_10_after_cut"],
        )
    if not cost["met"]:
        log.warning(
            "the reranker walks %.0f nodes per candidate with one tree per bag, above "
            "rerank_max_tree_nodes_per_candidate = %d: raise the ceiling or lower rerank_bags",
            nodes,
            ceiling,
        )
    return boosters, cost


def split_weights(n_groups: list[int], protocols: tuple[str, ...], cfg: BuildConfig) -> np.ndarray | None:
    """Per-query weights giving the temporal split ``rerank_temporal_share`` of the training weight.

    The last-N split has a query for nearly every user, the temporal one only for users
    active after the cutoff, so unweighted the realistic protocol (rank what happens
    after the data ends, as a server does) would be a small minority of what is learned.
    Weights average 1, so LightGBM's other settings keep their meaning.
    """
    if len(n_groups) < 2 or "temporal" not in protocols or min(n_groups) == 0:
        return None
    # The other splits share the rest equally.
    rest = (1.0 - cfg.rerank_temporal_share) / max(len(protocols) - 1, 1)
    share = {p: (cfg.rerank_temporal_share if p == "temporal" else rest) for p in protocols}
    total = sum(n_groups)
    w = np.concatenate([np.full(n, share[p] * total / n) for n, p in zip(n_groups, protocols)])
    return (w / w.mean()).astype(np.float64)


def train_reranker(
    parts: list[PartFit],
    failed: list[str],
    attributes: dict[str, dict[str, str]],
    cfg: BuildConfig,
    steps: Steps | None = None,
) -> RerankOutcome:
    """Learn to rank what came next from each protocol's earlier part, fitted once.

    Parameters
    ----------
    parts : list of PartFit
        The protocols of ``rerank_split`` that could be cut, each fitted on its earlier part.
    failed : list of str
        Why the other protocols of ``rerank_split`` could not be cut (for the reason).
    attributes : dict
        User id to segment attributes, for the cold queries.
    cfg : BuildConfig
    steps : Steps, optional
        Times the steps ``rerank rows`` and ``rerank fit``.

    Returns
    -------
    RerankOutcome
        ``trees`` is None, with ``reason``, when the data cannot support a reranker.
    """

    def step(name: str):
        return steps.step(name) if steps is not None else nullcontext()

    section: dict = {
        "split": cfg.rerank_split,
        "cutoff_quantile": cfg.rerank_cutoff_quantile,
        "holdout": cfg.rerank_holdout,
    }
    collected: list[TrainingRows] = []
    with step("rerank rows"):
        for part in parts:
            ranker = Ranker(part.model, reranker_features=True)
            rows = collect_rows(ranker, part.later, cfg, positive_types(part.later, cfg), attributes)
            section[part.protocol.name] = {
                "earlier_events": part.earlier.num_rows,
                "later_events": part.later.num_rows,
                "groups": len(rows.groups),
            }
            collected.append(rows)
    rows = TrainingRows(
        np.concatenate([p.X for p in collected]) if collected else np.zeros((0, len(FEATURE_NAMES)), np.float32),
        np.concatenate([p.y for p in collected]) if collected else np.zeros(0, np.float32),
        np.concatenate([p.groups for p in collected]) if collected else np.zeros(0, np.int64),
        [u for p in collected for u in p.users],
    )
    rows.group_weights = split_weights([len(p.groups) for p in collected], tuple(p.protocol.name for p in parts), cfg)
    section["groups"] = len(rows.groups)
    if len(rows.groups) < cfg.rerank_min_groups:
        why = "; ".join(failed) or (
            f"only {len(rows.groups)} later-window users have a positive among their "
            f"candidates (rerank_min_groups = {cfg.rerank_min_groups})"
        )
        return RerankOutcome(None, section, why)
    try:
        with step("rerank fit"):
            boosters, figures, (n_folds, held_folds) = fit_lambdarank(rows, cfg)
    except ValueError as exc:
        return RerankOutcome(None, section, str(exc))
    phases = figures.pop("phases")
    section.update(figures)
    trees = concat_trees([trees_from_lightgbm(b, scale=1.0 / len(boosters)) for b in boosters])
    section["n_trees"] = trees.n_trees
    return RerankOutcome(
        trees,
        section,
        bags=[trees_from_lightgbm(b, scale=1.0) for b in boosters],
        held_folds=held_folds,
        n_folds=n_folds,
        seed=cfg.random_seed,
        phases=phases,
    )


def attributes_of(users: pa.Table | None, model: RankingModel) -> dict[str, dict[str, str]]:
    """Each user's values of the segment variables, as a cold visitor would state them."""
    if users is None or not model.segments.columns:
        return {}
    cols = {c: users[c].cast(pa.string()).to_pylist() for c in model.segments.columns}
    return {
        uid: {c: cols[c][j] for c in cols if cols[c][j] is not None}
        for j, uid in enumerate(users["user_id"].to_pylist())
    }


def _truncated(booster, n_trees: int | None = None):
    """The booster cut to its first ``n_trees`` (by default its best iteration, so the exported
    trees are the early-stopped model)."""
    import lightgbm as lgb

    keep = n_trees or booster.best_iteration or booster.num_trees()
    return lgb.Booster(model_str=booster.model_to_string(num_iteration=keep))
