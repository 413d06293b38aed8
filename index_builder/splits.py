"""The offline protocols' splits of an event log into an earlier part and what came next.

One module for the reranker's training and the ladder's evaluation, so both cut the
data the same way and a split asked for twice is fitted once (:func:`split_key`).

``temporal``: events before the ``cutoff_quantile`` timestamp, and those at or after it.
``last_n``: each user's last ``holdout`` positive events are held out (a user keeps at
least one positive in the earlier part, or they would be cold).
``last_basket``: each user's last basket (their last order, or last day with a purchase
where the log has no ``order_id``; ``index_builder.repeat``) and everything they did from
the start of that visit on are held out, for users with at least two baskets; its truth
is the basket's purchases: what a grocer's next-basket prediction is judged on.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from index_builder.config import BuildConfig
from index_builder.repeat import DAY, basket_keys

PROTOCOLS = ("temporal", "last_n", "last_basket")


class SplitError(ValueError):
    """A protocol cannot be run on this data (said plainly in the report instead of NaN)."""


@dataclass(frozen=True)
class Protocol:
    """A protocol and the setting that places its cut."""

    name: str
    cutoff_quantile: float = 0.8
    holdout: int = 10

    @property
    def key(self) -> tuple:
        """Equal for two protocols that cut the data identically."""
        if self.name == "temporal":
            return (self.name, self.cutoff_quantile)
        return (self.name, self.holdout) if self.name == "last_n" else (self.name,)


def positive_types(events: pa.Table, cfg: BuildConfig) -> set[str]:
    """The event types of ``events`` whose weight is positive (what counts as a hit or a label)."""
    return {
        t for t in pc.unique(events["event_type"]).to_pylist() if cfg.event_weights.get(t, cfg.default_event_weight) > 0
    }


def positive_mask(events: pa.Table, cfg: BuildConfig) -> np.ndarray:
    """Which events are of a positive type."""
    types = events["event_type"].to_numpy(zero_copy_only=False)
    return np.isin(types, list(positive_types(events, cfg)))


def split(events: pa.Table, protocol: Protocol, cfg: BuildConfig) -> tuple[pa.Table, pa.Table]:
    """(earlier events, later events) of a protocol.

    Raises
    ------
    SplitError
        The split leaves nothing to train on or nothing to test, or the protocol is unknown.
    """
    ts = events["timestamp"].to_numpy()
    name = protocol.name
    if name == "temporal":
        cutoff = int(np.quantile(ts, protocol.cutoff_quantile))
        train = events.filter(pc.less(events["timestamp"], cutoff))
        test = events.filter(pc.greater_equal(events["timestamp"], cutoff))
    elif name == "last_n":
        pos = positive_mask(events, cfg)
        users = events["user_id"].to_numpy(zero_copy_only=False)
        order = np.lexsort((np.arange(len(ts)), ts, users))
        su = users[order]
        starts = np.flatnonzero(np.r_[True, su[1:] != su[:-1]])
        ends = np.r_[starts[1:], len(su)]
        held = np.zeros(len(ts), bool)
        for lo, hi in zip(starts, ends):
            idx = order[lo:hi]
            p = idx[pos[idx]]
            if len(p) > protocol.holdout:
                held[p[-protocol.holdout :]] = True
        train = events.filter(pa.array(~held))
        test = events.filter(pa.array(held))
    elif name == "last_basket":
        held = _last_basket(events, cfg)
        train = events.filter(pa.array(~held))
        test = events.filter(pa.array(held))
    else:
        raise SplitError(f"unknown protocol {name!r}; known: {', '.join(PROTOCOLS)}")
    if train.num_rows == 0:
        raise SplitError(f"protocol {name}: the split leaves no events to train on")
    if test.num_rows == 0:
        need = (
            f"users with more than {protocol.holdout} positive events"
            if name == "last_n"
            else f"users with purchases ({', '.join(cfg.consumed_event_types)}) in two baskets or more"
        )
        raise SplitError(f"protocol {name}: the split leaves no events to test on (it needs {need})")
    return train, test


def consumed_mask(events: pa.Table, cfg: BuildConfig) -> np.ndarray:
    """Which events are purchases (of ``consumed_event_types``)."""
    types = events["event_type"].to_numpy(zero_copy_only=False)
    return np.isin(types, list(cfg.consumed_event_types))


def _last_basket(events: pa.Table, cfg: BuildConfig) -> np.ndarray:
    """Events held out by ``last_basket``: each user's last visit with a purchase, for users with two baskets or more.

    The cut is the start of the last basket's UTC day (or just after the user's previous
    basket, when that was the same day): what the user browsed on that visit before paying
    is held out with the basket, so no rung learns the basket from the views that led to it.
    """
    ts = events["timestamp"].to_numpy().astype(np.int64)
    bought = consumed_mask(events, cfg)
    users = pc.dictionary_encode(events["user_id"]).combine_chunks().indices.to_numpy(zero_copy_only=False)
    n_users = int(users.max()) + 1 if len(users) else 0
    bu, bk, bt = users[bought].astype(np.int64), basket_keys(events)[bought], ts[bought]
    order = np.lexsort((bt, bk, bu))
    bu, bk, bt = bu[order], bk[order], bt[order]
    first = np.r_[True, (bu[1:] != bu[:-1]) | (bk[1:] != bk[:-1])] if len(bu) else np.zeros(0, bool)
    b_user = bu[first]
    b_start = bt[first]
    b_end = np.maximum.reduceat(bt, np.flatnonzero(first)) if len(bt) else np.zeros(0, np.int64)
    # Baskets in time order within each user: the last one and the one before.
    by_time = np.lexsort((b_start, b_user))
    b_user, b_start, b_end = b_user[by_time], b_start[by_time], b_end[by_time]
    last = np.r_[b_user[1:] != b_user[:-1], True] if len(b_user) else np.zeros(0, bool)
    n_baskets = np.bincount(b_user, minlength=n_users)
    cut = np.full(n_users, np.iinfo(np.int64).max, np.int64)
    rows = np.flatnonzero(last & (n_baskets[b_user] >= 2))
    cut[b_user[rows]] = np.maximum(b_start[rows] // DAY * DAY, b_end[rows - 1] + 1)
    return ts >= cut[users]


def user_folds(user_ids: list[str] | np.ndarray, n_folds: int, seed: int) -> np.ndarray:
    """Each user's fold in ``[0, n_folds)``: a stable salted hash, the same in every protocol.

    Folds are of users, not of queries, so a model trained without fold ``f`` has seen
    nothing a user of fold ``f`` did in any protocol; the ladder scores each user with
    the bag that held their fold out (cross-fitting).
    """
    salt = f"{seed}:".encode()
    h = np.fromiter((zlib.crc32(salt + str(u).encode()) for u in user_ids), np.uint64, len(user_ids))
    return (h % np.uint64(max(n_folds, 1))).astype(np.int64)
