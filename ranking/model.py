"""The loaded, read-only ranking model: a verified bundle's arrays, id maps and ANN index."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from ranking.bundle import Bundle
from ranking.errors import BundleError
from ranking.ids import IdMap
from ranking.reranker import load_scorer
from ranking.retrieval import ExactHead
from ranking.rows import ItemScratch
from ranking.segments import SegmentScheme


@dataclass(frozen=True)
class Csr:
    """Rows of int32 ids (and optional float32 values) in compressed-sparse-row form."""

    indptr: np.ndarray
    indices: np.ndarray
    values: np.ndarray | None = None

    def row(self, r: int) -> np.ndarray:
        return self.indices[self.indptr[r]:self.indptr[r + 1]]

    def row_len(self, r: int) -> int:
        """How many ids row ``r`` holds."""
        return int(self.indptr[r + 1] - self.indptr[r])

    def row_values(self, r: int) -> np.ndarray:
        assert self.values is not None
        return self.values[self.indptr[r]:self.indptr[r + 1]]

    @property
    def n_rows(self) -> int:
        return len(self.indptr) - 1


def read_index(path: Path) -> faiss.Index:
    """Read the FAISS index into memory.

    Not memory-mapped on purpose: a memory-mapped IVF index searched many times slower
    than one read into memory (bench/README.md, "Notes from measuring"), and HNSW graphs are
    read into memory either way. Worker processes share the index copy-on-write
    instead: the supervisor loads the bundle before it forks them (server.workers).
    """
    return faiss.read_index(str(path))


class RankingModel:
    """Everything a :class:`~ranking.pipeline.Ranker` needs from one bundle version.

    Parameters
    ----------
    path : Path
        A published version directory.
    verify : bool
        Verify checksums and schema before use (the server always does).

    Raises
    ------
    BundleError
        The bundle is unreadable, corrupt or inconsistent.
    """

    def __init__(self, path: Path | str, verify: bool = True):
        t0 = time.perf_counter()
        self.bundle = Bundle(path, verify=verify)
        b = self.bundle
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
        self.consumed = Csr(b.array("consumed_indptr"), b.array("consumed_indices"))
        self.segments = SegmentScheme.from_dict(m["segments"])
        self.segment_keys = IdMap(b.array("segment_keys", mmap=False))
        self.segment_popular = Csr(
            b.array("segment_pop_indptr"), b.array("segment_pop_items"), b.array("segment_pop_scores")
        )
        self.scoring = m.get("scoring")
        # Linear (older bundles) or the learned tree ensemble; anything else is refused here.
        self.scorer = load_scorer(b)
        self.feature_names: list[str] = list(self.scorer.feature_names)
        self.index = read_index(b.file("index.faiss"))
        self._check_shapes()
        # Dense per-request scratch over the item rows (positions, visited marks).
        self.scratch = ItemScratch(self.n_items)
        self._heads: dict[int, ExactHead] = {}
        self.load_seconds = time.perf_counter() - t0

    def exact_head(self, size: int) -> ExactHead:
        """The exact-search head of the ``size`` largest-norm items, built once per size.

        Built where the model is loaded: the server's supervisor builds it before forking,
        so the workers share it copy-on-write like the index.
        """
        head = self._heads.get(size)
        if head is None:
            head = self._heads[size] = ExactHead(self.item_factors, size)
        return head

    @property
    def n_items(self) -> int:
        return len(self.items)

    @property
    def n_users(self) -> int:
        return len(self.users)

    def _check_shapes(self) -> None:
        n_i, n_u = self.n_items, self.n_users
        checks = [
            ("item_factors rows", self.item_factors.shape[0], n_i),
            ("item_popularity", len(self.item_popularity), n_i),
            ("item_recent_popularity", len(self.item_recent_popularity), n_i),
            ("item_price", len(self.item_price), n_i),
            ("item_cat_indptr", self.item_categories.n_rows, n_i),
            ("user_factors rows", self.user_factors.shape[0], n_u),
            ("user_has_history", len(self.user_has_history), n_u),
            ("user_segment", len(self.user_segment), n_u),
            ("consumed_indptr", self.consumed.n_rows, n_u),
            ("segment_pop_indptr", self.segment_popular.n_rows, len(self.segment_keys)),
            ("index size", self.index.ntotal, n_i),
            ("index dimension", self.index.d, self.item_factors.shape[1]),
        ]
        bad = [f"{name} is {got}, expected {want}" for name, got, want in checks if got != want]
        if bad:
            raise BundleError(f"{self.bundle.path} is inconsistent: " + "; ".join(bad))
