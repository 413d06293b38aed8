"""The loaded, read-only ranking model: a verified bundle's arrays, id maps and ANN index."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ranking.bundle.ids import IdMap
from ranking.bundle.segments import SegmentScheme
from ranking.bundle.store import Bundle, MemoryBundle
from ranking.errors import BundleError


@dataclass(frozen=True)
class Csr:
    """Rows of int32 ids (and optional float32 values) in compressed-sparse-row form."""

    indptr: np.ndarray
    indices: np.ndarray
    values: np.ndarray | None = None

    def row(self, r: int) -> np.ndarray:
        return self.indices[self.indptr[r] : self.indptr[r + 1]]

    def row_len(self, r: int) -> int:
        """How many ids row ``r`` holds."""
        return int(self.indptr[r + 1] - self.indptr[r])

    def row_values(self, r: int) -> np.ndarray:
        assert self.values is not None
        return self.values[self.indptr[r] : self.indptr[r + 1]]

    @property
    def n_rows(self) -> int:
        return len(self.indptr) - 1


class RankingModel:
    """Everything a :class:`~ranking.pipeline.ranker.Ranker` needs from one bundle version.

    Parameters
    ----------
    path : Path or Bundle or MemoryBundle
        A published version directory, an opened bundle, or the builder's in-memory one.
    verify : bool
        Verify checksums before use (the server always does); the declared schema
        (``ranking.bundle.schema``) is checked either way.

    Raises
    ------
    BundleError
        The bundle is unreadable, corrupt or inconsistent.
    """

    def __init__(self, path: Path | str | Bundle | MemoryBundle, verify: bool = True):
        t0 = time.perf_counter()
        b = path if isinstance(path, (Bundle, MemoryBundle)) else Bundle(path, verify=verify)
        b.check_schema()
        self.bundle = b
        m = b.manifest
        self.version: str = b.version
        self.manifest = m
        self.items = IdMap(b.array("item_ids", mmap=False), b.array("item_order", mmap=False))
        self.users = IdMap(b.array("user_ids", mmap=False), b.array("user_order", mmap=False))
        self.item_factors = b.array("item_factors")
        self.user_factors = b.array("user_factors")
        self.user_has_history = b.array("user_has_history")
        self.user_segment = b.array("user_segment")
        self.item_popularity = b.array("item_popularity")
        self.item_recent_popularity = b.array("item_recent_popularity")
        self.item_price = b.array("item_price")
        self.item_categories = Csr(b.array("item_cat_indptr"), b.array("item_cat_ids"))
        self.category_names = IdMap(b.array("category_names", mmap=False))
        self.popular_items = b.array("popular_items")
        # Items a purchase excludes for good (the builder's re-purchase policy): the others come back when due.
        self.consumed = Csr(b.array("consumed_indptr"), b.array("consumed_indices"))
        self.item_reoffer = b.array("item_reoffer")
        self.segments = SegmentScheme.from_dict(m["segments"])
        self.segment_keys = IdMap(b.array("segment_keys", mmap=False))
        self.segment_popular = Csr(
            b.array("segment_pop_indptr"), b.array("segment_pop_items"), b.array("segment_pop_scores")
        )
        self.scoring = m.get("scoring")
        self.index = b.load_index()
        self._check_shapes()
        self.load_seconds = time.perf_counter() - t0

    @property
    def n_items(self) -> int:
        return len(self.items)

    @property
    def n_users(self) -> int:
        return len(self.users)

    def _check_shapes(self) -> None:
        # The arrays agree with each other by the schema; the index must agree with them.
        checks = [
            ("index size", self.index.ntotal, self.n_items),
            ("index dimension", self.index.d, self.item_factors.shape[1]),
        ]
        bad = [f"{name} is {got}, expected {want}" for name, got, want in checks if got != want]
        if bad:
            raise BundleError(f"{self.bundle.path} is inconsistent: " + "; ".join(bad))
