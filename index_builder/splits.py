"""The offline protocols' splits of an event log into an earlier part and what came next.

One module for the reranker's training and the ladder's evaluation, so both cut the
data the same way and a split asked for twice is fitted once (:func:`split_key`).

``temporal``: events before the ``cutoff_quantile`` timestamp, and those at or after it.
``last_n``: each user's last ``holdout`` positive events are held out (a user keeps at
least one positive in the earlier part, or they would be cold).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from index_builder.config import BuildConfig

PROTOCOLS = ("temporal", "last_n")


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
        return (self.name, self.cutoff_quantile) if self.name == "temporal" else (self.name, self.holdout)


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
    else:
        raise SplitError(f"unknown protocol {name!r}; known: {', '.join(PROTOCOLS)}")
    if train.num_rows == 0:
        raise SplitError(f"protocol {name}: the split leaves no events to train on")
    if test.num_rows == 0:
        raise SplitError(
            f"protocol {name}: the split leaves no events to test on "
            f"(last_n needs users with more than {protocol.holdout} positive events)"
        )
    return train, test


def user_folds(user_ids: list[str] | np.ndarray, n_folds: int, seed: int) -> np.ndarray:
    """Each user's fold in ``[0, n_folds)``: a stable salted hash, the same in every protocol.

    Folds are of users, not of queries, so a model trained without fold ``f`` has seen
    nothing a user of fold ``f`` did in any protocol; the ladder scores each user with
    the bag that held their fold out (cross-fitting).
    """
    salt = f"{seed}:".encode()
    h = np.fromiter((zlib.crc32(salt + str(u).encode()) for u in user_ids), np.uint64, len(user_ids))
    return (h % np.uint64(max(n_folds, 1))).astype(np.int64)
