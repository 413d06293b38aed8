"""Admission: how many Rank pipelines one worker process runs at once.

A worker's in-flight requests share its GIL, so beyond a few at once every request
runs slower and a budget planned from single-request costs no longer holds. Requests
over the limit wait for a slot, and the wait counts against their budget: one that
has waited until only its reserve is left (a fifth of its budget, at least
:data:`MIN_RESERVE_MS`) is answered without a slot by the pipeline's cheapest path
(no ANN search, no features: precomputed lists in retrieval order), which the
reserve pays for, so it still answers within its budget. The same holds for a request
that spent its budget down to the reserve before it reached the slot, waiting for a
Rank thread (:meth:`Admission.waited_out`): a slot free by then would otherwise start a
pipeline that has no time left to run, so such a request takes none.
"""

from __future__ import annotations

import math
import threading
import time

from ranking import Budget

RESERVE_FRACTION = 0.2
MIN_RESERVE_MS = 1.0


class Admission:
    """At most ``limit`` concurrent Rank pipelines (0: no limit).

    Parameters
    ----------
    limit : int
        Pipelines allowed to run at once in this process.
    """

    def __init__(self, limit: int):
        if limit < 0:
            raise ValueError(f"admission limit must be >= 0, got {limit}")
        self.limit = limit
        # One slot is a plain lock: acquired and released in C, where a semaphore's
        # release (a Python-level condition notify) cost a few per cent of the GIL.
        self._slots = threading.Lock() if limit == 1 else threading.Semaphore(limit) if limit > 1 else None

    @staticmethod
    def reserve_ms(budget: Budget) -> float:
        """What ``budget`` keeps back for the cheapest path (inf: unlimited)."""
        return max(MIN_RESERVE_MS, RESERVE_FRACTION * budget.total_ms)

    @classmethod
    def waited_out(cls, budget: Budget) -> bool:
        """Whether no more than the reserve of ``budget`` is left, of a budget larger than it.

        A budget no larger than its reserve (1 ms and less) never is: it was all reserve
        from the start, and its request is ranked as well as that time allows.
        """
        reserve_ms = cls.reserve_ms(budget)
        return reserve_ms < budget.total_ms and budget.remaining_ms() <= reserve_ms

    def slot(self, budget: Budget) -> _Slot:
        """Hold a slot for the body; the ``with`` gives (seconds spent waiting, whether a slot
        was had).

        The wait stops when only the budget's reserve is left: the body then runs
        anyway, holding no slot, and must take the cheapest path. A request that comes
        with only the reserve left (:meth:`waited_out`) takes no slot, whatever the limit.
        """
        return _Slot(self, budget)


class _Slot:
    """The ``with`` block of :meth:`Admission.slot` (a class: a generator context manager's
    frames cost several times more on every Rank)."""

    __slots__ = ("admission", "budget", "held")

    def __init__(self, admission: Admission, budget: Budget):
        self.admission, self.budget, self.held = admission, budget, False

    def __enter__(self) -> tuple[float, bool]:
        a, budget = self.admission, self.budget
        if a.waited_out(budget):
            return 0.0, False
        if a._slots is None:
            return 0.0, True
        t0 = time.perf_counter()
        remaining_ms = budget.remaining_ms()
        if math.isinf(remaining_ms):
            self.held = a._slots.acquire()
        else:
            self.held = a._slots.acquire(timeout=max(remaining_ms - a.reserve_ms(budget), 0.0) / 1000.0)
        return time.perf_counter() - t0, self.held

    def __exit__(self, *exc) -> None:
        if self.held:
            self.held = False
            assert self.admission._slots is not None
            self.admission._slots.release()
