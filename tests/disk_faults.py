"""Real full and read-only file systems for tests: a small tmpfs, and an ext4 image on a loop
device that the kernel's own error path turns read-only (``errors=remount-ro``).

Both need mount privileges (root, as in CI's container). Locally without them the tests
skip; under ``CI=true`` they fail, since CI can mount (``make deps-system`` installs
e2fsprogs for mkfs.ext4).
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest


def _cannot(message: str):
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


@contextlib.contextmanager
def small_tmpfs(where: Path, size: str = "256k") -> Iterator[Path]:
    """A tmpfs of ``size`` mounted at ``where`` (created), unmounted afterwards."""
    where.mkdir(parents=True, exist_ok=True)
    r = _run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(where)])
    if r.returncode != 0:
        _cannot(f"cannot mount a tmpfs (needs root): {r.stderr.strip()}")
    try:
        yield where
    finally:
        _run(["umount", "-l", str(where)])


def fill(directory: Path, name: str = "filler") -> Path:
    """Write a file into ``directory`` until its file system is full; returns the file."""
    path = directory / name
    chunk = b"\0" * 4096
    with open(path, "ab", buffering=0) as fh:
        while True:
            try:
                fh.write(chunk)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                break
    # Smaller writes for the last partial page: nothing is left at all.
    with open(path, "ab", buffering=0) as fh:
        for _ in range(4096):
            try:
                fh.write(b"\0")
            except OSError:
                break
    return path


@contextlib.contextmanager
def ext4_remount_ro(where: Path, image: Path, size_mb: int = 8) -> Iterator[tuple[Path, callable]]:
    """An ext4 image mounted at ``where`` with ``errors=remount-ro``; yields the mount point and
    a function that makes ext4 report a file system error (``trigger_fs_error``), after which
    the kernel turns the mount read-only and every write fails with EROFS."""
    mkfs = shutil.which("mkfs.ext4")
    if mkfs is None:
        _cannot("mkfs.ext4 not found; `make deps-system` installs e2fsprogs")
    where.mkdir(parents=True, exist_ok=True)
    with open(image, "wb") as fh:
        fh.truncate(size_mb << 20)
    r = _run([mkfs, "-q", "-F", str(image)])
    if r.returncode != 0:
        _cannot(f"mkfs.ext4 failed: {r.stderr.strip()}")
    r = _run(["mount", "-o", "loop,errors=remount-ro", str(image), str(where)])
    if r.returncode != 0:
        _cannot(f"cannot mount a loop device (needs root and /dev/loop*): {r.stderr.strip()}")
    try:
        dev = os.path.basename(_run(["findmnt", "-no", "SOURCE", str(where)]).stdout.strip())
        trigger = Path("/sys/fs/ext4") / dev / "trigger_fs_error"

        def make_read_only() -> None:
            if not trigger.exists():
                _cannot(f"{trigger} is missing: this kernel's ext4 cannot be made to fail on demand")
            trigger.write_text("1")

        yield where, make_read_only
    finally:
        _run(["umount", "-l", str(where)])
