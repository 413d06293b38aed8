"""Frees handler threads held by calls whose request message never finishes arriving.

gRPC's synchronous server hands a call to a handler thread as soon as its HEADERS
arrive; that thread then waits, without a timeout, for the request message. A client
that sends the headers and part of the body and then stalls (slow or hostile) holds
the thread for as long as its connection lives, and a few such connections hold every
thread: health checks and Rank stop being answered. The guard is the executor the
server runs handlers on: it notes when a thread starts waiting for a unary request and
when that request arrives, and a watchdog cancels (``CANCELLED`` to the client) every
call still waiting after ``timeout`` seconds, which returns its thread to the pool.

What it needs of gRPC's internals is narrow, and checked: the job a unary call submits
carries the call (an argument with ``call.cancel``) and the closure that reads the
request (named ``unary_request``). A gRPC whose jobs carry neither is run unguarded,
with one warning logged (tests/server/test_slow_clients.py fails then).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent import futures
from typing import Any

log = logging.getLogger(__name__)

_THUNK_NAME = "unary_request"


class _Waiting:
    __slots__ = ("call", "since")

    def __init__(self, call: Any, since: float):
        self.call, self.since = call, since


class StallGuard:
    """Cancels calls still waiting for their request message after ``timeout`` seconds.

    Parameters
    ----------
    timeout : float
        Longest a call may take to deliver its whole request once its headers arrived.
        0 turns the guard off.
    on_cancel : callable, optional
        Called once per cancelled call (the server counts them in a metric).
    """

    def __init__(self, timeout: float, on_cancel: Callable[[], None] | None = None):
        self.timeout = timeout
        self.on_cancel = on_cancel
        self._lock = threading.Lock()
        self._waiting: dict[int, _Waiting] = {}
        self._next = 0
        self._warned = False
        self._stop = threading.Event()
        self._watchdog: threading.Thread | None = None

    def executor(
        self, max_workers: int, thread_name_prefix: str, initializer: Callable[[], None] | None = None
    ) -> futures.ThreadPoolExecutor:
        """A thread pool for ``grpc.server`` (or a method's own pool) whose unary calls are guarded."""
        return _GuardedExecutor(
            self, max_workers=max_workers, thread_name_prefix=thread_name_prefix, initializer=initializer
        )

    def close(self) -> None:
        self._stop.set()

    # -- bookkeeping -------------------------------------------------------------------
    def _wrap(self, args: tuple) -> tuple:
        """The job's arguments with the request-reading closure timed, when the job has one."""
        if self.timeout <= 0:
            return args
        call = next((getattr(a, "call", None) for a in args if hasattr(getattr(a, "call", None), "cancel")), None)
        k = next((i for i, a in enumerate(args) if getattr(a, "__name__", "") == _THUNK_NAME), None)
        if call is None or k is None:
            # A streaming request (reflection), or a gRPC whose jobs look different.
            if call is not None and not any(type(a).__name__ == "_RequestIterator" for a in args):
                self._warn_once()
            return args
        read = args[k]
        self._start_watchdog()

        def timed_read():
            with self._lock:
                key = self._next
                self._next += 1
                self._waiting[key] = _Waiting(call, time.monotonic())
            try:
                return read()
            finally:
                with self._lock:
                    self._waiting.pop(key, None)

        timed_read.__name__ = _THUNK_NAME
        return args[:k] + (timed_read,) + args[k + 1 :]

    def _warn_once(self) -> None:
        if not self._warned:
            self._warned = True
            log.warning("this gRPC's handler jobs are not the shape the stall guard knows; slow clients are unguarded")

    def _start_watchdog(self) -> None:
        if self._watchdog is not None:
            return
        with self._lock:
            if self._watchdog is None:
                self._watchdog = threading.Thread(target=self._watch, name="stall-guard", daemon=True)
                self._watchdog.start()

    def _watch(self) -> None:
        # Checked four times per timeout: a stalled call is cancelled within 1.25 timeouts.
        period = max(self.timeout / 4.0, 0.01)
        while not self._stop.wait(period):
            now = time.monotonic()
            with self._lock:
                late = [k for k, w in self._waiting.items() if now - w.since >= self.timeout]
                calls = [self._waiting.pop(k).call for k in late]
            for call in calls:
                try:
                    call.cancel()
                except Exception:  # a call that just finished on its own: nothing left to free
                    log.debug("stalled call already gone", exc_info=True)
                    continue
                if self.on_cancel is not None:
                    self.on_cancel()
            if calls:
                log.warning(
                    "cancelled calls whose request did not arrive in time",
                    extra={"calls": len(calls), "timeout_seconds": self.timeout},
                )


class _GuardedExecutor(futures.ThreadPoolExecutor):
    def __init__(self, guard: StallGuard, **kwargs: Any):
        super().__init__(**kwargs)
        self._guard = guard

    def submit(self, fn, /, *args, **kwargs):
        return super().submit(fn, *self._guard._wrap(args), **kwargs)
