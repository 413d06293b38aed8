"""The server's garbage-collector policy: long-lived objects frozen, and a frozen bundle still freed on reload."""

from __future__ import annotations

import gc
import time
import weakref

import pytest
from ops_tools import publish_copy
from prometheus_client import CollectorRegistry, Histogram

from one2one.v1 import ranking_pb2 as pb
from ranking import Event
from server import gc_policy
from server.config import ServerConfig
from server.model_manager import ModelManager
from server.realtime import Realtime
from server.servicer import RankingServicer


class _Context:
    def time_remaining(self):
        return None

    def set_trailing_metadata(self, md):
        pass

    def abort(self, code, details):
        raise AssertionError(f"Rank aborted: {code} {details}")


@pytest.fixture
def collector_paused():
    """Automatic collections off for the test, the frozen set emptied after it: freezing the
    test process would keep any cycle it holds now from ever being collected."""
    was_enabled = gc.isenabled()
    gc.disable()
    yield
    gc.unfreeze()
    if was_enabled:
        gc.enable()


def test_freeze_collects_what_is_garbage_then_exempts_the_rest(collector_paused):
    class Node:
        pass

    garbage, kept = Node(), Node()
    garbage.me = garbage  # a cycle: only the collector frees it
    kept.me = kept
    dead = weakref.ref(garbage)
    del garbage
    gc_policy.freeze()
    assert dead() is None
    assert gc.get_freeze_count() > 0
    assert not any(o is kept for o in gc.get_objects())  # out of every generation


def test_pause_watch_times_each_collection_and_writes_metrics_only_on_flush():
    registry = CollectorRegistry()
    hist = Histogram("gc_pause_seconds", "test", ["generation"], registry=registry)
    watch = gc_policy.PauseWatch(hist)
    try:
        watch.flush()  # whatever ran before this test
        gc.collect(1)
        gc.collect(2)

        def count(gen: str) -> float:
            return registry.get_sample_value("gc_pause_seconds_count", {"generation": gen}) or 0.0

        # The callback only queued the pauses: metrics are written by flush, on the serve loop.
        assert count("2") == 0
        assert watch.flush() >= 2
        assert count("1") >= 1 and count("2") >= 1
        assert registry.get_sample_value("gc_pause_seconds_sum", {"generation": "2"}) > 0
    finally:
        watch.close()
    assert watch._on_gc not in gc.callbacks
    gc.collect(2)
    assert watch.flush() == 0


def test_a_served_bundle_is_freed_on_reload_without_the_collector(collector_paused, bundle_path, tmp_path):
    # gc_policy freezes every loaded bundle; that is safe only while a swapped-out bundle,
    # its ranker and what serving attached to them hold no reference cycle, so that
    # reference counting alone frees them. Served through the servicer (real-time state,
    # sessions, explanations, an unknown user) before the swap, the collector off throughout.
    root = tmp_path / "artifacts"
    root.mkdir()
    publish_copy(bundle_path, root, "v-old")
    config = ServerConfig()
    config._apply({"artifacts": str(root), "event_log_dir": str(tmp_path / "events")}, "test")
    models = ModelManager(config.artifacts, config.ranker_config())
    assert models.load_current("startup")
    realtime = Realtime(config)
    realtime.replay()
    servicer = RankingServicer(models, config, realtime)
    old = models.current()
    user, item = str(old.model.users.ids[0]), str(old.model.items.ids[0])
    recorded = realtime.record(
        [Event(user_id=user, item_id=item, event_type="click", timestamp=time.time())], model=old.model
    )
    assert recorded.accepted == 1 and recorded.stale == 0
    for req in (
        pb.RankRequest(user_id=user, num_results=5, explain=True),
        pb.RankRequest(context=pb.Context(session_item_ids=[item])),
        pb.RankRequest(user_id="nobody-known"),
    ):
        assert servicer.Rank(req, _Context()).items
    gc_policy.freeze()
    ranker_ref, model_ref = weakref.ref(old), weakref.ref(old.model)
    del old
    publish_copy(bundle_path, root, "v-new")
    assert models.load_current("poll")
    assert servicer.Rank(pb.RankRequest(user_id=user), _Context()).model_version == "v-new"
    assert ranker_ref() is None and model_ref() is None
    realtime.close()
