"""String id <-> dense row index maps that load from plain arrays without a dict."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from ranking.kernels.rows import sorted_codes, sorted_row


class IdMap:
    """Maps external string ids to the dense int32 rows used by every array of a bundle.

    Lookups use a sorted copy and binary search, so a map over millions of ids loads
    in milliseconds from two arrays (no Python dict is built) and is shared between
    worker processes page by page.

    Parameters
    ----------
    ids : np.ndarray
        Unicode array, ``ids[row]`` is the external id of that row. Must be unique.
    order : np.ndarray, optional
        int32 permutation that sorts ``ids``; computed when not given.
    """

    def __init__(self, ids: np.ndarray, order: np.ndarray | None = None):
        if ids.dtype.kind != "U":
            ids = np.asarray(ids, dtype=str)
        self.ids = ids
        if order is None:
            order = np.argsort(ids, kind="stable").astype(np.int32)
        self.order = np.ascontiguousarray(order, dtype=np.int32)
        self._sorted = ids[self.order]
        self._codes = sorted_codes(self._sorted)  # the same bytes as code points, for row()
        self._width = ids.dtype.itemsize // 4  # characters in the longest id
        if len(ids) > 1 and np.any(self._sorted[1:] == self._sorted[:-1]):
            dup = self._sorted[1:][self._sorted[1:] == self._sorted[:-1]][0]
            raise ValueError(f"duplicate id {dup!r} in id map")

    def __len__(self) -> int:
        return len(self.ids)

    def lookup(self, keys: Iterable[str]) -> np.ndarray:
        """Rows of ``keys`` as int32, -1 where a key is unknown."""
        keys = np.asarray(list(keys) if not isinstance(keys, np.ndarray) else keys, dtype=str)
        if len(keys) == 0 or len(self.ids) == 0:
            return np.full(len(keys), -1, dtype=np.int32)
        fits = None
        if keys.dtype.itemsize > self._sorted.dtype.itemsize:
            # A key longer than every id is unknown. Searched as it is, it would make NumPy
            # cast the whole sorted map to the keys' wider dtype first: 12 ms on a million ids.
            fits = np.char.str_len(keys) <= self._width
            keys = keys.astype(self._sorted.dtype)  # the longer keys cut short, found or not
        pos = np.searchsorted(self._sorted, keys)
        pos_clipped = np.minimum(pos, len(self._sorted) - 1)
        found = self._sorted[pos_clipped] == keys
        if fits is not None:
            found &= fits
        return np.where(found, self.order[pos_clipped], -1).astype(np.int32)

    def row(self, key: str) -> int:
        """Row of one key, -1 when unknown."""
        if not key or len(key) > self._width or len(self._sorted) == 0:
            return -1
        return sorted_row(self._codes, self.order, key)

    def id_of(self, rows: np.ndarray) -> list[str]:
        """External ids of ``rows``."""
        return self.ids[np.asarray(rows, dtype=np.int64)].tolist()
