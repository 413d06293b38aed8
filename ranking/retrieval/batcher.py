"""Micro-batching of concurrent ANN queries into one FAISS search, with a bounded wait."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import numpy as np

from ranking.retrieval.search import Retriever


@dataclass
class _Slot:
    query: np.ndarray
    k: int
    effort: int
    done: threading.Event = field(default_factory=threading.Event)
    rows: np.ndarray | None = None
    exact: bool = False
    error: BaseException | None = None


class AnnBatcher:
    """Groups the retrieval queries of concurrent requests into one search.

    Leader/follower, no extra thread: the first request to arrive when nobody is
    collecting becomes the leader, waits at most ``max_wait_us`` (less when its own
    budget is short) or until ``max_batch`` queries are queued, then searches for the
    whole batch with the largest ``k`` and effort asked and hands each follower its
    rows. Followers that arrive while the leader searches form the next batch.

    Parameters
    ----------
    retriever : Retriever
    max_batch : int
        Largest batch; 1 disables batching (every query searches alone).
    max_wait_us : float
        Longest a leader waits for company.
    """

    def __init__(self, retriever: Retriever, max_batch: int = 8, max_wait_us: float = 300.0):
        self.retriever = retriever
        self.max_batch = max(1, int(max_batch))
        self.max_wait_s = max_wait_us / 1e6
        self._cv = threading.Condition()
        self._queue: list[_Slot] = []
        self._collecting = False
        self.batches = 0
        self.queries = 0

    def search(
        self, query: np.ndarray, k: int, effort: int, remaining_ms: float = float("inf")
    ) -> tuple[np.ndarray, bool]:
        """Rows of the ``k`` nearest items to ``query`` (int64, -1 padded), and whether the
        exact head found them (:class:`~ranking.retrieval.Retriever`)."""
        if self.max_batch == 1:
            return self.retriever.search_one(query, k, effort)
        slot = _Slot(np.asarray(query, dtype=np.float32), k, effort)
        with self._cv:
            self._queue.append(slot)
            lead = not self._collecting
            if lead:
                self._collecting = True
            else:
                if len(self._queue) >= self.max_batch:
                    self._cv.notify_all()
        if not lead:
            slot.done.wait()
            if slot.error is not None:
                raise slot.error
            return slot.rows, slot.exact  # type: ignore[return-value]
        # The leader never spends more than a tenth of its own remaining budget waiting.
        wait = min(self.max_wait_s, max(0.0, remaining_ms / 1e4))
        deadline = time.monotonic() + wait
        with self._cv:
            while len(self._queue) < self.max_batch:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cv.wait(left)
            batch, self._queue = self._queue, []
            self._collecting = False  # the next arrival leads the next batch
        for i in range(0, len(batch), self.max_batch):
            self._run(batch[i : i + self.max_batch])
        return slot.rows, slot.exact  # type: ignore[return-value]

    def _run(self, batch: list[_Slot]) -> None:
        k = max(s.k for s in batch)
        effort = max(s.effort for s in batch)
        try:
            rows, exact = self.retriever.search(np.stack([s.query for s in batch]), k, effort)
        except BaseException as exc:  # handed to every waiter, raised in its own thread
            for s in batch:
                s.error = exc
                s.done.set()
            raise
        self.batches += 1
        self.queries += len(batch)
        for s, r, e in zip(batch, rows, exact):
            s.rows = r[: s.k]
            s.exact = bool(e)
            s.done.set()
