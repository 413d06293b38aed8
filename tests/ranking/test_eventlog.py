"""The event log: framing, replay order, segment rollover, torn tails and real corruption."""

from __future__ import annotations

import os
import struct

import pytest

from ranking.realtime.eventlog import MAGIC, EventLog, EventLogCorrupt, EventLogError, encode, read_log, segments


def records(directory, **kw):
    return [rec for _, rec in read_log(directory, **kw)]


def test_replay_returns_every_record_in_append_order(tmp_path):
    log = EventLog(tmp_path, fsync="always")
    sent = [{"n": i, "text": "ünïcode ✓" * (i % 3)} for i in range(50)]
    for i in range(0, 50, 7):
        log.append(sent[i : i + 7])
    log.close()
    assert records(tmp_path) == sent


def test_segments_roll_over_by_size_and_replay_across_them_in_order(tmp_path):
    log = EventLog(tmp_path, segment_bytes=1024)
    sent = [{"n": i, "pad": "x" * 100} for i in range(60)]
    for r in sent:
        log.append([r])
    log.close()
    files = segments(tmp_path)
    assert len(files) >= 5
    assert [f.name for f in files] == sorted(f.name for f in files)
    assert all(f.stat().st_size < 1024 + 200 for f in files)
    assert records(tmp_path) == sent
    # Reopening appends to the newest segment, after its records.
    log = EventLog(tmp_path, segment_bytes=1024)
    log.append([{"n": 60}])
    log.close()
    assert records(tmp_path) == sent + [{"n": 60}]


@pytest.mark.parametrize("cut", [1, 4, 7, 8, 12, 20])
def test_torn_tail_is_detected_and_truncated_on_open(tmp_path, cut):
    log = EventLog(tmp_path)
    log.append([{"n": 1}, {"n": 2}])
    log.close()
    seg = segments(tmp_path)[-1]
    good = seg.stat().st_size
    torn = encode({"n": 3, "pad": "y" * 30})[:cut]  # a record whose write was cut short
    with open(seg, "ab") as fh:
        fh.write(torn)
    # A reader (e.g. the builder) stops before the torn record without touching the file.
    assert records(tmp_path) == [{"n": 1}, {"n": 2}]
    assert seg.stat().st_size == good + cut
    # The writer truncates it and appends after the last good record.
    log = EventLog(tmp_path)
    assert seg.stat().st_size == good
    log.append([{"n": 4}])
    log.close()
    assert records(tmp_path) == [{"n": 1}, {"n": 2}, {"n": 4}]


def test_checksum_mismatch_at_the_tail_is_torn_not_misread(tmp_path):
    log = EventLog(tmp_path)
    log.append([{"n": 1}, {"n": "last"}])
    log.close()
    seg = segments(tmp_path)[-1]
    data = bytearray(seg.read_bytes())
    data[-3] ^= 0xFF  # flip bits inside the last payload
    seg.write_bytes(bytes(data))
    assert records(tmp_path) == [{"n": 1}]
    EventLog(tmp_path).close()
    assert records(tmp_path) == [{"n": 1}]


def test_zero_filled_tail_is_not_read_as_records(tmp_path):
    log = EventLog(tmp_path)
    log.append([{"n": 1}])
    log.close()
    with open(segments(tmp_path)[-1], "ab") as fh:
        fh.write(b"\0" * 64)  # what some file systems leave after a power loss
    assert records(tmp_path) == [{"n": 1}]


def test_damage_before_the_tail_is_corruption_naming_file_and_offset(tmp_path):
    log = EventLog(tmp_path, segment_bytes=1024)
    for i in range(40):
        log.append([{"n": i, "pad": "z" * 80}])
    log.close()
    first = segments(tmp_path)[0]
    data = bytearray(first.read_bytes())
    offset = len(MAGIC) + struct.calcsize("<II") + 5
    data[offset] ^= 0x01
    first.write_bytes(bytes(data))
    with pytest.raises(EventLogCorrupt) as err:
        records(tmp_path)
    assert first.name in str(err.value) and f"byte {len(MAGIC)}" in str(err.value)
    with pytest.raises(EventLogCorrupt):
        list(read_log(tmp_path))


def test_a_file_that_is_not_a_segment_is_refused(tmp_path):
    (tmp_path / f"{1:020d}.log").write_bytes(b"hello, world, not a log")
    (tmp_path / f"{2:020d}.log").write_bytes(MAGIC)
    with pytest.raises(EventLogCorrupt, match="bad magic"):
        records(tmp_path)


def test_crash_while_creating_a_segment_leaves_a_usable_log(tmp_path):
    log = EventLog(tmp_path)
    log.append([{"n": 1}])
    log.close()
    (tmp_path / f"{2:020d}.log").write_bytes(MAGIC[:3])  # header cut short
    assert records(tmp_path) == [{"n": 1}]
    log = EventLog(tmp_path)
    log.append([{"n": 2}])
    log.close()
    assert records(tmp_path) == [{"n": 1}, {"n": 2}]


def test_policies_and_closed_log(tmp_path):
    with pytest.raises(ValueError, match="fsync policy"):
        EventLog(tmp_path, fsync="sometimes")
    for policy in ("interval", "never"):
        d = tmp_path / policy
        log = EventLog(d, fsync=policy, fsync_interval_seconds=0.01)
        log.append([{"p": policy}], durable=True)
        log.close()
        assert records(d) == [{"p": policy}]
    with pytest.raises(EventLogError, match="closed"):
        log.append([{"late": True}])


def test_unencodable_record_is_refused_before_anything_is_written(tmp_path):
    log = EventLog(tmp_path)
    log.append([{"n": 1}])
    with pytest.raises(ValueError):
        log.append([{"n": 2}, {"bad": float("nan")}])
    log.close()
    assert records(tmp_path) == [{"n": 1}]


def test_modified_since_skips_old_segments_but_never_the_newest(tmp_path):
    log = EventLog(tmp_path, segment_bytes=1024)
    for i in range(30):
        log.append([{"n": i, "pad": "w" * 100}])
    log.close()
    files = segments(tmp_path)
    for f in files[:-1]:
        os.utime(f, (1_000_000, 1_000_000))
    got = records(tmp_path, modified_since=2_000_000)
    assert got and got == records(tmp_path)[-len(got) :] and len(got) < 30


def test_one_writer_per_log(tmp_path):
    import subprocess
    import sys

    log = EventLog(tmp_path)
    code = f"from ranking import EventLog; EventLog({str(tmp_path)!r})"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert other.returncode != 0 and f"pid {os.getpid()}" in other.stderr
    log.close()
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)  # free again once closed


def test_writers_take_free_slots_and_a_tailer_follows_the_others(tmp_path):
    from ranking.realtime.eventlog import LogTailer, open_writer, read_all, writer_dirs

    a = open_writer(tmp_path)
    b = open_writer(tmp_path)
    assert [a.directory.name, b.directory.name] == ["w0", "w1"]
    tail_a = LogTailer(tmp_path, skip=a.directory)
    assert tail_a.poll() == []
    a.append([{"from": "a", "n": 0}])
    b.append([{"from": "b", "n": 0}, {"from": "b", "n": 1}])
    assert tail_a.poll() == [{"from": "b", "n": 0}, {"from": "b", "n": 1}]  # its own writes are not echoed
    assert tail_a.poll() == []
    b.segment_bytes = 1024  # roll over: the tailer follows into the next segment
    for n in range(2, 40):
        b.append([{"from": "b", "n": n, "pad": "p" * 60}])
    assert [r["n"] for r in tail_a.poll()] == list(range(2, 40))
    with open(b.current_segment, "ab") as fh:  # a record being written right now
        fh.write(encode({"from": "b", "n": 40})[:10])
    assert tail_a.poll() == []
    b.close()
    EventLog(b.directory).close()  # the next owner of the slot truncates the torn record
    c = open_writer(tmp_path)
    assert c.directory.name == "w1"  # the free slot is reused
    c.append([{"from": "c"}])
    assert tail_a.poll() == [{"from": "c"}]
    a.close()
    c.close()
    assert len(writer_dirs(tmp_path)) == 2
    assert sorted(r.get("n", -1) for _, r in read_all(tmp_path)) == [-1, 0] + list(range(40))


def test_quiet_polls_take_the_fast_path_yet_miss_nothing(tmp_path):
    """The tailer answers a quiet poll from a few stats; appends, rollovers and new writers still show."""
    from ranking import LogTailer, open_writer

    a = open_writer(tmp_path)
    tail = LogTailer(tmp_path, skip=a.directory)
    assert tail.poll() == [] and tail.poll() == []
    b = open_writer(tmp_path)  # a writer that appears after the tailer went quiet
    assert tail.poll() == []
    b.append([{"n": 0}])
    assert tail.poll() == [{"n": 0}]
    assert tail.poll() == [] and tail._quiet_signature is not None  # quiet again: fast path armed
    b.segment_bytes = 256
    got = []
    for n in range(1, 30):
        b.append([{"n": n, "pad": "p" * 40}])
        got += [r["n"] for r in tail.poll()]
    assert got == list(range(1, 30))
    c = open_writer(tmp_path)
    c.append([{"n": "c"}])
    assert tail.poll() == [{"n": "c"}]
    for w in (a, b, c):
        w.close()
