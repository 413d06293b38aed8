"""One offline build: read, weight, train, index, evaluate, publish a bundle version."""
from __future__ import annotations

import datetime as _dt
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import scipy.sparse as sp
from tqdm import tqdm

from index_builder import io as bio
from index_builder.config import BuildConfig
from index_builder.feature_tables import context_codes, context_tables, feature_tables
from index_builder.profile import data_profile
from index_builder.tables import (
    choose_scheme, consumed_csr, distinct_user_counts, item_categories, item_prices, log_scaled,
    segment_tables, top_rows,
)
from index_builder.train import DAY, confidence_matrix, event_weights, train_als
from ranking import (CONTEXT_FIELDS, DEFAULT_EXACT_HEAD_ITEMS, FEATURES, FEATURE_NAMES,
    BundleWriter, ExactHead, add_trees, ann_search, item_gram)

log = logging.getLogger(__name__)


@dataclass
class Inputs:
    """Validated input tables and what reading them skipped."""

    events: pa.Table
    items: pa.Table
    users: pa.Table | None
    skipped: dict


def read_inputs(events: Path | list[Path], items: Path, users: Path | None, cfg: BuildConfig) -> Inputs:
    """Read and validate the three inputs; an InputError names file, row and column.

    ``events`` may be several sources (files or event log directories), e.g. the history
    export and the server's log since; their events are concatenated.
    """
    opts = bio.ReadOptions(on_bad_row=cfg.on_bad_row, max_bad_fraction=cfg.max_bad_fraction)
    sources = events if isinstance(events, list) else [events]
    read = [bio.read_events(p, opts) for p in sources]
    ev = pa.concat_tables([t for t, _ in read])
    ev_rep = read[0][1].to_dict() if len(read) == 1 else {str(p): r.to_dict() for p, (_, r) in zip(sources, read)}
    it, it_rep = bio.read_items(items, opts)
    us, us_rep = bio.read_users(users, opts) if users is not None else (None, None)
    skipped = {"events": ev_rep, "items": it_rep.to_dict()}
    if us_rep is not None:
        skipped["users"] = us_rep.to_dict()
    return Inputs(ev, it, us, skipped)


def build_index(item_factors: np.ndarray, cfg: BuildConfig) -> faiss.Index:
    """A FAISS inner-product index of the item factors, of the configured factory type."""
    d = item_factors.shape[1]
    try:
        index = faiss.index_factory(d, cfg.index_type, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        raise ValueError(f"index_type {cfg.index_type!r} is not a FAISS index factory string: {exc}") from None
    base = faiss.downcast_index(index)
    if isinstance(base, faiss.IndexHNSW):
        base.hnsw.efConstruction = cfg.hnsw_ef_construction
    if not index.is_trained:
        # k-means on a sample: 64 points per list is plenty, and all of them would take
        # minutes at a million items.
        n_lists = getattr(faiss.extract_index_ivf(index), "nlist", 0) if "IVF" in cfg.index_type else 0
        train = item_factors
        if n_lists and len(item_factors) > 64 * n_lists:
            rng = np.random.default_rng(cfg.random_seed)
            train = item_factors[rng.choice(len(item_factors), 64 * n_lists, replace=False)]
        index.train(train)
    index.add(item_factors)
    return index


def ann_recall(index: faiss.Index, item_factors: np.ndarray, queries: np.ndarray, k: int, effort: int) -> float:
    """Mean recall@k of the ANN index against exact inner-product search."""
    if len(queries) == 0 or k == 0:
        return float("nan")
    exact = faiss.IndexFlatIP(item_factors.shape[1])
    exact.add(item_factors)
    k = min(k, index.ntotal)
    _, truth = exact.search(queries, k)
    _, got = ann_search(index, queries, k, effort)
    hits = [len(np.intersect1d(t[t >= 0], g[g >= 0])) / max(1, (t >= 0).sum()) for t, g in zip(truth, got)]
    return float(np.mean(hits))


def exact_head_share(item_factors: np.ndarray, queries: np.ndarray, k: int,
                     size: int = DEFAULT_EXACT_HEAD_ITEMS) -> float:
    """Share of queries whose exact top-k the server's exact head (the ``size`` largest-norm
    items, ``ranking.retrieval.ExactHead``) proves; the rest are served by the ANN index."""
    if len(queries) == 0 or k == 0:
        return float("nan")
    head = ExactHead(item_factors, size)
    if k > head.size:
        return 0.0
    return float(head.search(np.ascontiguousarray(queries, dtype=np.float32), k)[2].mean())


def _scoring_section(events: pa.Table, items: Path, users: Path | None, cfg: BuildConfig) -> dict:
    """The manifest's ``scoring`` section: the learned reranker, or the linear fallback and why.

    The tree arrays travel under the private key ``_trees`` until the writer stores them.
    """
    if cfg.rerank:
        from index_builder.rerank_train import train_reranker

        outcome = train_reranker(events, items, users, cfg)
        if outcome.trees is not None:
            return {"model": "trees", "features": list(FEATURE_NAMES), "training": outcome.section,
                    "_trees": outcome.trees}
        log.warning("no reranker trained (%s); scoring with the linear fallback", outcome.reason)
        fallback = {"reason": outcome.reason, "training": outcome.section}
    else:
        fallback = {"reason": "rerank = false"}
    sw = cfg.scoring_weights
    return {"model": "linear", "features": list(FEATURES), "weights": [float(sw.get(f, 0.0)) for f in FEATURES],
            "bias": 0.0, "fallback": fallback}


def _ladder_section(events: Path, items: Path, users: Path | None, cfg: BuildConfig) -> dict:
    """NDCG@10 of every rung under both protocols (``index_builder.evaluate``), or why it was not run."""
    if not cfg.ladder_report:
        return {"skipped": "ladder_report = false"}
    import dataclasses

    from index_builder.evaluate import EvalConfig, ladder_summary, run_all

    inner = dataclasses.replace(cfg, ladder_report=False)
    return ladder_summary(run_all(events, items, users, EvalConfig(build=inner)))


def _context_codes(ev: pa.Table, positive: np.ndarray, cfg: BuildConfig) -> dict[str, tuple]:
    """Each context field's per-event codes and vocabulary; none at all with ``context_features = false``."""
    if not cfg.context_features:
        none = (np.full(ev.num_rows, -1, np.int16), np.zeros(0, str), False)
        return {f: none for f in CONTEXT_FIELDS}
    return {f: context_codes(ev[f], positive, cfg.context_vocabulary) for f in CONTEXT_FIELDS}


def _iso(ts: int) -> str:
    return _dt.datetime.fromtimestamp(int(ts), _dt.timezone.utc).isoformat()


def build(events: Path | list[Path], items: Path, users: Path | None, out: Path, cfg: BuildConfig,
          show_progress: bool = True) -> Path:
    """Build and publish one bundle version under ``out``.

    Returns
    -------
    Path
        The published version directory (``out/<version>``), now named by ``out/CURRENT``.

    Raises
    ------
    index_builder.io.InputError
        An input file is malformed (names file, row and column). Nothing is published.
    ValueError
        The inputs are consistent but unusable (no event matches a catalog item, a bad setting).
    """
    from ranking import RankerConfig

    t_start = time.perf_counter()
    steps = tqdm(total=7, desc="build", unit="step", disable=not show_progress)
    inp = read_inputs(events, items, users, cfg)
    steps.set_postfix_str("read"); steps.update()

    item_ids = inp.items["item_id"].combine_chunks()
    ev = inp.events
    item_idx = pc.index_in(ev["item_id"], value_set=item_ids)
    unknown_items = int(item_idx.null_count)
    if unknown_items:
        keep = pc.is_valid(item_idx)
        ev = ev.filter(keep)
        item_idx = item_idx.filter(keep)
        log.warning("dropped %d events whose item_id is not in %s", unknown_items, items)
    if ev.num_rows == 0:
        raise ValueError(f"no event in {events} names an item of {items}: nothing to learn from")
    event_users = pc.unique(ev["user_id"].combine_chunks()).sort()
    extra_users = pa.array([], pa.string())
    if inp.users is not None:
        file_users = inp.users["user_id"].combine_chunks()
        extra_users = pc.filter(file_users, pc.invert(pc.is_in(file_users, value_set=event_users)))
    user_ids = pa.concat_arrays([event_users, extra_users.cast(pa.string())])
    n_users, n_items = len(user_ids), inp.items.num_rows
    u = pc.index_in(ev["user_id"], value_set=user_ids).to_numpy(zero_copy_only=False).astype(np.int32)
    i = item_idx.to_numpy(zero_copy_only=False).astype(np.int32)
    ts = ev["timestamp"].to_numpy()
    t_begin, t_end = int(ts.min()), int(ts.max())

    w = event_weights(ev, cfg, t_end)
    conf = confidence_matrix(u, i, w, n_users, n_items)
    steps.set_postfix_str("weights"); steps.update()

    user_factors, item_factors = train_als(conf, cfg, show_progress=show_progress)
    has_history = (np.diff(conf.indptr) > 0).astype(np.uint8)
    steps.set_postfix_str("als"); steps.update()

    positive = w > 0
    pop = log_scaled(distinct_user_counts(u[positive], i[positive], n_users, n_items))
    recent = positive & (ts >= t_end - cfg.recent_days * DAY)
    recent_pop = log_scaled(distinct_user_counts(u[recent], i[recent], n_users, n_items))
    sw = cfg.scoring_weights
    popular = top_rows(sw.get("popularity", 1.0) * pop + sw.get("recent_popularity", 0.0) * recent_pop,
                       cfg.popular_top_items)
    is_consumed = pc.is_in(ev["event_type"], value_set=pa.array(cfg.consumed_event_types, pa.string()))
    cmask = is_consumed.to_numpy(zero_copy_only=False)
    consumed_indptr, consumed_indices = consumed_csr(u[cmask], i[cmask], n_users, n_items)
    cat_indptr, cat_ids, cat_names = item_categories(inp.items)

    scheme = choose_scheme(inp.users, cfg)
    attrs: list[dict[str, str]] = [{} for _ in range(n_users)]
    if inp.users is not None and scheme.columns:
        rows = pc.index_in(inp.users["user_id"], value_set=user_ids).to_numpy(zero_copy_only=False)
        cols = {c: inp.users[c].cast(pa.string()).to_pylist() for c in scheme.columns}
        for j, r in enumerate(rows):
            attrs[int(r)] = {c: cols[c][j] for c in scheme.columns if cols[c][j] is not None}
    pos_matrix = sp.csr_matrix((np.ones(int(positive.sum()), np.float32), (u[positive], i[positive])),
                               shape=(n_users, n_items))
    pos_matrix.data[:] = 1.0
    pos_matrix.sum_duplicates()
    pos_matrix.data[:] = 1.0
    seg = segment_tables(scheme, attrs, pos_matrix, cfg)
    steps.set_postfix_str("tables"); steps.update()

    ftables = feature_tables(u, i, ts, positive, cmask, n_users, n_items, cat_indptr, cat_ids, len(cat_names),
                             item_prices(inp.items), recent_pop, cfg)
    ftables.update(context_tables(u, i, positive, _context_codes(ev, positive, cfg), n_users, n_items))
    scoring_section = _scoring_section(ev, items, users, cfg)

    index = build_index(item_factors, cfg)
    steps.set_postfix_str("index"); steps.update()

    rng = np.random.default_rng(cfg.random_seed)
    with_hist = np.flatnonzero(has_history)
    sample = rng.choice(with_hist, size=min(cfg.eval_users, len(with_hist)), replace=False)
    rcfg = RankerConfig()
    recall = ann_recall(index, item_factors, user_factors[sample], min(cfg.eval_candidates, n_items), rcfg.ann_effort)
    head_share = exact_head_share(item_factors, user_factors[sample], min(cfg.eval_candidates, n_items),
                                  rcfg.exact_head_items)
    steps.set_postfix_str("evaluate"); steps.update()

    uid_np = np.asarray(user_ids.to_pylist(), dtype=str)
    iid_np = np.asarray(item_ids.to_pylist(), dtype=str)
    with BundleWriter(out) as wr:
        wr.add_array("item_ids", iid_np)
        wr.add_array("item_order", np.argsort(iid_np, kind="stable").astype(np.int32))
        wr.add_array("user_ids", uid_np)
        wr.add_array("user_order", np.argsort(uid_np, kind="stable").astype(np.int32))
        wr.add_array("item_factors", item_factors)
        wr.add_array("user_factors", user_factors)
        gram, inv_norms = item_gram(item_factors)
        wr.add_array("item_gram", gram)
        wr.add_array("item_inv_norms", inv_norms)
        wr.add_array("user_has_history", has_history)
        wr.add_array("user_segment", seg.user_segment)
        wr.add_array("item_popularity", pop)
        wr.add_array("item_recent_popularity", recent_pop)
        wr.add_array("item_price", item_prices(inp.items))
        wr.add_array("item_cat_indptr", cat_indptr)
        wr.add_array("item_cat_ids", cat_ids)
        wr.add_array("category_names", cat_names)
        wr.add_array("popular_items", popular)
        wr.add_array("consumed_indptr", consumed_indptr)
        wr.add_array("consumed_indices", consumed_indices)
        wr.add_array("segment_keys", seg.keys)
        wr.add_array("segment_pop_indptr", seg.indptr)
        wr.add_array("segment_pop_items", seg.items)
        wr.add_array("segment_pop_scores", seg.scores)
        for name, arr in ftables.items():
            wr.add_array(name, arr)
        if scoring_section["model"] == "trees":
            add_trees(wr, scoring_section.pop("_trees"))
        faiss.write_index(index, str(wr.path("index.faiss")))
        pq.write_table(inp.items, wr.path("items.parquet"))
        manifest = {
            "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(),
            "config": cfg.to_dict(),
            "inputs": {"events": [str(p) for p in events] if isinstance(events, list) else str(events), "items": str(items), "users": str(users) if users else None},
            "data_window": {"start": _iso(t_begin), "end": _iso(t_end), "start_unix": t_begin, "end_unix": t_end},
            "counts": {
                "events": ev.num_rows, "events_unknown_item": unknown_items,
                "users": n_users, "users_with_history": int(has_history.sum()),
                "items": n_items, "items_with_history": int((np.diff(conf.tocsc().indptr) > 0).sum()),
                "categories": len(cat_names), "segments": len(seg.keys),
                "consumed_pairs": int(len(consumed_indices)),
            },
            "skipped": inp.skipped,
            "segments": {**seg.scheme.to_dict(), "users_per_segment": seg.users_per_segment},
            "scoring": scoring_section,
            "evaluation": {f"ann_recall_at_{min(cfg.eval_candidates, n_items)}": recall,
                           "ann_eval_users": int(len(sample)),
                           # The server's default exact_head_items, and the share of those users it proves exact.
                           "exact_head_items": rcfg.exact_head_items,
                           "exact_head_share": head_share,
                           "ladder": _ladder_section(events, items, users, cfg)},
            "data_profile": data_profile(ev, inp.items, cfg),
            "build_seconds": round(time.perf_counter() - t_start, 3),
        }
        path = wr.publish(manifest)
    steps.set_postfix_str("published"); steps.update()
    steps.close()
    return path
