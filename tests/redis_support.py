"""A real redis-server for tests (bench.redis_server's): skipped locally when Debian's
redis-server is missing, a failure under CI=true, where `make deps-system` installs it."""

from __future__ import annotations

from pathlib import Path

from ops_tools import require_tool

from bench.redis_server import RedisServer as _RedisServer


def RedisServer(directory: Path, **kwargs) -> _RedisServer:
    """A :class:`bench.redis_server.RedisServer` on the redis-server that ``require_tool`` found."""
    return _RedisServer(directory, binary=require_tool("redis-server"), **kwargs)
