"""The durable event log: segmented append-only files of checksummed records, and their replay.

Layout: a directory of segments named ``<20-digit number>.log``, numbered in order.
Each segment starts with the 8-byte magic ``O2OLOG1\\n``; then records, each

    uint32 little-endian  payload length (>= 2)
    uint32 little-endian  CRC-32 of the payload
    payload               UTF-8 JSON object

A record is only ever appended whole, with one ``write``; a crash (kill -9, power
loss) can at worst leave a torn record at the end of the newest segment. On open
the writer finds it by its length or checksum, logs it and truncates it away, so
appends continue after the last good record. Damage anywhere else is not a torn
tail but corruption, and reading stops with :class:`EventLogCorrupt` naming the
file and byte offset rather than misreading or skipping records silently.

Durability is set by the fsync policy: ``always`` (default) fsyncs before
:meth:`EventLog.append` returns for durable appends, so an acknowledged event
survives a machine crash; ``interval`` fsyncs from a background thread every
``fsync_interval_seconds`` (a crash of the machine, not of the process, can lose
that much); ``never`` leaves it to the OS. A process crash alone loses nothing
written in any policy, since written bytes are in the page cache.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import re
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ranking.bundle.store import fsync_dir
from ranking.config import EventLogSettings
from ranking.errors import Unavailable

log = logging.getLogger(__name__)

MAGIC = b"O2OLOG1\n"
_HEADER = struct.Struct("<II")
_SEGMENT_RE = re.compile(r"^(\d{20})\.log$")
FSYNC_POLICIES = ("always", "interval", "never")
# A record is a JSON object, so never shorter than "{}"; a zero-filled tail (what some
# file systems leave after a crash) thus never reads as a valid empty record.
_MIN_PAYLOAD = 2
_MAX_PAYLOAD = 16 << 20


class EventLogError(Unavailable):
    """The event log cannot be written; nothing of the failed append is kept.

    ``reason`` says why, for metrics and alerts: "no_space" (the file system or a quota is
    full), "read_only" (it is mounted or remounted read-only), "io_error" (any other
    failure), or "closed" / "busy" for a writer that is closed or already taken.
    """

    def __init__(self, message: str, reason: str = "io_error"):
        super().__init__(message)
        self.reason = reason


def _reason(exc: OSError) -> str:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return "no_space"
    if exc.errno == errno.EROFS:
        return "read_only"
    return "io_error"


class EventLogCorrupt(EventLogError):
    """A record before the end of the log is damaged; names the segment and the byte offset."""

    def __init__(self, path: Path, offset: int, reason: str):
        self.path, self.offset = path, offset
        super().__init__(
            f"{path}: corrupt record at byte {offset}: {reason}; move the damaged segment aside to serve without it"
        )


@dataclass(frozen=True)
class Position:
    """Where a record starts: segment file and byte offset."""

    path: Path
    offset: int


def encode(record: dict) -> bytes:
    """One framed record: length, CRC-32 and the compact JSON payload."""
    payload = json.dumps(record, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()
    if len(payload) > _MAX_PAYLOAD:
        raise EventLogError(f"record of {len(payload)} bytes exceeds the {_MAX_PAYLOAD}-byte limit")
    return _HEADER.pack(len(payload), zlib.crc32(payload)) + payload


def _write_all(fh, data: bytes) -> None:
    """Write every byte with unbuffered writes (one may write less than asked), or raise OSError."""
    view = memoryview(data)
    while view:
        n = fh.write(view)
        if not n:  # FileIO returns None only for a non-blocking file; 0 would loop forever
            raise OSError(errno.EIO, "write made no progress")
        view = view[n:]


def segments(directory: Path) -> list[Path]:
    """The log's segment files, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if _SEGMENT_RE.match(p.name))


def _scan(path: Path, data: bytes, base: int = 0) -> tuple[list[tuple[int, dict]], int, str]:
    """Parse a segment's bytes: (offset, record) pairs, the end of the last good record, and why
    parsing stopped early ("" when the segment ended cleanly). ``data`` starts at byte ``base``
    of the file (a tailer reads on from where it stopped; offsets are file offsets)."""
    if base == 0:
        if len(data) < len(MAGIC):
            return [], 0, f"segment header is {len(data)} bytes, expected {len(MAGIC)}" if data else "empty segment"
        if data[: len(MAGIC)] != MAGIC:
            raise EventLogCorrupt(path, 0, "not an event log segment (bad magic)")
        out: list[tuple[int, dict]] = []
        pos, n = len(MAGIC), len(data)
    else:
        out, pos, n = [], 0, len(data)
    while pos < n:
        if n - pos < _HEADER.size:
            return out, base + pos, f"{n - pos} trailing bytes, shorter than a record header"
        length, crc = _HEADER.unpack_from(data, pos)
        if not _MIN_PAYLOAD <= length <= _MAX_PAYLOAD:
            return out, base + pos, f"record length {length} is out of range"
        end = pos + _HEADER.size + length
        if end > n:
            return out, base + pos, f"record of {length} bytes is cut off after {n - pos - _HEADER.size}"
        payload = data[pos + _HEADER.size : end]
        if zlib.crc32(payload) != crc:
            return out, base + pos, "checksum mismatch"
        try:
            rec = json.loads(payload)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            # The checksum matched, so these are the bytes that were written: a writer bug, not a torn write.
            raise EventLogCorrupt(path, base + pos, f"payload is not JSON ({exc})") from None
        if not isinstance(rec, dict):
            raise EventLogCorrupt(path, base + pos, "payload is not a JSON object")
        out.append((base + pos, rec))
        pos = end
    return out, base + pos, ""


def read_log(
    directory: Path | str, *, repair: bool = False, modified_since: float | None = None
) -> Iterator[tuple[Position, dict]]:
    """Every record of the log in append order.

    Parameters
    ----------
    directory : Path
        The log directory.
    repair : bool
        Truncate a torn tail of the newest segment (only the writer does this; a reader
        of a log being written stops before an incomplete tail instead).
    modified_since : float, optional
        Skip whole segments last modified before this unix time (replay of recent state).

    Yields
    ------
    (Position, dict)

    Raises
    ------
    EventLogCorrupt
        A damaged record in any segment but the newest, or a segment that is not a log.
    """
    files = segments(Path(directory))
    for k, path in enumerate(files):
        last = k == len(files) - 1
        if modified_since is not None and not last and path.stat().st_mtime < modified_since:
            continue
        data = path.read_bytes()
        records, good_end, problem = _scan(path, data)
        for offset, rec in records:
            yield Position(path, offset), rec
        if problem:
            if not last:
                raise EventLogCorrupt(path, good_end, problem)
            if repair:
                log.warning(
                    "truncating torn tail of the event log",
                    extra={
                        "segment": str(path),
                        "offset": good_end,
                        "bytes_dropped": len(data) - good_end,
                        "reason": problem,
                    },
                )
                _truncate(path, good_end)


def _truncate(path: Path, size: int) -> None:
    with open(path, "r+b") as fh:
        if size < len(MAGIC):
            # Crashed while creating the segment: give it a whole header again.
            fh.truncate(0)
            fh.write(MAGIC)
        else:
            fh.truncate(size)
        fh.flush()
        os.fsync(fh.fileno())


class EventLog:
    """The writer: appends framed records to the newest segment, rolling over by size.

    Parameters
    ----------
    directory : Path
        Created if missing.
    fsync : {"always", "interval", "never"}
        See the module docstring; "always" is what makes an acknowledged event survive.
    segment_bytes : int
        A new segment is started once the current one reaches this size.
    fsync_interval_seconds : float
        Period of the background fsync under the "interval" policy.

    Raises
    ------
    EventLogCorrupt
        The existing log is damaged before its tail (see :func:`read_log`).
    EventLogError
        Another process holds the log open for writing (one writer per log: two would
        race on rollover, and each would serve only the events it recorded itself).
    """

    def __init__(
        self,
        directory: Path | str,
        fsync: str = EventLogSettings.fsync,
        segment_bytes: int = EventLogSettings.segment_bytes,
        fsync_interval_seconds: float = EventLogSettings.fsync_interval_seconds,
    ):
        if fsync not in FSYNC_POLICIES:
            raise ValueError(f"fsync policy must be one of {', '.join(FSYNC_POLICIES)}, got {fsync!r}")
        if segment_bytes < 1024:
            raise ValueError(f"segment_bytes must be >= 1024, got {segment_bytes}")
        self.directory = Path(directory)
        self.fsync = fsync
        self.segment_bytes = segment_bytes
        self.fsync_interval_seconds = fsync_interval_seconds
        self.directory.mkdir(parents=True, exist_ok=True)
        self._lockfile = open(self.directory / "LOCK", "a+")
        try:
            fcntl.flock(self._lockfile, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lockfile.seek(0)
            holder = self._lockfile.read().strip() or "unknown"
            self._lockfile.close()
            raise EventLogError(
                f"event log {self.directory} is already open for writing by another process "
                f"(pid {holder}); give each server its own event_log_dir",
                reason="busy",
            ) from None
        # The kernel drops the lock when the process dies, kill -9 included; the pid is for the message.
        self._lockfile.truncate(0)
        self._lockfile.write(str(os.getpid()))
        self._lockfile.flush()
        self._lock = threading.Lock()
        self._dirty = False
        self._closed = False
        self.bytes_appended = 0
        files = segments(self.directory)
        if files:
            # Only the tail can be torn; recovering it here means appends continue after good data.
            for _ in read_log(self.directory, repair=True, modified_since=time.time() + 1):
                pass
            self._number = int(files[-1].stem)  # segments() kept only <20 digits>.log names
            # Unbuffered: a buffered writer keeps what a failed write could not put on disk
            # and writes it with the next append, so events refused on a full disk appeared
            # in the log once space returned (issue 22). Every byte here is written by one
            # os.write or not at all.
            self._fh = open(files[-1], "ab", buffering=0)
        else:
            self._number = 0
            self._fh = self._create(1)
        # The end of the last whole record: a failed append is cut back to it.
        self._size = os.fstat(self._fh.fileno()).st_size
        self._torn: int | None = None
        self._flusher = None
        if fsync == "interval":
            self._flusher = threading.Thread(target=self._flush_loop, name="eventlog-fsync", daemon=True)
            self._flusher.start()

    @property
    def current_segment(self) -> Path:
        return Path(self._fh.name)

    def _create(self, number: int):
        """A new segment holding its header, or nothing at all (a failed create leaves no file)."""
        path = self.directory / f"{number:020d}.log"
        fh = open(path, "xb", buffering=0)
        try:
            _write_all(fh, MAGIC)
            if self.fsync != "never":
                os.fsync(fh.fileno())
                fsync_dir(self.directory)
        except OSError:
            fh.close()
            path.unlink(missing_ok=True)
            raise
        self._number = number
        return fh

    def _roll(self) -> None:
        old = self._fh
        if self.fsync != "never":
            os.fsync(old.fileno())
        self._fh = self._create(self._number + 1)
        self._size, self._torn = len(MAGIC), None
        old.close()

    def append(self, records: list[dict], durable: bool = True) -> None:
        """Append records in order, all or none.

        Parameters
        ----------
        records : list of dict
            JSON-able objects.
        durable : bool
            Under the "always" policy, fsync before returning. Impressions pass False:
            they are written (safe from a process crash) but not worth an fsync each.

        Raises
        ------
        EventLogError
            The write failed (disk full, I/O error); the log is left as it was before.
        """
        if not records:
            return
        blob = b"".join(encode(r) for r in records)
        with self._lock:
            if self._closed:
                raise EventLogError(f"event log {self.directory} is closed", reason="closed")
            try:
                if self._torn is not None:
                    # A failed append whose bytes could not be cut away: nothing may follow them.
                    self._cut(self._torn)
                if self._size >= self.segment_bytes:
                    self._roll()
            except OSError as exc:
                raise EventLogError(
                    f"cannot append to event log {self.current_segment}: {exc}", reason=_reason(exc)
                ) from exc
            start = self._size
            try:
                _write_all(self._fh, blob)
                if durable and self.fsync == "always":
                    os.fsync(self._fh.fileno())
                else:
                    self._dirty = True
            except OSError as exc:
                # Whatever part of the batch reached the file is cut away at once: left there,
                # a later append would land after it and a reader would take it for a torn
                # record mid-log, or (had it been whole) replay an event the caller was told
                # had failed. If even that fails, the next append cuts it before writing.
                self._torn = start
                try:
                    self._cut(start)
                except OSError:
                    log.exception(
                        "cannot undo a failed append yet; retried before the next one",
                        extra={"segment": str(self.current_segment), "offset": start},
                    )
                raise EventLogError(
                    f"cannot append to event log {self.current_segment}: {exc}", reason=_reason(exc)
                ) from exc
            self._size = start + len(blob)
            self.bytes_appended += len(blob)

    def _cut(self, size: int) -> None:
        """Truncate the current segment to ``size`` bytes and make that durable."""
        os.ftruncate(self._fh.fileno(), size)
        # A new segment is open without O_APPEND: its position must come back too, or the
        # next write lands past the cut and leaves a hole of zeros mid-log.
        os.lseek(self._fh.fileno(), size, os.SEEK_SET)
        if self.fsync != "never":
            os.fsync(self._fh.fileno())
        self._size, self._torn = size, None

    def sync(self) -> None:
        """Fsync whatever was written but not yet synced."""
        with self._lock:
            if self._dirty and not self._closed:
                os.fsync(self._fh.fileno())
                self._dirty = False

    def _flush_loop(self) -> None:
        while not self._closed:
            time.sleep(self.fsync_interval_seconds)
            try:
                self.sync()
            except OSError:
                log.exception("background fsync of the event log failed")

    def close(self) -> None:
        """Sync (unless the policy is "never") and close; later appends raise EventLogError."""
        if self.fsync != "never":
            try:
                self.sync()
            except OSError:
                log.exception("final fsync of the event log failed", extra={"segment": str(self.current_segment)})
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._fh.close()
            self._lockfile.close()


# -- several writers ------------------------------------------------------------------------
# A server with several worker processes has several writers. Each takes its own writer
# directory ``w<k>/`` under the log root (the first whose lock it gets, so a replaced worker
# takes over the slot of the one that died, torn tail included), and every worker tails the
# others' directories before each Rank, so an event acknowledged by one worker is in the
# next ranking whichever worker serves it.
_WRITER_RE = re.compile(r"^w(\d+)$")


def writer_dirs(root: Path | str) -> list[Path]:
    """The writer directories under a log root, in slot order."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _WRITER_RE.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def log_dirs(root: Path | str) -> list[Path]:
    """Every single-writer log under ``root``: the root itself if it holds segments, then its writers."""
    root = Path(root)
    return ([root] if segments(root) else []) + writer_dirs(root)


def open_writer(root: Path | str, max_writers: int = 1024, **kwargs) -> EventLog:
    """An :class:`EventLog` on the first free writer directory ``root/w<k>``.

    Raises
    ------
    EventLogError
        All ``max_writers`` slots are held by live processes.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for k in range(max_writers):
        try:
            return EventLog(root / f"w{k}", **kwargs)
        except EventLogError as exc:
            if "already open for writing" not in str(exc):
                raise
    raise EventLogError(f"all {max_writers} writer slots of event log {root} are in use")


def read_all(root: Path | str, modified_since: float | None = None) -> Iterator[tuple[Position, dict]]:
    """Every record of every writer under ``root`` (writer by writer, each in append order)."""
    for d in log_dirs(root):
        yield from read_log(d, modified_since=modified_since)


class LogTailer:
    """Reads what other writers appended since the last call, record by record.

    Parameters
    ----------
    root : Path
        The log root.
    skip : Path, optional
        A writer directory not to follow (the caller's own: it applies its writes directly).

    Not thread-safe; callers serialise :meth:`poll`.
    """

    def __init__(self, root: Path | str, skip: Path | None = None):
        self.root = Path(root)
        self.skip = Path(skip).resolve() if skip is not None else None
        # writer dir -> [segment path, offset of the next unread byte]
        self._pos: dict[Path, list] = {}
        self._broken: set[Path] = set()
        # The fast path before each Rank: what to stat, and what the stats said when the
        # last full poll started. A new writer or segment changes a directory's mtime, an
        # append changes the current segment's size.
        self._watch: tuple[str, ...] = ()
        self._quiet_signature: tuple | None = None
        self._followed: list[Path] = []

    def _signature(self) -> tuple | None:
        w = self._watch
        sig: list[int] = []
        try:
            for i in range(0, len(w), 2):
                st = os.stat(w[i])
                # A pair of one path (the root, a writer without a segment) is one stat.
                sig += (st.st_mtime_ns, (st if w[i + 1] == w[i] else os.stat(w[i + 1])).st_size)
        except OSError:
            return None
        return tuple(sig)

    def _watch_list(self) -> tuple[str, ...]:
        # Pairs of (directory, its current segment or itself): the root, then every writer
        # followed, also those with no segment yet.
        pairs = [str(self.root), str(self.root)]
        for d in self._followed:
            seg = self._pos.get(d, (None, 0))[0]
            pairs += [str(d), str(seg if seg is not None else d)]
        return tuple(pairs)

    def poll(self, modified_since: float | None = None, strict: bool = False) -> list[dict]:
        """The records appended since the last poll (all of them on the first), in order per writer.

        A record still being written is left for the next poll. A damaged record before a
        writer's tail raises :class:`EventLogCorrupt` when ``strict`` (start-up: serve
        nothing rather than a silently shortened history); otherwise it stops following
        that writer, with an error logged (a Rank must not fail on another process's disk).
        """
        if modified_since is None and self._quiet_signature is not None and self._signature() == self._quiet_signature:
            return []  # nothing appended, rolled over or added since the last full poll
        before = self._signature() if self._watch else None
        watch_before = self._watch
        out: list[dict] = self._poll_all(modified_since, strict)
        self._watch = self._watch_list()
        # Trust the stats taken before this poll only if it followed the same files: an
        # append during the poll then still differs from them and is read next time.
        self._quiet_signature = before if self._watch == watch_before else None
        return out

    def _poll_all(self, modified_since: float | None, strict: bool) -> list[dict]:
        out: list[dict] = []
        self._followed = []
        for d in log_dirs(self.root):
            rd = d.resolve()
            if rd == self.skip or rd in self._broken:
                continue
            self._followed.append(rd)
            try:
                self._poll_dir(rd, out, modified_since)
            except (EventLogCorrupt, OSError) as exc:
                if strict:
                    raise
                self._broken.add(rd)
                log.error("stopped following an event log writer", extra={"writer": str(rd), "error": str(exc)})
        return out

    def _poll_dir(self, d: Path, out: list[dict], modified_since: float | None) -> None:
        files = segments(d)
        if not files:
            return
        seg, offset = self._pos.get(d, (None, 0))
        if seg is not None and files[-1].name == seg.name and seg.stat().st_size == offset:
            return  # nothing new: the common case before a Rank, one stat instead of a read
        todo = files if seg is None else [f for f in files if f.name >= seg.name]
        for k, path in enumerate(todo):
            start = offset if (seg is not None and path.name == seg.name) else 0
            last = k == len(todo) - 1
            if modified_since is not None and not last and start == 0 and path.stat().st_mtime < modified_since:
                continue
            with open(path, "rb") as fh:
                fh.seek(start)
                data = fh.read()
            records, good_end, problem = _scan(path, data, start)
            out.extend(rec for _, rec in records)
            if problem and not last:
                raise EventLogCorrupt(path, good_end, problem)
            self._pos[d] = [path, good_end]
