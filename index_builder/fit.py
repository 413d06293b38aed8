"""Fit: validated inputs in, a bundle's arrays in memory out (weights, ALS, tables, features, index).

No reranker, no evaluation, no publishing: :mod:`index_builder.build` orchestrates
those and fits each part of the data exactly once, serving the fitted arrays to the
reranker's training and to the ladder through :class:`ranking.bundle.MemoryBundle`.
"""

from __future__ import annotations

import datetime as _dt
import logging
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import scipy.sparse as sp

from index_builder import io as bio
from index_builder.config import BuildConfig
from index_builder.feature_tables import context_codes, context_tables, feature_tables
from index_builder.repeat import basket_keys, repeat_tables
from index_builder.splits import Protocol
from index_builder.steps import Steps
from index_builder.tables import (
    choose_scheme,
    consumed_csr,
    distinct_user_counts,
    item_categories,
    item_prices,
    log_scaled,
    segment_tables,
    top_rows,
)
from index_builder.train import DAY, confidence_matrix, event_weights, train_als
from ranking import CONTEXT_FIELDS, FEATURES, MemoryBundle, RankingModel, item_gram

log = logging.getLogger(__name__)

FIT_STEPS = ("weights", "als", "tables", "features", "index")


@dataclass
class Inputs:
    """Validated input tables, where they came from, and what reading them skipped."""

    events: pa.Table
    items: pa.Table
    users: pa.Table | None
    skipped: dict
    sources: dict[str, Any] = field(default_factory=dict)

    def with_events(self, events: pa.Table) -> Inputs:
        """The same catalogue and users with another part of the events (a protocol's split)."""
        return Inputs(events, self.items, self.users, self.skipped, self.sources)


def read_inputs(
    events: Path | bio.EventRecords | list[Path | bio.EventRecords],
    items: Path,
    users: Path | None,
    cfg: BuildConfig,
) -> Inputs:
    """Read and validate the three inputs; an InputError names file, row and column.

    ``events`` may be several sources (files, event log directories, an event archive, or a
    store's consumed stream: ``index_builder.stream_input``), e.g. the history export and the
    server's log since; their events are concatenated.
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
    names = {
        "events": [str(p) for p in events] if isinstance(events, list) else str(events),
        "items": str(items),
        "users": str(users) if users else None,
    }
    return Inputs(ev, it, us, skipped, names)


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


def linear_scoring(cfg: BuildConfig, reason: str, training: dict | None = None) -> dict:
    """The manifest's ``scoring`` section of the linear fallback, and why there is no reranker."""
    sw = cfg.scoring_weights
    fallback: dict[str, Any] = {"reason": reason}
    if training is not None:
        fallback["training"] = training
    return {
        "model": "linear",
        "features": list(FEATURES),
        "weights": [float(sw.get(f, 0.0)) for f in FEATURES],
        "bias": 0.0,
        "fallback": fallback,
    }


@dataclass
class Fitted:
    """One part of the data fitted: every bundle array but the reranker's, the index, the manifest's facts."""

    arrays: dict[str, np.ndarray]
    index: faiss.Index
    sections: dict[str, Any]
    events: pa.Table  # the events that were fitted (those naming a catalogue item)
    index_seconds: float = 0.0  # the time building ``index`` took (the builder's index tuning records it)

    def model(
        self,
        scoring: dict,
        tree_arrays: dict[str, np.ndarray] | None = None,
        name: str = "the bundle being built",
        sections: dict | None = None,
    ) -> RankingModel:
        """The fitted arrays served as a model, scored by ``scoring`` (and its trees); ``sections``
        adds manifest sections (the reranker's ``phases``)."""
        arrays = {**self.arrays, **(tree_arrays or {})}
        manifest = {**self.sections, **(sections or {}), "scoring": scoring}
        return RankingModel(MemoryBundle(arrays, manifest, self.index, name))


@dataclass
class PartFit:
    """A protocol's split with its earlier part fitted once: shared by the reranker and the ladder."""

    protocol: Protocol
    earlier: pa.Table
    later: pa.Table
    fitted: Fitted
    model: RankingModel  # the fitted arrays with the linear scorer: features for training rows


def _iso(ts: int) -> str:
    return _dt.datetime.fromtimestamp(int(ts), _dt.UTC).isoformat()


def _context_codes(ev: pa.Table, positive: np.ndarray, cfg: BuildConfig) -> dict[str, tuple]:
    """Each context field's per-event codes and vocabulary; none at all with ``context_features = false``."""
    if not cfg.context_features:
        none = (np.full(ev.num_rows, -1, np.int16), np.zeros(0, str), False)
        return {f: none for f in CONTEXT_FIELDS}
    return {f: context_codes(ev[f], positive, cfg.context_vocabulary) for f in CONTEXT_FIELDS}


def fit(
    inp: Inputs, cfg: BuildConfig, steps: Steps | None = None, prefix: str = "", show_progress: bool = False
) -> Fitted:
    """Fit every bundle array of ``inp`` but the reranker's.

    Parameters
    ----------
    inp : Inputs
    cfg : BuildConfig
    steps : Steps, optional
        Times the sub-steps ``prefix + name`` for every name in ``FIT_STEPS``.
    prefix : str
        The steps' name prefix (e.g. ``"fit[temporal] "``).
    show_progress : bool
        ALS's own progress bar.

    Raises
    ------
    ValueError
        No event names an item of the catalogue: nothing to learn from.
    """

    def step(name: str):
        return steps.step(prefix + name) if steps is not None else nullcontext()

    with step("weights"):
        item_ids = inp.items["item_id"].combine_chunks()
        ev = inp.events
        item_idx = pc.index_in(ev["item_id"], value_set=item_ids)
        unknown_items = int(item_idx.null_count)
        if unknown_items:
            keep = pc.is_valid(item_idx)
            ev = ev.filter(keep)
            item_idx = item_idx.filter(keep)
            log.warning("dropped %d events whose item_id is not in %s", unknown_items, inp.sources.get("items"))
        if ev.num_rows == 0:
            raise ValueError(
                f"no event in {inp.sources.get('events')} names an item of {inp.sources.get('items')}: "
                "nothing to learn from"
            )
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

    with step("als"):
        user_factors, item_factors = train_als(conf, cfg, show_progress=show_progress)
        has_history = (np.diff(conf.indptr) > 0).astype(np.uint8)

    with step("tables"):
        positive = w > 0
        pop = log_scaled(distinct_user_counts(u[positive], i[positive], n_users, n_items))
        recent = positive & (ts >= t_end - cfg.recent_days * DAY)
        recent_pop = log_scaled(distinct_user_counts(u[recent], i[recent], n_users, n_items))
        sw = cfg.scoring_weights
        popular = top_rows(
            sw.get("popularity", 1.0) * pop + sw.get("recent_popularity", 0.0) * recent_pop, cfg.popular_top_items
        )
        is_consumed = pc.is_in(ev["event_type"], value_set=pa.array(cfg.consumed_event_types, pa.string()))
        cmask = is_consumed.to_numpy(zero_copy_only=False)
        cat_indptr, cat_ids, cat_names = item_categories(inp.items)
        repeat = repeat_tables(u, i, ts, basket_keys(ev), cmask, n_users, n_items, cat_indptr, cat_ids, cat_names, cfg)
        # What a purchase excludes: the items the policy does not offer again.
        gone = cmask & (repeat.reoffer[i] == 0)
        consumed_indptr, consumed_indices = consumed_csr(u[gone], i[gone], n_users, n_items)

        scheme = choose_scheme(inp.users, cfg)
        attrs: list[dict[str, str]] = [{} for _ in range(n_users)]
        if inp.users is not None and scheme.columns:
            rows = pc.index_in(inp.users["user_id"], value_set=user_ids).to_numpy(zero_copy_only=False)
            cols = {c: inp.users[c].cast(pa.string()).to_pylist() for c in scheme.columns}
            for j, r in enumerate(rows):
                attrs[int(r)] = {c: cols[c][j] for c in scheme.columns if cols[c][j] is not None}
        pos_matrix = sp.csr_matrix(
            (np.ones(int(positive.sum()), np.float32), (u[positive], i[positive])), shape=(n_users, n_items)
        )
        pos_matrix.data[:] = 1.0
        pos_matrix.sum_duplicates()
        pos_matrix.data[:] = 1.0
        seg = segment_tables(scheme, attrs, pos_matrix, cfg)

    with step("features"):
        prices = item_prices(inp.items)
        ftables = feature_tables(
            u, i, ts, positive, cmask, n_users, n_items, cat_indptr, cat_ids, len(cat_names), prices, recent_pop, cfg
        )
        ftables.update(context_tables(u, i, positive, _context_codes(ev, positive, cfg), n_users, n_items))

    with step("index"):
        t0 = time.perf_counter()
        index = build_index(item_factors, cfg)
        index_seconds = time.perf_counter() - t0

    uid_np = np.asarray(user_ids.to_pylist(), dtype=str)
    iid_np = np.asarray(item_ids.to_pylist(), dtype=str)
    gram, inv_norms = item_gram(item_factors)
    arrays = {
        "item_ids": iid_np,
        "item_order": np.argsort(iid_np, kind="stable").astype(np.int32),
        "user_ids": uid_np,
        "user_order": np.argsort(uid_np, kind="stable").astype(np.int32),
        "item_factors": item_factors,
        "user_factors": user_factors,
        "item_gram": gram,
        "item_inv_norms": inv_norms,
        "user_has_history": has_history,
        "user_segment": seg.user_segment,
        "item_popularity": pop,
        "item_recent_popularity": recent_pop,
        "item_price": prices,
        "item_cat_indptr": cat_indptr,
        "item_cat_ids": cat_ids,
        "category_names": cat_names,
        "popular_items": popular,
        "consumed_indptr": consumed_indptr,
        "consumed_indices": consumed_indices,
        "segment_keys": seg.keys,
        "segment_pop_indptr": seg.indptr,
        "segment_pop_items": seg.items,
        "segment_pop_scores": seg.scores,
        **ftables,
        **repeat.arrays,
    }
    sections = {
        "data_window": {"start": _iso(t_begin), "end": _iso(t_end), "start_unix": t_begin, "end_unix": t_end},
        "counts": {
            "events": ev.num_rows,
            "events_unknown_item": unknown_items,
            "users": n_users,
            "users_with_history": int(has_history.sum()),
            "items": n_items,
            "items_with_history": int((np.diff(conf.tocsc().indptr) > 0).sum()),
            "categories": len(cat_names),
            "segments": len(seg.keys),
            "consumed_pairs": len(consumed_indices),
        },
        "segments": {**seg.scheme.to_dict(), "users_per_segment": seg.users_per_segment},
        "repeat": repeat.profile,
    }
    return Fitted(arrays, index, sections, ev, index_seconds)
