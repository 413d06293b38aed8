"""A real redis-server on a free loopback port with its data in a directory of its own
(AOF on, fsync on every write, unless told otherwise): stoppable, killable and
restartable on the same port and data. The event-store bench and the tests run it."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """One redis-server process; ``url`` is what the server's ``event_store`` is set to.

    Parameters
    ----------
    directory : Path
        Its working directory (AOF files, the log).
    appendonly, appendfsync : str
        Durability settings ("yes"/"always" make an OK durable).
    port : int
        0: a free one.
    binary : str, optional
        The redis-server to run (default: the one on PATH).
    """

    def __init__(
        self,
        directory: Path,
        appendonly: str = "yes",
        appendfsync: str = "always",
        port: int = 0,
        binary: str | None = None,
    ):
        found = binary or shutil.which("redis-server")
        if not found:
            raise FileNotFoundError("redis-server not found on PATH; `make deps-system` installs it")
        self.binary = found
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.appendonly = appendonly
        self.appendfsync = appendfsync
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        args = [
            self.binary,
            "--bind", "127.0.0.1",
            "--port", str(self.port),
            "--dir", str(self.directory),
            "--appendonly", self.appendonly,
            "--appendfsync", self.appendfsync,
            "--save", "",
            "--protected-mode", "yes",
            "--logfile", str(self.directory / "redis.log"),
        ]  # fmt: skip
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                log = (self.directory / "redis.log").read_text() if (self.directory / "redis.log").exists() else ""
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}: {log[-2000:]}")
            if self.ping():
                return self
            time.sleep(0.05)
        raise RuntimeError(f"redis-server on port {self.port} did not answer within 15 s")

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def client(self):
        import redis

        return redis.Redis(host="127.0.0.1", port=self.port, db=0)

    def kill(self) -> None:
        """kill -9: whatever was acknowledged must be in the AOF already."""
        if self.proc and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
