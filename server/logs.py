"""Structured JSON logging: one object per line, extra fields and the request id included."""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import time

_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "taskName"}

# The id of the request the current thread is handling; every log line written while
# handling it carries it, so one grep finds everything a request did.
_REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("one2one_request_id", default="")


class _RequestContext:
    """The ``with`` block of :func:`request_context`: a class, as a generator context manager's
    frames cost several times more on every Rank."""

    __slots__ = ("request_id", "token")

    def __init__(self, request_id: str):
        self.request_id = request_id

    def __enter__(self) -> None:
        self.token = _REQUEST_ID.set(self.request_id)

    def __exit__(self, *exc) -> None:
        _REQUEST_ID.reset(self.token)


def request_context(request_id: str) -> _RequestContext:
    """Tag every log line written inside the block with ``request_id``.

    gRPC reuses its worker threads across requests, so the id is reset on the way
    out rather than left for the next request on the same thread.
    """
    return _RequestContext(request_id)


class Sampler:
    """Lets one event through per ``interval`` seconds and counts the ones it held back.

    For log lines that could come with every request under overload (a late answer):
    one line a second says what is happening, and how often, without flooding the log.
    Thread-safe enough for that: a lost count under a race only understates ``held``.
    """

    def __init__(self, interval: float = 1.0):
        self.interval = interval
        self._next = 0.0
        self._held = 0

    def take(self) -> int | None:
        """None when this event is held back; otherwise how many were held back since the last one."""
        now = time.monotonic()
        if now < self._next:
            self._held += 1
            return None
        self._next = now + self.interval
        held, self._held = self._held, 0
        return held


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        request_id = _REQUEST_ID.get()
        if request_id:
            doc["request_id"] = request_id
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                doc[key] = value
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str)


def setup(level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
