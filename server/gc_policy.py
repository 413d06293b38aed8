"""Python's cyclic garbage collector in a serving process: long-lived objects frozen, pauses measured.

A worker holds tens of thousands of long-lived container objects (modules, the gRPC
server, a bundle's id maps and tables) that never become garbage, and a full
(generation 2) collection walks every one of them with the GIL held: every request in
flight on the worker stands still meanwhile. :func:`freeze` moves the objects alive
at that moment out of the collector's reach (``gc.freeze``), after a collection has
freed what was already garbage; collections then walk only what was allocated since.

Freezing is safe across bundle reloads because a bundle and its ranker hold no
reference cycles: once swapped out and no longer in use, reference counting frees
them, frozen or not (``tests/server/test_gc_policy.py`` keeps that true). The objects
of requests in flight when a freeze happens are frozen with them and are freed the
same way; only a cycle among them would outlive its request.

:class:`PauseWatch` times every collection for the ``one2one_gc_pause_seconds``
histogram. Its callback only appends to a deque: a collection can start inside any
allocation, also inside prometheus_client's (non-reentrant) lock, so the metric is
written later, by :meth:`PauseWatch.flush` on the serving loop's tick.
"""

from __future__ import annotations

import collections
import gc
import time


def freeze() -> None:
    """Collect what is garbage now, then exempt every object still alive from future collections."""
    gc.collect()
    gc.freeze()


class PauseWatch:
    """Times each collection of this process (``gc.callbacks``) until :meth:`close`.

    Parameters
    ----------
    histogram : prometheus_client.Histogram
        Labelled by generation ("0", "1", "2"); given rather than imported, so that the
        supervisor, which must create no metric, can use :func:`freeze` from here.
    """

    def __init__(self, histogram) -> None:
        self._histogram = histogram
        self._started = 0.0
        self._pauses: collections.deque[tuple[int, float]] = collections.deque()
        gc.callbacks.append(self._on_gc)

    def _on_gc(self, phase: str, info: dict) -> None:
        # Runs inside the collector, on whichever thread allocated: no locks, no metrics here.
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self._pauses.append((info["generation"], time.perf_counter() - self._started))

    def flush(self) -> int:
        """Record the pauses seen since the last flush in the metrics; returns how many."""
        n = 0
        while self._pauses:
            generation, seconds = self._pauses.popleft()
            self._histogram.labels(str(generation)).observe(seconds)
            n += 1
        return n

    def close(self) -> None:
        self.flush()
        if self._on_gc in gc.callbacks:
            gc.callbacks.remove(self._on_gc)
