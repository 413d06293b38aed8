"""The event log on a real full disk (a small tmpfs) and a real read-only one (ext4 turned
read-only by its own error path). Regression (issue 22): once space returned, events whose
append had failed on the full disk appeared in the log and were replayed after a restart,
because the buffered writer kept the bytes it could not write and wrote them later."""

from __future__ import annotations

import pytest
from disk_faults import ext4_remount_ro, fill, small_tmpfs

from ranking.realtime.eventlog import EventLog, EventLogError, read_log


def rec(i: int, pad: int = 0) -> dict:
    return {"kind": "event", "user_id": f"u{i}", "pad": "x" * pad}


def logged(directory) -> list[str]:
    return [r["user_id"] for _, r in read_log(directory)]


@pytest.mark.slow
def test_full_disk_refuses_the_append_keeps_nothing_of_it_and_resumes_when_space_returns(tmp_path):
    with small_tmpfs(tmp_path / "mnt", "256k") as mnt:
        log = EventLog(mnt / "w0", segment_bytes=1 << 20)
        log.append([rec(1), rec(2)])
        filler = fill(mnt)
        acked = ["u1", "u2"]
        # The segment's last page still has room: what fits there is written and acknowledged.
        for i in range(1000, 2000):
            try:
                log.append([rec(i)])
            except EventLogError:
                break
            acked.append(f"u{i}")
        else:
            raise AssertionError("the disk never filled")
        refused = [f"u{i}"]
        # Batches of every size: some fail on the first byte, some after part of the batch
        # reached the file's last page (a partial write, then ENOSPC).
        for k, pad in enumerate((10, 500, 3000, 9000, 40000)):
            batch = [rec(100 + 10 * k + j, pad) for j in range(3)]
            with pytest.raises(EventLogError) as info:
                log.append(batch)
            assert info.value.reason == "no_space"
            refused += [r["user_id"] for r in batch]
        assert logged(mnt / "w0") == acked
        filler.unlink()
        log.append([rec(3)])  # resumes by itself: no reopen, no restart
        log.append([rec(4, 20000)])
        log.close()
        assert logged(mnt / "w0") == acked + ["u3", "u4"]
        # And after a restart (the writer's recovery of a torn tail included), still no refused event.
        again = EventLog(mnt / "w0")
        again.close()
        assert logged(mnt / "w0") == acked + ["u3", "u4"]
        assert not set(refused) & set(logged(mnt / "w0"))


@pytest.mark.slow
def test_full_disk_at_segment_rollover_leaves_no_empty_segment(tmp_path):
    with small_tmpfs(tmp_path / "mnt", "128k") as mnt:
        log = EventLog(mnt / "w0", segment_bytes=1024)
        log.append([rec(1, 1100)])  # past segment_bytes: the next append starts a new segment
        filler = fill(mnt)
        with pytest.raises(EventLogError):
            log.append([rec(2, 5000)])
        filler.unlink()
        log.append([rec(3)])
        log.close()
        assert logged(mnt / "w0") == ["u1", "u3"]
        names = sorted(p.name for p in (mnt / "w0").glob("*.log"))
        assert len(names) == 2, names


@pytest.mark.slow
def test_read_only_disk_refuses_appends_and_keeps_what_was_acknowledged(tmp_path):
    with ext4_remount_ro(tmp_path / "mnt", tmp_path / "disk.img") as (mnt, make_read_only):
        log = EventLog(mnt / "w0")
        log.append([rec(1), rec(2)])
        make_read_only()
        for _ in range(3):
            with pytest.raises(EventLogError) as info:
                log.append([rec(9, 100)])
            assert info.value.reason == "read_only"
        log.close()  # its final fsync fails too, and is logged, not raised
        assert logged(mnt / "w0") == ["u1", "u2"]
