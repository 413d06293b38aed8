"""Load shedding: how many calls a worker holds at once, per role and in all, and how many Rank
calls may wait for a Rank thread; the rest are refused on arrival, before they queue.

A call refused at once costs its client one round trip and lets it retry elsewhere; a call
queued behind more work than its deadline allows costs a handler thread later and fails
anyway. The counts come from the thread pools themselves (:class:`CountedPool`): a call
counts from the moment gRPC hands it to a pool until its handler returns, so no path
(a call cancelled while queued, a handler that raises) can leave a count behind.
"""

from __future__ import annotations

import threading
from concurrent import futures
from dataclasses import dataclass

# Why a call was shed (the ``reason`` label of one2one_rpc_shed_total).
SHED_REASONS = ("process", "role", "rank_queue")


class CountedPool(futures.ThreadPoolExecutor):
    """A view of a thread pool that counts the calls it was given: queued (not started) and running.

    Several views may share one executor (each role has its own view), so each role's
    calls are counted apart while they share threads. gRPC calls only ``submit``, but
    takes a handler's pool only if it is a ``ThreadPoolExecutor``: hence the subclass,
    which owns no threads of its own (``super().__init__`` is deliberately not called,
    and ``shutdown`` leaves the shared executor to its owner).
    """

    def __init__(self, executor: futures.ThreadPoolExecutor):
        self.executor = executor
        self.queued = 0
        self.running = 0
        self._lock = threading.Lock()

    @property
    def in_flight(self) -> int:
        return self.queued + self.running

    def submit(self, fn, /, *args, **kwargs) -> futures.Future:
        with self._lock:
            self.queued += 1

        def run(*job_args, **job_kwargs):
            with self._lock:
                self.queued -= 1
                self.running += 1
            try:
                return fn(*job_args, **job_kwargs)
            finally:
                with self._lock:
                    self.running -= 1

        try:
            # The job's arguments go through the executor as they came, not inside a closure:
            # the stall guard's executor (server.stall_guard) finds the call and its request
            # reader among them.
            return self.executor.submit(run, *args, **kwargs)
        except BaseException:  # the executor is shut down: the call never counted
            with self._lock:
                self.queued -= 1
            raise

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        return None  # the threads belong to the shared executor


@dataclass
class LoadShedder:
    """Decides on arrival whether a call may queue for its role's pool.

    Parameters
    ----------
    pools : dict
        Role ("rank", "events", "admin", or "other" for reflection) -> its counted pool.
    max_total : int
        Calls held at once by all these pools together (0: no limit).
    role_limits : dict
        Role -> calls of that role held at once.
    max_queued_ranks : int
        Rank calls waiting for a thread (0: no limit).
    """

    pools: dict[str, CountedPool]
    max_total: int = 0
    role_limits: dict[str, int] | None = None
    max_queued_ranks: int = 0

    def refusal(self, role: str) -> str | None:
        """The reason to shed a call of ``role`` now (one of :data:`SHED_REASONS`), or None.

        gRPC's server hands calls to the interceptors from one polling thread, and a
        call counts (``submit``) before the next one is looked at, so the counts read here
        never miss an admitted call; they can only be lower than that by calls finishing.
        """
        pool = self.pools[role]
        if self.max_total and sum(p.in_flight for p in self.pools.values()) >= self.max_total:
            return "process"
        limit = (self.role_limits or {}).get(role)
        if limit is not None and pool.in_flight >= limit:
            return "role"
        if role == "rank" and self.max_queued_ranks and pool.queued >= self.max_queued_ranks:
            return "rank_queue"
        return None
