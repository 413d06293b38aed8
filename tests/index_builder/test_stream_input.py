"""`index_builder build --events redis://...`: the shared store's streams read through the consumer
group, archived beside the bundle, acknowledged and trimmed only once the bundle is published.

Every test runs a real redis-server (tests/redis_support.py) and writes the streams with redis-py
as a server would, following ranking.realtime.redis_layout.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from redis_support import RedisServer
from tests_support import SMALL_BUILD

import index_builder.build as build_module
from bench.redis_server import free_port
from index_builder.__main__ import main
from index_builder.build import build
from index_builder.config import BuildConfig
from index_builder.event_archive import ARCHIVE_DIR, archive_records
from index_builder.experiment_report import collect
from index_builder.io import read_events
from index_builder.portfolio import load_event_state
from index_builder.stream_input import StreamInput, StreamInputError
from index_builder.synthetic import write_shop
from ranking import RankingModel, RedisEventStore, resolve_current
from ranking.realtime.redis_layout import BUILDER_GROUP, RECORD_FIELD, RedisLayout, encode

PREFIX = "shop"
# The ACL docs/operations.md gives the builder's user (the one line, with its placeholders).
BUILDER_ACL = next(
    line.strip().removeprefix("ACL SETUSER ")
    for line in (Path(__file__).parents[2] / "docs" / "operations.md").read_text().splitlines()
    if line.strip().startswith("ACL SETUSER one2one-builder")
)


@pytest.fixture
def store(tmp_path):
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()


def url(store: RedisServer) -> str:
    return f"{store.url}?prefix={PREFIX}"


def write_stream(store: RedisServer, records: list[dict], shards: int = 4) -> RedisLayout:
    """Append records as a server does: ``P:meta`` once, then each record on its customer's shard."""
    layout = RedisLayout(PREFIX, shards)
    r = store.client()
    r.hsetnx(layout.meta, "format", 1)
    r.hsetnx(layout.meta, "shards", shards)
    assert int(r.hget(layout.meta, "shards")) == shards
    pipe = r.pipeline(transaction=False)
    for rec in records:
        pipe.xadd(layout.stream(layout.shard(rec["user_id"])), {RECORD_FIELD: encode(rec)})
    pipe.execute()
    return layout


def event_records(table: pa.Table) -> list[dict]:
    return [{"kind": "event", **r, "timestamp": float(r["timestamp"]), "value": 0.0} for r in table.to_pylist()]


def impression(request_id: str, user_id: str) -> dict:
    return {
        "kind": "impression",
        "request_id": request_id,
        "user_id": user_id,
        "timestamp": 1_700_000_000.0,
        "experiment": "e",
        "arm": "b",
        "strategy": "PERSONAL",
        "items": ["i1"],
    }


def pending(store: RedisServer, layout: RedisLayout) -> int:
    """Entries delivered to the builder's group and not acknowledged (0 before the group exists)."""
    r = store.client()
    groups = {s: {g["name"].decode() for g in r.xinfo_groups(s)} for s in layout.streams() if r.exists(s)}
    return sum(r.xpending(s, BUILDER_GROUP)["pending"] for s, names in groups.items() if BUILDER_GROUP in names)


def stream_length(store: RedisServer, layout: RedisLayout) -> int:
    r = store.client()
    return sum(r.xlen(s) for s in layout.streams())


def archived(out) -> list[dict]:
    return list(archive_records(out / ARCHIVE_DIR))


def sort_key(table: pa.Table) -> list[tuple]:
    return sorted(zip(*(table[c].to_pylist() for c in ("user_id", "timestamp", "item_id", "event_type"))))


# ---------------------------------------------------------------------------
# Reading, acknowledging, trimming (no bundle built)
# ---------------------------------------------------------------------------


def test_stream_reads_like_the_csv_it_was_made_from(shop, store, tmp_path):
    pacsv.write_csv(shop.events, tmp_path / "events.csv")
    layout = write_stream(store, event_records(shop.events) + [impression("r1", "u1")])
    from_csv, _ = read_events(tmp_path / "events.csv")
    stream = StreamInput(url(store), tmp_path / "out").consume()
    from_stream, report = read_events(stream)
    assert report.total == 0 and from_stream.schema == from_csv.schema
    # Shards interleave customers; each customer's events keep their order.
    assert sort_key(from_stream) == sort_key(from_csv)
    assert from_stream["value"].null_count == shop.events.num_rows
    stream.commit()
    assert pending(store, layout) == 0 and stream_length(store, layout) == 0
    records = archived(tmp_path / "out")
    assert len(records) == shop.events.num_rows + 1
    assert sum(r["kind"] == "impression" for r in records) == 1
    # The archive is a source of its own, as a server's log directory is.
    again, _ = read_events(tmp_path / "out" / ARCHIVE_DIR)
    assert sort_key(again) == sort_key(from_csv)


def test_unacknowledged_entries_are_read_again_and_archived_once(store, tmp_path):
    rows = [
        {"kind": "event", "user_id": f"u{k % 7}", "item_id": f"i{k}", "event_type": "click", "timestamp": 1e9 + k}
        for k in range(50)
    ]
    layout = write_stream(store, rows)
    out = tmp_path / "out"
    crashed = StreamInput(url(store), out, batch=8).consume()
    assert len(list(crashed.records())) == 50
    crashed.close()  # the build died before publishing: nothing acknowledged
    assert pending(store, layout) == 50 and not (out / ARCHIVE_DIR).exists()

    second = StreamInput(url(store), out, batch=8).consume()
    assert second.summary()["reread_pending"] == 50 and second.summary()["new_entries"] == 50
    # The store goes away after the archive is written, before the acknowledgement.
    store.stop()
    with pytest.raises(StreamInputError, match="acknowledging"):
        second.commit()
    second.close()
    assert len(archived(out)) == 50
    store.start()  # same port and data (AOF)
    assert pending(store, layout) == 50

    third = StreamInput(url(store), out, batch=8).consume()
    summary = third.summary()
    assert summary["already_archived"] == 50 and summary["new_entries"] == 0
    third.commit()
    third.close()
    assert pending(store, layout) == 0 and stream_length(store, layout) == 0
    records = archived(out)
    assert sorted(r["item_id"] for r in records) == sorted(r["item_id"] for r in rows)


def test_entries_appended_during_the_read_are_left_for_the_next_build(store, tmp_path, monkeypatch):
    first = [
        {"kind": "event", "user_id": "u1", "item_id": f"i{k}", "event_type": "view", "timestamp": 1e9 + k}
        for k in range(10)
    ]
    late = [{**r, "item_id": f"late{k}", "timestamp": 2e9 + k} for k, r in enumerate(first[:3])]
    layout = write_stream(store, first, shards=1)
    read_group = RedisEventStore._read_group

    def append_after_snapshot(self, stream, after, count):
        # Between the snapshot of the stream's end and the first read of new entries.
        if after == ">" and not appended:
            appended.append(write_stream(store, late, shards=1))
        return read_group(self, stream, after, count)

    appended: list = []
    monkeypatch.setattr(RedisEventStore, "_read_group", append_after_snapshot)
    # A batch larger than the stream: the read is handed the late entries too.
    stream = StreamInput(url(store), tmp_path / "out", batch=100).consume()
    assert appended and [r["item_id"] for r in stream.records()] == [r["item_id"] for r in first]
    stream.commit()
    monkeypatch.undo()
    # Delivered but not acknowledged, and not trimmed.
    assert pending(store, layout) == 3 and stream_length(store, layout) == 3
    after = StreamInput(url(store), tmp_path / "out").consume()
    assert after.summary()["reread_pending"] == 3
    assert [r["item_id"] for r in after.records()] == [r["item_id"] for r in first + late]
    after.commit()
    assert pending(store, layout) == 0 and stream_length(store, layout) == 0
    # Two builds within a second: the archive still reads in the order they consumed.
    assert [r["item_id"] for r in archived(tmp_path / "out")] == [r["item_id"] for r in first + late]


def test_reports_read_the_archive(store, tmp_path):
    records = [
        impression("r1", "u1"),
        impression("r2", "u2"),
        {
            "kind": "event",
            "user_id": "u1",
            "item_id": "i1",
            "event_type": "click",
            "timestamp": 1e9,
            "request_id": "r1",
        },
    ]
    write_stream(store, records)
    stream = StreamInput(url(store), tmp_path / "out").consume()
    stream.commit()
    arms, unattributed = collect(tmp_path / "out" / ARCHIVE_DIR)
    assert unattributed == 0
    assert arms[("e", "b")].impressions == 2 and arms[("e", "b")].events["click"] == 1
    # A portfolio run's real-time events (--event-log) from the archive too.
    state, kept = load_event_state(tmp_path / "out" / ARCHIVE_DIR, until=1e9 + 60)
    assert kept == 1 and [e.item_id for e in state.events("u1")] == ["i1"]


def test_the_builder_needs_only_the_documented_acl(store, tmp_path):
    # docs/operations.md, "Shared event store": the builder's least-privilege ACL user.
    rows = [{"kind": "event", "user_id": "u1", "item_id": "i1", "event_type": "click", "timestamp": 1e9}]
    layout = write_stream(store, rows)
    acl = BUILDER_ACL.replace("BUILDER_PASSWORD", "pw").replace("~one2one:*", f"~{PREFIX}:*")
    store.client().execute_command("ACL", "SETUSER", *acl.split())
    stream = StreamInput(f"redis://one2one-builder:pw@127.0.0.1:{store.port}/0?prefix={PREFIX}", tmp_path).consume()
    assert [r["item_id"] for r in stream.records()] == ["i1"]
    stream.commit()
    assert pending(store, layout) == 0 and stream_length(store, layout) == 0
    # And no more: it cannot write to the streams it reads.
    import redis

    with pytest.raises(redis.exceptions.NoPermissionError):
        redis.Redis(port=store.port, username="one2one-builder", password="pw").xadd(layout.stream(0), {"r": b"{}"})


def test_unreachable_store_is_named_without_its_password(tmp_path):
    port = free_port()
    with pytest.raises(StreamInputError) as err:
        StreamInput(f"redis://:hunter2@127.0.0.1:{port}/0?prefix=P", tmp_path, timeout=2).consume()
    assert f"redis://:***@127.0.0.1:{port}/0?prefix=P" in str(err.value)
    assert "hunter2" not in str(err.value) and "failed (connection)" in str(err.value)


def test_malformed_store_url_is_a_usage_error_without_its_password(capsys):
    with pytest.raises(SystemExit) as done:
        main(["build", "--events", "redis://:hunter2@/0?prefix=P", "--items", "i.csv", "--out", "o"])
    err = capsys.readouterr().err
    assert done.value.code == 2 and "names no host" in err and "hunter2" not in err


def test_store_without_events_of_the_prefix_is_an_error(store, tmp_path, capsys):
    with pytest.raises(StreamInputError, match=r"no shop:meta hash"):
        StreamInput(url(store), tmp_path).consume()
    # Through the command line: exit code 2 and the message, nothing published.
    (tmp_path / "items.csv").write_text("item_id\ni1\n")
    code = main(["build", "--quiet", "--events", url(store), "--items", str(tmp_path / "items.csv")]
                + ["--out", str(tmp_path / "art")])  # fmt: skip
    assert code == 2 and "no shop:meta hash" in capsys.readouterr().err
    assert not (tmp_path / "art" / "CURRENT").exists()


# ---------------------------------------------------------------------------
# Whole builds
# ---------------------------------------------------------------------------


def _arrays(path) -> dict[str, np.ndarray]:
    return {p.stem: np.load(p, allow_pickle=False) for p in sorted(path.glob("*.npy"))}


@pytest.mark.slow
def test_bundle_from_the_stream_equals_the_bundle_from_the_csv(shop, store, tmp_path):
    files = write_shop(shop, tmp_path / "shop", "csv")
    # One shard: the stream holds the events in the CSV's order, so the fit sees the same rows.
    write_stream(store, event_records(shop.events), shards=1)
    cfg = BuildConfig.load(overrides=SMALL_BUILD)
    a = build(files["events"], files["items"], files["users"], tmp_path / "csv", cfg, show_progress=False)
    b = build(url(store), files["items"], files["users"], tmp_path / "redis", cfg, show_progress=False)
    ra, rb = _arrays(a), _arrays(b)
    assert ra.keys() == rb.keys()
    for name in ra:
        np.testing.assert_array_equal(ra[name], rb[name], err_msg=name)
    ma, mb = RankingModel(a).manifest, RankingModel(b).manifest
    assert ma["counts"] == mb["counts"] and ma["data_profile"] == mb["data_profile"]
    assert mb["inputs"]["events"] == f"{store.url}?prefix={PREFIX}"
    assert mb["event_store"]["new_events"] == shop.events.num_rows


@pytest.mark.slow
def test_consumer_group_survives_a_crash_mid_build(shop, store, tmp_path, monkeypatch):
    files = write_shop(shop, tmp_path / "shop", "csv")
    layout = write_stream(store, event_records(shop.events) + [impression("r1", "u1")])
    n = shop.events.num_rows
    cfg = BuildConfig.load(overrides={**SMALL_BUILD, "ladder_report": False, "rerank": False})
    out = tmp_path / "art"
    ann_evaluation = build_module._ann_evaluation

    def crash(*args):
        raise RuntimeError("the builder died mid-build")

    monkeypatch.setattr(build_module, "_ann_evaluation", crash)
    with pytest.raises(RuntimeError, match="died mid-build"):
        build(url(store), files["items"], None, out, cfg, show_progress=False)
    assert not (out / "CURRENT").exists() and not (out / ARCHIVE_DIR).exists()
    assert pending(store, layout) == n + 1

    # The next build reads everything again; a customer's purchase arrives while it runs.
    t = int(shop.events["timestamp"].to_numpy().max()) + 3600
    late = [{"kind": "event", "user_id": "late", "item_id": "i3", "event_type": "purchase", "timestamp": float(t)}]

    def append_then_evaluate(*args):
        write_stream(store, late)
        return ann_evaluation(*args)

    monkeypatch.setattr(build_module, "_ann_evaluation", append_then_evaluate)
    first = build(url(store), files["items"], None, out, cfg, show_progress=False)
    monkeypatch.undo()
    assert RankingModel(first).manifest["counts"]["events"] == n
    assert RankingModel(first).manifest["event_store"]["reread_pending"] == n + 1
    assert pending(store, layout) == 0
    assert stream_length(store, layout) == 1  # the late purchase: neither acknowledged nor trimmed
    records = archived(out)
    assert len(records) == n + 1
    keys = [(r.get("user_id"), r.get("item_id"), r["timestamp"], r.get("event_type")) for r in records]
    assert len(set(keys)) == len(keys)

    # A later build: the whole history from the archive, plus the stream's late purchase.
    second = build(url(store), files["items"], None, out, cfg, show_progress=False)
    assert resolve_current(out) == second
    m = RankingModel(second)
    assert m.manifest["counts"]["events"] == n + 1
    assert m.manifest["event_store"]["new_events"] == 1
    assert m.users.row("late") >= 0
    assert pending(store, layout) == 0 and stream_length(store, layout) == 0
    assert len(list((out / ARCHIVE_DIR).glob("*.parquet"))) == 2
    assert pq.read_table(sorted((out / ARCHIVE_DIR).glob("*.parquet"))[-1]).num_rows == 1


@pytest.mark.slow
def test_a_build_killed_after_reading_loses_nothing(shop, store, tmp_path):
    """kill -9 of a real build process once it holds every entry unacknowledged."""
    files = write_shop(shop, tmp_path / "shop", "csv")
    layout = write_stream(store, event_records(shop.events))
    n = shop.events.num_rows
    out = tmp_path / "art"
    sets = [a for k, v in SMALL_BUILD.items() for a in ("--set", f"{k}={v}")] + ["--set", "ladder_report=false"]
    argv = [sys.executable, "-m", "index_builder", "build", "--quiet", "--events", url(store)]
    argv += ["--items", str(files["items"]), "--out", str(out), *sets]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while pending(store, layout) < n:
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "the build never read the stream"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(30)
    assert not (out / "CURRENT").exists(), "the build finished before it was killed: nothing was tested"
    assert pending(store, layout) == n and stream_length(store, layout) == n

    done = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    m = RankingModel(resolve_current(out))
    assert m.manifest["counts"]["events"] == n and m.manifest["event_store"]["reread_pending"] == n
    assert pending(store, layout) == 0 and stream_length(store, layout) == 0
    assert len(archived(out)) == n
