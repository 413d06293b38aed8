"""Train the reranker on a later time window than the embeddings: learn to rank what happened next.

Events before a cutoff (``rerank_cutoff_quantile`` of the timestamps) build an
ordinary bundle; for every user active after the cutoff the serving pipeline
(:meth:`ranking.pipeline.Ranker.prepare`) retrieves candidates and computes
their features from that bundle exactly as ``Rank`` would at the user's first
later event; the label is whether the user went on to interact with the item.
A LightGBM ``lambdarank`` model, grouped per user and early-stopped on
held-out users, is exported to flat arrays for the compiled loop. The bundle
that is finally published refits embeddings and tables on all the data.
"""
from __future__ import annotations

import dataclasses
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from index_builder.config import BuildConfig
from index_builder.feature_tables import context_of
from ranking import FEATURE_NAMES, TreeArrays

log = logging.getLogger(__name__)


@dataclass
class RerankOutcome:
    """A trained ensemble (or why none could be trained) and the figures for the manifest."""

    trees: TreeArrays | None
    section: dict = field(default_factory=dict)
    reason: str = ""


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


def collect_rows(ranker, later: pa.Table, cfg: BuildConfig, positive_types: set[str] | None = None,
                 attributes: dict[str, dict[str, str]] | None = None) -> TrainingRows:
    """Training rows from the pipeline: one query per user active in ``later``.

    Parameters
    ----------
    ranker : ranking.pipeline.Ranker
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
    from ranking import RankQuery

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
        q = RankQuery(user_id=uid, event_time=float(times[lo]), attributes=attrs,
                      session_item_ids=list(m.items.id_of(session)),
                      **{f: values[n_query] for f, values in context.items()})
        prep = ranker.prepare(q)
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
        return TrainingRows(np.zeros((0, len(FEATURE_NAMES)), np.float32), np.zeros(0, np.float32),
                            np.zeros(0, np.int64), [])
    return TrainingRows(np.concatenate(Xs), np.concatenate(ys), np.asarray(groups, np.int64), who)


def fit_lambdarank(rows: TrainingRows, cfg: BuildConfig) -> tuple[list, dict]:
    """Fit ``rerank_bags`` LightGBM lambdarank models, one per fold of users held out.

    Each model is early-stopped on its own held-out fold, and that fold's
    out-of-fold predictions give the held-out figures, so no reported figure was
    seen in training. Averaging the models (the exported ensemble) lowers the
    variance a single small-data fit has.

    Returns
    -------
    (boosters, figures)
        The models, each cut to its best iteration, and JSON-ready figures.
    """
    import lightgbm as lgb

    rng = np.random.default_rng(cfg.random_seed)
    n_groups = len(rows.groups)
    n_bags = max(1, min(cfg.rerank_bags, n_groups // 2))
    if n_bags == 1:
        fold = (rng.random(n_groups) < cfg.rerank_valid_share).astype(np.int64)
        fold[0] = 1 if not fold.any() else fold[0]
        held_folds = [1]
    else:
        fold = rng.permutation(n_groups) % n_bags
        held_folds = list(range(n_bags))
    bounds = np.r_[0, np.cumsum(rows.groups)]
    row_fold = np.repeat(fold, rows.groups)
    oof = np.full(len(rows.y), np.nan)
    boosters = []
    for b, f in enumerate(held_folds):
        params = {
            "objective": "lambdarank", "metric": "ndcg", "ndcg_eval_at": [10],
            "num_leaves": cfg.rerank_leaves, "learning_rate": cfg.rerank_learning_rate,
            "min_data_in_leaf": cfg.rerank_min_data_in_leaf, "feature_fraction": 0.9,
            "lambdarank_truncation_level": 20, "verbose": -1, "seed": cfg.random_seed + b,
            "deterministic": True, "num_threads": 1,
        }
        tr, va = row_fold != f, row_fold == f
        weight = None if rows.group_weights is None else np.repeat(rows.group_weights, rows.groups)[tr]
        dtrain = lgb.Dataset(rows.X[tr], rows.y[tr], group=rows.groups[fold != f], weight=weight,
                             feature_name=list(FEATURE_NAMES), free_raw_data=False)
        dvalid = lgb.Dataset(rows.X[va], rows.y[va], group=rows.groups[fold == f], reference=dtrain)
        booster = lgb.train(params, dtrain, num_boost_round=cfg.rerank_trees, valid_sets=[dvalid],
                            callbacks=[lgb.early_stopping(cfg.rerank_early_stopping, verbose=False)])
        booster = _truncated(booster)
        oof[va] = booster.predict(rows.X[va])
        boosters.append(booster)

    held = np.flatnonzero(np.isin(fold, held_folds))
    labels = [rows.y[bounds[g]:bounds[g + 1]] for g in held]
    feats = [rows.X[bounds[g]:bounds[g + 1]] for g in held]
    pred = [oof[bounds[g]:bounds[g + 1]] for g in held]
    col = {n: j for j, n in enumerate(FEATURE_NAMES)}
    gain = sum(b.feature_importance("gain") for b in boosters) / len(boosters)
    figures = {
        "bags": len(boosters), "held_out_users": int(len(held)), "rows": int(len(rows.y)),
        "trees_per_bag": [int(b.num_trees()) for b in boosters],
        "held_out_ndcg_at_10": {
            "reranker": round(ndcg_at(pred, labels, 10), 4),
            **{f"by_{n}": round(ndcg_at([x[:, col[n]] for x in feats], labels, 10), 4)
               for n in ("als_score", "ease_score", "covis_user", "popularity", "popularity_30d")},
            "retrieval_order": round(ndcg_at([-np.arange(len(x), dtype=float) for x in feats], labels, 10), 4),
        },
        "feature_importance_gain": {n: round(float(v), 2) for n, v in zip(FEATURE_NAMES, gain)},
    }
    return boosters, figures


def split_weights(n_groups: list[int], protocols: tuple[str, ...], cfg: BuildConfig) -> np.ndarray | None:
    """Per-query weights giving the temporal split ``rerank_temporal_share`` of the training weight.

    The last-N split has a query for nearly every user, the temporal one only for users
    active after the cutoff, so unweighted the realistic protocol (rank what happens
    after the data ends, as a server does) would be a small minority of what is learned.
    Weights average 1, so LightGBM's other settings keep their meaning.
    """
    if len(n_groups) < 2 or "temporal" not in protocols or min(n_groups) == 0:
        return None
    share = {p: (cfg.rerank_temporal_share if p == "temporal" else 1.0 - cfg.rerank_temporal_share)
             for p in protocols}
    total = sum(n_groups)
    w = np.concatenate([np.full(n, share[p] * total / n) for n, p in zip(n_groups, protocols)])
    return (w / w.mean()).astype(np.float64)


def train_reranker(events: pa.Table, items: Path, users: Path | None, cfg: BuildConfig) -> RerankOutcome:
    """Split ``events`` at the cutoff, build a bundle on the past, learn to rank the future.

    Parameters
    ----------
    events : pyarrow.Table
        Validated events (as ``index_builder.io.read_events`` returns them).
    items, users : Path
        The catalog and user attribute files of the build.
    cfg : BuildConfig

    Returns
    -------
    RerankOutcome
        ``trees`` is None, with ``reason``, when the data cannot support a reranker.
    """
    from index_builder.build import build
    from ranking import Ranker, RankingModel, concat_trees, trees_from_lightgbm

    from index_builder.evaluate import EvalConfig, EvaluationError, split

    splits = ("temporal", "last_n") if cfg.rerank_split == "both" else (cfg.rerank_split,)
    section: dict = {"split": cfg.rerank_split, "cutoff_quantile": cfg.rerank_cutoff_quantile,
                     "holdout": cfg.rerank_holdout}
    positive_types = {t for t in pc.unique(events["event_type"]).to_pylist()
                      if cfg.event_weights.get(t, cfg.default_event_weight) > 0}
    # The inner bundle only supplies features: no reranker of its own, no ladder report.
    inner = dataclasses.replace(cfg, rerank=False, ladder_report=False)
    parts: list[TrainingRows] = []
    reasons = []
    for protocol in splits:
        try:
            earlier, later = split(events, protocol, EvalConfig(cutoff_quantile=cfg.rerank_cutoff_quantile,
                                                                holdout=cfg.rerank_holdout, build=cfg))
        except EvaluationError as exc:
            reasons.append(str(exc))
            continue
        with tempfile.TemporaryDirectory(prefix="one2one-rerank-") as tmp:
            path = Path(tmp) / "earlier.parquet"
            pq.write_table(earlier, path)
            bundle = build(path, items, users, Path(tmp) / "bundle", inner, show_progress=False)
            model = RankingModel(bundle, verify=False)
            ranker = Ranker(model, reranker_features=True)
            rows = collect_rows(ranker, later, cfg, positive_types, _attributes(users, model, cfg))
        section[protocol] = {"earlier_events": earlier.num_rows, "later_events": later.num_rows,
                             "groups": int(len(rows.groups))}
        parts.append(rows)
    rows = TrainingRows(
        np.concatenate([p.X for p in parts]) if parts else np.zeros((0, len(FEATURE_NAMES)), np.float32),
        np.concatenate([p.y for p in parts]) if parts else np.zeros(0, np.float32),
        np.concatenate([p.groups for p in parts]) if parts else np.zeros(0, np.int64),
        [u for p in parts for u in p.users])
    rows.group_weights = split_weights([len(p.groups) for p in parts], splits[:len(parts)], cfg)
    section["groups"] = int(len(rows.groups))
    if len(rows.groups) < cfg.rerank_min_groups:
        why = "; ".join(reasons) or (f"only {len(rows.groups)} later-window users have a positive among their "
                                     f"candidates (rerank_min_groups = {cfg.rerank_min_groups})")
        return RerankOutcome(None, section, why)
    boosters, figures = fit_lambdarank(rows, cfg)
    section.update(figures)
    trees = concat_trees([trees_from_lightgbm(b, scale=1.0 / len(boosters)) for b in boosters])
    section["n_trees"] = trees.n_trees
    return RerankOutcome(trees, section)


def _attributes(users: Path | None, model, cfg: BuildConfig) -> dict[str, dict[str, str]]:
    """Each user's values of the segment variables, as a cold visitor would state them."""
    if users is None or not model.segments.columns:
        return {}
    from index_builder import io as bio

    table, _ = bio.read_users(users, bio.ReadOptions(on_bad_row=cfg.on_bad_row,
                                                     max_bad_fraction=cfg.max_bad_fraction))
    cols = {c: table[c].cast(pa.string()).to_pylist() for c in model.segments.columns}
    return {uid: {c: cols[c][j] for c in cols if cols[c][j] is not None}
            for j, uid in enumerate(table["user_id"].to_pylist())}


def _truncated(booster):
    """The booster cut to its best iteration, so the exported trees are the early-stopped model."""
    import lightgbm as lgb

    best = booster.best_iteration or booster.num_trees()
    return lgb.Booster(model_str=booster.model_to_string(num_iteration=best))
