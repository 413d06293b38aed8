"""`index_builder build` reads a server's event log directory as an events source."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from tests_support import SMALL_BUILD

from index_builder.io import InputError, read_events
from ranking import RankingModel, resolve_current
from ranking.realtime.eventlog import EventLog, segments


def write_log(directory, rows, segment_bytes=4096):
    log = EventLog(directory, fsync="never", segment_bytes=segment_bytes)
    for r in rows:
        log.append([{"kind": "event", **r}])
    # Impressions share the log; the builder must ignore them.
    log.append(
        [
            {
                "kind": "impression",
                "request_id": "r1",
                "user_id": "u1",
                "timestamp": 1.0,
                "experiment": "e",
                "arm": "a",
                "items": ["i1"],
            }
        ]
    )
    log.close()


def test_log_reads_like_the_csv_it_was_made_from(shop, tmp_path):
    ev = shop.events.to_pylist()
    write_log(tmp_path / "log", [{**r, "value": 0.0} for r in ev])
    assert len(segments(tmp_path / "log")) > 1
    table, report = read_events(tmp_path / "log")
    assert table.num_rows == len(ev) and report.total == 0
    assert table["user_id"].to_pylist() == [r["user_id"] for r in ev]
    assert table["timestamp"].to_pylist() == [r["timestamp"] for r in ev]
    assert table["value"].null_count == len(ev)  # the API's 0 means "not given"


def test_bad_event_in_the_log_is_named_by_record(tmp_path):
    write_log(
        tmp_path / "log",
        [
            {"user_id": "u1", "item_id": "i1", "event_type": "click", "timestamp": 1_700_000_000.0, "value": 0.0},
            {"user_id": " ", "item_id": "i1", "event_type": "click", "timestamp": 1_700_000_000.0, "value": 0.0},
        ],
    )
    with pytest.raises(InputError) as err:
        read_events(tmp_path / "log")
    assert err.value.row == 2 and err.value.column == "user_id"
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="holds no event log"):
        read_events(tmp_path / "empty")


def test_build_combines_history_file_and_event_log(shop, shop_files, tmp_path):
    t = int(shop.events["timestamp"].to_numpy().max()) + 3600
    write_log(
        tmp_path / "log",
        [
            {"user_id": "newcomer", "item_id": f"i{i}", "event_type": "purchase", "timestamp": float(t), "value": 9.5}
            for i in np.flatnonzero(shop.item_category == 1)[:8]
        ],
    )
    sets = [a for k, v in SMALL_BUILD.items() for a in ("--set", f"{k}={v}")]
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "index_builder",
            "build",
            "--quiet",
            "--events",
            str(shop_files["events"]),
            "--events",
            str(tmp_path / "log"),
            "--items",
            str(shop_files["items"]),
            "--out",
            str(tmp_path / "art"),
            *sets,
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    m = RankingModel(resolve_current(tmp_path / "art"))
    row = m.users.row("newcomer")
    assert row >= 0 and m.user_has_history[row]
    assert m.manifest["counts"]["events"] == shop.events.num_rows + 8
    assert len(m.consumed.row(row)) == 8
    assert m.manifest["inputs"]["events"] == [str(shop_files["events"]), str(tmp_path / "log")]


def test_corrupt_log_stops_the_build_with_the_segment_named(shop_files, tmp_path):
    write_log(
        tmp_path / "log",
        [
            {"user_id": "u1", "item_id": f"i{k}", "event_type": "view", "timestamp": 1_700_000_000.0, "value": 0.0}
            for k in range(200)
        ],
        segment_bytes=2048,
    )
    first = segments(tmp_path / "log")[0]
    data = bytearray(first.read_bytes())
    data[20] ^= 0x55
    first.write_bytes(bytes(data))
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "index_builder",
            "build",
            "--quiet",
            "--events",
            str(tmp_path / "log"),
            "--items",
            str(shop_files["items"]),
            "--out",
            str(tmp_path / "a"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2 and first.name in done.stderr and "corrupt record" in done.stderr
    assert not (tmp_path / "a" / "CURRENT").exists()
