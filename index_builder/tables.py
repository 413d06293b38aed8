"""Feature tables of a bundle: popularity, segments, consumed sets and item attributes."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import scipy.sparse as sp

from index_builder.config import BuildConfig
from ranking import SegmentScheme


def log_scaled(counts: np.ndarray) -> np.ndarray:
    """log1p(count) / log1p(max): popularity on [0, 1] that keeps the long tail apart."""
    counts = np.asarray(counts, dtype=np.float64)
    top = counts.max() if len(counts) else 0.0
    if top <= 0:
        return np.zeros(len(counts), dtype=np.float32)
    return (np.log1p(counts) / np.log1p(top)).astype(np.float32)


def distinct_user_counts(user_rows: np.ndarray, item_rows: np.ndarray, n_users: int, n_items: int) -> np.ndarray:
    """How many distinct users touched each item."""
    m = sp.csr_matrix((np.ones(len(user_rows), np.float32), (user_rows, item_rows)), shape=(n_users, n_items))
    m.data[:] = 1.0  # duplicates were summed; a user counts once
    m.sum_duplicates()
    m.data[:] = 1.0
    return np.asarray(m.sum(axis=0)).ravel()


def consumed_csr(
    user_rows: np.ndarray, item_rows: np.ndarray, n_users: int, n_items: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per user, the sorted unique items they consumed (bought, rated): never re-offered."""
    m = sp.csr_matrix((np.ones(len(user_rows), np.int8), (user_rows, item_rows)), shape=(n_users, n_items))
    m.sum_duplicates()
    m.sort_indices()
    return m.indptr.astype(np.int64), m.indices.astype(np.int32)


def top_rows(scores: np.ndarray, n: int) -> np.ndarray:
    """Indices of the ``n`` highest scores, best first (ties by lower index)."""
    n = min(n, len(scores))
    if n <= 0:
        return np.zeros(0, np.int32)
    part = np.argpartition(-scores, n - 1)[:n] if n < len(scores) else np.arange(len(scores))
    return part[np.lexsort((part, -scores[part]))].astype(np.int32)


def item_categories(items: pa.Table) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(indptr, category ids, category names) of each item's categories."""
    if "categories" not in items.column_names:
        return np.zeros(items.num_rows + 1, np.int64), np.zeros(0, np.int32), np.zeros(0, dtype="<U1")
    col = items["categories"].combine_chunks()
    flat = pc.list_flatten(col)
    names = pc.unique(flat).sort() if len(flat) else pa.array([], pa.string())
    ids = pc.index_in(flat, value_set=names).to_numpy(zero_copy_only=False).astype(np.int32)
    lengths = pc.list_value_length(col).fill_null(0).to_numpy(zero_copy_only=False)
    indptr = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return indptr, ids, np.asarray(names.to_pylist(), dtype=str)


def item_prices(items: pa.Table) -> np.ndarray:
    """float32 price per item, NaN where unknown."""
    if "price" not in items.column_names:
        return np.full(items.num_rows, np.nan, np.float32)
    return items["price"].to_numpy(zero_copy_only=False).astype(np.float32)


@dataclass
class SegmentTables:
    scheme: SegmentScheme
    keys: np.ndarray
    indptr: np.ndarray
    items: np.ndarray
    scores: np.ndarray
    user_segment: np.ndarray
    users_per_segment: dict[str, int]


def choose_scheme(users: pa.Table | None, cfg: BuildConfig) -> SegmentScheme:
    """Segment variables: the configured ones, or the first low-cardinality user attributes.

    A column whose every value is numeric is banded (``numeric_band_width``), so age
    becomes age decades.
    """
    if users is None:
        return SegmentScheme()
    attrs = [c for c in users.column_names if c != "user_id"]
    missing = [c for c in cfg.segment_columns if c not in attrs]
    if missing:
        raise ValueError(f"segment_columns names {missing}, which the users file does not have (it has {attrs})")
    bands = {}
    for c in attrs:
        vals = pc.utf8_trim_whitespace(users[c].cast(pa.string()).fill_null(""))
        non_empty = pc.filter(vals, pc.not_equal(vals, ""))
        if len(non_empty) and pc.all(pc.utf8_is_numeric(pc.replace_substring(non_empty, ".", ""))).as_py():
            bands[c] = cfg.numeric_band_width
    chosen = list(cfg.segment_columns)
    if not chosen:
        scheme = SegmentScheme(columns=tuple(attrs), bands=bands)
        for c in attrs:
            values = {scheme.value(c, v) for v in users[c].cast(pa.string()).to_pylist()} - {None}
            if 1 < len(values) <= cfg.max_segment_cardinality:
                chosen.append(c)
            if len(chosen) >= cfg.max_segment_columns:
                break
    return SegmentScheme(columns=tuple(chosen), bands={c: w for c, w in bands.items() if c in chosen})


def segment_tables(
    scheme: SegmentScheme,
    user_attrs: list[dict[str, str]],
    positive: sp.csr_matrix,
    cfg: BuildConfig,
) -> SegmentTables:
    """Per segment, its most popular items (distinct users), and each user's segment.

    Parameters
    ----------
    scheme : SegmentScheme
    user_attrs : list of dict
        Attributes of every user row (empty dict when unknown).
    positive : scipy.sparse.csr_matrix
        users × items, 1 where the user showed interest.
    """
    n_users = positive.shape[0]
    key_of: dict[str, int] = {}
    rows, cols = [], []
    user_keys: list[list[int]] = []
    for u, attrs in enumerate(user_attrs):
        ks = []
        for key in scheme.keys(attrs) if attrs else []:
            kid = key_of.setdefault(key, len(key_of))
            rows.append(kid)
            cols.append(u)
            ks.append(kid)
        user_keys.append(ks)
    n_keys = len(key_of)
    member = sp.csr_matrix((np.ones(len(rows), np.float32), (rows, cols)), shape=(n_keys, n_users))
    size = np.asarray(member.sum(axis=1)).ravel()
    keep = size >= cfg.min_segment_users
    counts = (member[keep] @ positive).tocsr() if n_keys else sp.csr_matrix((0, positive.shape[1]))
    names = np.array(list(key_of), dtype=str)[keep] if n_keys else np.zeros(0, dtype="<U1")
    new_id = np.full(n_keys, -1, np.int64)
    new_id[keep] = np.arange(int(keep.sum()))
    indptr, items, scores = [0], [], []
    for r in range(counts.shape[0]):
        row = counts.getrow(r)
        top = top_rows(row.toarray().ravel(), cfg.segment_top_items)
        vals = np.asarray(row[:, top].toarray()).ravel() if len(top) else np.zeros(0)
        nz = vals > 0
        top, vals = top[nz], vals[nz]
        items.append(top)
        scores.append(log_scaled(vals) if len(vals) else np.zeros(0, np.float32))
        indptr.append(indptr[-1] + len(top))
    user_segment = np.full(n_users, -1, np.int32)
    for u, ks in enumerate(user_keys):
        for kid in ks:  # most specific first
            if new_id[kid] >= 0:
                user_segment[u] = new_id[kid]
                break
    return SegmentTables(
        scheme=scheme,
        keys=names,
        indptr=np.asarray(indptr, np.int64),
        items=np.concatenate(items).astype(np.int32) if items else np.zeros(0, np.int32),
        scores=np.concatenate(scores).astype(np.float32) if scores else np.zeros(0, np.float32),
        user_segment=user_segment,
        users_per_segment={str(k): int(s) for k, s in zip(names, size[keep])},
    )
