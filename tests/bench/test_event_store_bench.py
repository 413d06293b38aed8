"""bench.event_store's in-process figure of heavy buyers' state reads, on a real redis-server."""

from __future__ import annotations

from redis_support import RedisServer

from bench.event_store import heavy_buyers


def test_heavy_buyer_reads_are_timed_for_each_size(tmp_path):
    with RedisServer(tmp_path / "redis", appendfsync="everysec") as redis:
        got = heavy_buyers(f"{redis.url}?prefix=t", [70, 200], rounds=2)
    assert list(got) == ["70", "200"]
    for figures in got.values():
        assert set(figures) == {"whole_every_rank", "first", "kept", "after_a_purchase"}
        assert all(v > 0 for v in figures.values())
